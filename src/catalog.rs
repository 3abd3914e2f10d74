//! The namespace: paths, nodes and each file's versions with their
//! capabilities, in an embedded transactional store (SQLite).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

pub const ROOT_INO: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error("{0}: is a directory")]
    IsADirectory(String),
    #[error("{0:?}: invalid path (use /-separated names, without . or ..)")]
    InvalidPath(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dir,
    File,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::File => "file",
        }
    }
    fn parse(s: &str) -> Kind {
        if s == "dir" {
            Kind::Dir
        } else {
            Kind::File
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub ino: i64,
    pub parent: i64,
    pub name: String,
    pub kind: Kind,
    pub mtime_ns: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    /// Sealed locally, not yet on the grid.
    Staged,
    /// On the grid with happiness.
    Committed,
}

impl VersionState {
    fn as_str(self) -> &'static str {
        match self {
            VersionState::Staged => "staged",
            VersionState::Committed => "committed",
        }
    }
    fn parse(s: &str) -> VersionState {
        if s == "committed" {
            VersionState::Committed
        } else {
            VersionState::Staged
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Version {
    pub num: i64,
    pub size: u64,
    pub sha256: String,
    pub state: VersionState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cap: Option<String>,
    pub created_ns: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    /// Size of the newest version, for files.
    pub size: Option<u64>,
    pub versions: i64,
    pub mtime_ns: i64,
}

pub struct Catalog {
    db: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS nodes (
    ino INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    mtime_ns INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE TABLE IF NOT EXISTS versions (
    ino INTEGER NOT NULL REFERENCES nodes(ino),
    num INTEGER NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    cap TEXT,
    created_ns INTEGER NOT NULL,
    PRIMARY KEY (ino, num)
);
";

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Splits "/a/b/c" into its names, refusing anything that is not a plain path.
pub fn split_path(path: &str) -> Result<Vec<&str>, CatalogError> {
    let names: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if names.iter().any(|n| *n == "." || *n == ".." || n.contains('\0')) {
        return Err(CatalogError::InvalidPath(path.to_string()));
    }
    Ok(names)
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog, CatalogError> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        db.execute_batch(SCHEMA)?;
        db.execute(
            "INSERT OR IGNORE INTO nodes (ino, parent, name, kind, mtime_ns) VALUES (?1, ?1, '', 'dir', ?2)",
            params![ROOT_INO, now_ns()],
        )?;
        Ok(Catalog { db })
    }

    fn node(&self, ino: i64) -> Result<Option<Node>, CatalogError> {
        Ok(self
            .db
            .query_row(
                "SELECT ino, parent, name, kind, mtime_ns FROM nodes WHERE ino = ?1",
                [ino],
                row_to_node,
            )
            .optional()?)
    }

    fn child(&self, parent: i64, name: &str) -> Result<Option<Node>, CatalogError> {
        Ok(self
            .db
            .query_row(
                "SELECT ino, parent, name, kind, mtime_ns FROM nodes WHERE parent = ?1 AND name = ?2 AND ino != ?1",
                params![parent, name],
                row_to_node,
            )
            .optional()?)
    }

    pub fn resolve(&self, path: &str) -> Result<Node, CatalogError> {
        let mut node = self.node(ROOT_INO)?.expect("root exists");
        for name in split_path(path)? {
            if node.kind != Kind::Dir {
                return Err(CatalogError::NotADirectory(path.to_string()));
            }
            node = self
                .child(node.ino, name)?
                .ok_or_else(|| CatalogError::NotFound(path.to_string()))?;
        }
        Ok(node)
    }

    /// The file node at `path`, created with any missing parent directories.
    pub fn ensure_file(&mut self, path: &str) -> Result<i64, CatalogError> {
        let names = split_path(path)?;
        let (file_name, dirs) = names
            .split_last()
            .ok_or_else(|| CatalogError::InvalidPath(path.to_string()))?;
        let tx = self.db.transaction()?;
        let mut parent = ROOT_INO;
        for name in dirs {
            parent = ensure_child(&tx, parent, name, Kind::Dir, path)?;
        }
        let ino = ensure_child(&tx, parent, file_name, Kind::File, path)?;
        tx.commit()?;
        Ok(ino)
    }

    /// Records a new version of a file; returns its number.
    pub fn add_version(
        &mut self,
        ino: i64,
        size: u64,
        sha256: &str,
        state: VersionState,
        cap: Option<&str>,
    ) -> Result<i64, CatalogError> {
        let tx = self.db.transaction()?;
        let num: i64 = tx.query_row(
            "SELECT COALESCE(MAX(num), 0) + 1 FROM versions WHERE ino = ?1",
            [ino],
            |r| r.get(0),
        )?;
        let now = now_ns();
        tx.execute(
            "INSERT INTO versions (ino, num, size, sha256, state, cap, created_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![ino, num, size as i64, sha256, state.as_str(), cap, now],
        )?;
        tx.execute("UPDATE nodes SET mtime_ns = ?2 WHERE ino = ?1", params![ino, now])?;
        tx.commit()?;
        Ok(num)
    }

    pub fn versions(&self, ino: i64) -> Result<Vec<Version>, CatalogError> {
        let mut stmt = self
            .db
            .prepare("SELECT num, size, sha256, state, cap, created_ns FROM versions WHERE ino = ?1 ORDER BY num")?;
        let rows = stmt.query_map([ino], |r| {
            Ok(Version {
                num: r.get(0)?,
                size: r.get::<_, i64>(1)? as u64,
                sha256: r.get(2)?,
                state: VersionState::parse(&r.get::<_, String>(3)?),
                cap: r.get(4)?,
                created_ns: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The newest version the grid holds.
    pub fn latest_committed(&self, ino: i64) -> Result<Option<Version>, CatalogError> {
        Ok(self
            .versions(ino)?
            .into_iter()
            .rev()
            .find(|v| v.state == VersionState::Committed))
    }

    pub fn list(&self, path: &str) -> Result<Vec<Entry>, CatalogError> {
        let dir = self.resolve(path)?;
        if dir.kind != Kind::Dir {
            return Err(CatalogError::NotADirectory(path.to_string()));
        }
        let mut stmt = self.db.prepare(
            "SELECT n.name, n.kind, n.mtime_ns,
                    (SELECT size FROM versions v WHERE v.ino = n.ino ORDER BY num DESC LIMIT 1),
                    (SELECT COUNT(*) FROM versions v WHERE v.ino = n.ino)
             FROM nodes n WHERE n.parent = ?1 AND n.ino != ?1 ORDER BY n.name",
        )?;
        let rows = stmt.query_map([dir.ino], |r| {
            Ok(Entry {
                name: r.get(0)?,
                kind: Kind::parse(&r.get::<_, String>(1)?),
                mtime_ns: r.get(2)?,
                size: r.get::<_, Option<i64>>(3)?.map(|s| s as u64),
                versions: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn row_to_node(r: &rusqlite::Row<'_>) -> rusqlite::Result<Node> {
    Ok(Node {
        ino: r.get(0)?,
        parent: r.get(1)?,
        name: r.get(2)?,
        kind: Kind::parse(&r.get::<_, String>(3)?),
        mtime_ns: r.get(4)?,
    })
}

fn ensure_child(
    tx: &rusqlite::Transaction<'_>,
    parent: i64,
    name: &str,
    kind: Kind,
    path: &str,
) -> Result<i64, CatalogError> {
    let existing: Option<(i64, String)> = tx
        .query_row(
            "SELECT ino, kind FROM nodes WHERE parent = ?1 AND name = ?2 AND ino != ?1",
            params![parent, name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match existing {
        Some((ino, k)) if Kind::parse(&k) == kind => Ok(ino),
        Some(_) if kind == Kind::Dir => Err(CatalogError::NotADirectory(path.to_string())),
        Some(_) => Err(CatalogError::IsADirectory(path.to_string())),
        None => {
            tx.execute(
                "INSERT INTO nodes (parent, name, kind, mtime_ns) VALUES (?1, ?2, ?3, ?4)",
                params![parent, name, kind.as_str(), now_ns()],
            )?;
            Ok(tx.last_insert_rowid())
        }
    }
}
