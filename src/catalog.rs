//! The namespace: nodes (directories, files, symlinks) with their attributes,
//! and each file's versions with their capabilities, in an embedded
//! transactional store (SQLite, WAL).

use std::collections::HashMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

/// An inode number: a node's row id in the catalog, and the number the
/// platforms' adapters hand to the kernel (FUSE) or keep (WinFsp) as is.
pub type Ino = u64;

pub const ROOT_INO: Ino = 1;
/// Parent of nodes that were unlinked while still open.
pub const ORPHAN_PARENT: Ino = 0;

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
    #[error("{0} is damaged")]
    Corrupt(String),
    /// A value streamed into or out of a row (a checkpoint's state).
    #[error("catalog: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// Special files: names with attributes and no content. A device
    /// node's number is kept in `target`.
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    /// A further name of a node (a hard link): a row of its own, holding
    /// the node's number in `target`. Never shown as such: every lookup,
    /// listing and path resolves it to its node (docs/SEMANTICS.md).
    Link,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::File => "file",
            Kind::Symlink => "symlink",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::CharDevice => "chardev",
            Kind::BlockDevice => "blockdev",
            Kind::Link => "link",
        }
    }
    fn parse(s: &str) -> Kind {
        match s {
            "dir" => Kind::Dir,
            "symlink" => Kind::Symlink,
            "fifo" => Kind::Fifo,
            "socket" => Kind::Socket,
            "chardev" => Kind::CharDevice,
            "blockdev" => Kind::BlockDevice,
            "link" => Kind::Link,
            _ => Kind::File,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub ino: Ino,
    pub parent: Ino,
    pub name: String,
    pub kind: Kind,
    /// Permission bits (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Attributes of a node about to be created.
#[derive(Debug, Clone)]
pub struct NewNode<'a> {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub target: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    /// Sealed locally, waiting for or in upload.
    Staged,
    /// On the grid with happiness.
    Committed,
    /// Replaced by a newer version before its upload started; never uploaded.
    Superseded,
    /// Its file was deleted before it was uploaded.
    Dropped,
    /// No longer retained: `cairn gc` deleted its shares.
    Collected,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Staged => "staged",
            VersionState::Committed => "committed",
            VersionState::Superseded => "superseded",
            VersionState::Dropped => "dropped",
            VersionState::Collected => "collected",
        }
    }
    fn parse(s: &str) -> VersionState {
        match s {
            "committed" => VersionState::Committed,
            "superseded" => VersionState::Superseded,
            "dropped" => VersionState::Dropped,
            "collected" => VersionState::Collected,
            _ => VersionState::Staged,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Version {
    pub ino: Ino,
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
    pub ino: Ino,
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

/// What a node's attributes need besides the node: the newest version's
/// size (files) and the number of subdirectories (directories).
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeFacts {
    pub latest_size: Option<u64>,
    pub subdirs: u32,
    /// Its further names (hard links).
    pub links: u32,
}

impl Drop for Catalog {
    /// A catalog closed in an orderly way commits its last batch.
    fn drop(&mut self) {
        if let Err(e) = self.commit() {
            tracing::error!(error = %e, "committing the catalog's last changes");
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS nodes (
    ino INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    target TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS nodes_by_name ON nodes (parent, name) WHERE parent != 0;
-- The unique index above is partial, so SQLite cannot use it for
-- `parent = ?` (it cannot prove the parameter is not 0): without this one
-- every lookup and readdir scanned the whole table.
CREATE INDEX IF NOT EXISTS nodes_by_parent ON nodes (parent, name);
-- A directory's link count is 2 + its subdirectories, asked at every
-- getattr of it: counted from this (small) index, not by reading every
-- child's row (a create in a directory of 10,000 files cost 10,000 reads).
CREATE INDEX IF NOT EXISTS dirs_by_parent ON nodes (parent) WHERE kind = 'dir';
-- A node's further names (hard links), for its link count and for the
-- unlink of its first name.
CREATE INDEX IF NOT EXISTS links_by_target ON nodes (target) WHERE kind = 'link';
CREATE TABLE IF NOT EXISTS versions (
    ino INTEGER NOT NULL,
    num INTEGER NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    cap TEXT,
    created_ns INTEGER NOT NULL,
    PRIMARY KEY (ino, num)
);

CREATE INDEX IF NOT EXISTS versions_by_state ON versions (state);
CREATE TABLE IF NOT EXISTS xattrs (
    ino INTEGER NOT NULL,
    name TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS namespaces (
    seq INTEGER PRIMARY KEY,
    cap TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    collected INTEGER NOT NULL DEFAULT 0
);
";

/// The namespace as stored on the grid: every directory, name and
/// attribute, and each file's committed versions (docs/FORMAT.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    pub nodes: Vec<Node>,
    pub versions: Vec<SnapshotVersion>,
    pub xattrs: Vec<SnapshotXattr>,
}

pub const SNAPSHOT_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotVersion {
    pub ino: Ino,
    pub num: i64,
    pub size: u64,
    pub sha256: String,
    pub cap: String,
    pub created_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotXattr {
    pub ino: Ino,
    pub name: String,
    pub value: Vec<u8>,
}

/// A namespace snapshot published to the grid.
#[derive(Debug, Clone, Serialize)]
pub struct PublishedNamespace {
    pub seq: u64,
    pub cap: String,
    pub created_ns: i64,
}

const NODE_COLUMNS: &str = "ino, parent, name, kind, mode, uid, gid, atime_ns, mtime_ns, ctime_ns, target";
/// [`NodeFacts`] of the node `n`, after its columns: the newest version's
/// size, and its subdirectories (counted from the `dirs_by_parent` index).
const FACTS_COLUMNS: &str = "(SELECT size FROM versions v WHERE v.ino = n.ino ORDER BY num DESC LIMIT 1),
    CASE WHEN n.kind = 'dir' THEN (SELECT COUNT(*) FROM nodes c
        WHERE c.parent = n.ino AND c.ino != n.ino AND c.kind = 'dir') ELSE 0 END,
    CASE WHEN n.kind != 'dir' THEN (SELECT COUNT(*) FROM nodes l
        WHERE l.kind = 'link' AND l.target = CAST(n.ino AS TEXT)) ELSE 0 END";
/// A node `nodes` with a name: its own, or only hard links (a file whose
/// first name was removed).
const NAMED_NODE: &str = "(parent != 0 OR EXISTS (SELECT 1 FROM nodes l
    WHERE l.kind = 'link' AND l.target = CAST(nodes.ino AS TEXT)))";
/// [`NAMED_NODE`] of the node `n`.
const NAMED_NODE_N: &str = "(n.parent != 0 OR EXISTS (SELECT 1 FROM nodes l
    WHERE l.kind = 'link' AND l.target = CAST(n.ino AS TEXT)))";
/// Name rows `r` and the node `n` each leads to: itself, or a hard link's.
const NAMED: &str =
    "nodes r JOIN nodes n ON n.ino = CASE WHEN r.kind = 'link' THEN CAST(r.target AS INTEGER) ELSE r.ino END";
/// [`NODE_COLUMNS`] of the node `n`.
const N_COLUMNS: &str =
    "n.ino, n.parent, n.name, n.kind, n.mode, n.uid, n.gid, n.atime_ns, n.mtime_ns, n.ctime_ns, n.target";
const VERSION_COLUMNS: &str = "ino, num, size, sha256, state, cap, created_ns";

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

/// [`NodeFacts`] from the [`FACTS_COLUMNS`] starting at column `first`.
fn row_to_facts(r: &rusqlite::Row, first: usize) -> rusqlite::Result<NodeFacts> {
    Ok(NodeFacts {
        latest_size: r.get::<_, Option<i64>>(first)?.map(|s| s as u64),
        subdirs: r.get(first + 1)?,
        links: r.get(first + 2)?,
    })
}

fn row_to_node(r: &rusqlite::Row<'_>) -> rusqlite::Result<Node> {
    row_to_node_at(r, 0)
}

/// A [`Node`] from the [`NODE_COLUMNS`] starting at column `at`.
fn row_to_node_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Node> {
    Ok(Node {
        ino: r.get(at)?,
        parent: r.get(at + 1)?,
        name: r.get(at + 2)?,
        kind: Kind::parse(&r.get::<_, String>(at + 3)?),
        mode: r.get(at + 4)?,
        uid: r.get(at + 5)?,
        gid: r.get(at + 6)?,
        atime_ns: r.get(at + 7)?,
        mtime_ns: r.get(at + 8)?,
        ctime_ns: r.get(at + 9)?,
        target: r.get(at + 10)?,
    })
}

fn row_to_version(r: &rusqlite::Row<'_>) -> rusqlite::Result<Version> {
    Ok(Version {
        ino: r.get(0)?,
        num: r.get(1)?,
        size: r.get::<_, i64>(2)? as u64,
        sha256: r.get(3)?,
        state: VersionState::parse(&r.get::<_, String>(4)?),
        cap: r.get(5)?,
        created_ns: r.get(6)?,
    })
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog, CatalogError> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        // Commits survive a crash of the process; `sync_to_disk` makes them
        // survive a power loss too, and fsync calls it.
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        db.execute_batch(SCHEMA)?;
        migrate(&db)?;
        let now = now_ns();
        db.execute(
            &format!("INSERT OR IGNORE INTO nodes ({NODE_COLUMNS}) VALUES (?1, ?1, '', 'dir', 493, ?2, ?3, ?4, ?4, ?4, NULL)"),
            params![ROOT_INO, crate::sys::current_owner().0, crate::sys::current_owner().1, now],
        )?;
        Ok(Catalog { db })
    }

    /// A second connection to the catalog at `path`, read-only: it sees what
    /// the owner's connection committed, and reads without holding the
    /// owner (a namespace publication reads the whole catalog this way).
    pub fn open_reader(path: &Path) -> Result<Catalog, CatalogError> {
        let db = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Catalog { db })
    }

    /// Leaves checkpoints (copying the write-ahead log into the database,
    /// with its syncs) to another connection: the daemon's commits happen
    /// under its core's lock, which must not wait on a disk.
    pub fn leave_checkpoints_to_others(&self) -> Result<(), CatalogError> {
        self.db.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(())
    }

    /// A second read-write connection to the catalog at `path`, for
    /// [`Catalog::checkpoint`] only.
    pub fn open_checkpointer(path: &Path) -> Result<Catalog, CatalogError> {
        let db = Connection::open(path)?;
        db.busy_timeout(std::time::Duration::from_secs(1))?;
        Ok(Catalog { db })
    }

    /// Copies what the write-ahead log holds into the database as far as
    /// readers allow, without waiting for the owner's connection (PASSIVE).
    pub fn checkpoint(&self) -> Result<(), CatalogError> {
        self.query_one("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Opens the current batch of changes, if none is open: changes are
    /// grouped into one transaction until [`Catalog::commit`] (group commit).
    fn begin_batch(&self) -> Result<(), CatalogError> {
        if self.db.is_autocommit() {
            self.db.execute_batch("BEGIN IMMEDIATE")?;
        }
        Ok(())
    }

    /// Commits the batch of changes made since the last commit, if any:
    /// from then on they survive a crash of the process. Returns whether
    /// there was anything to commit.
    pub fn commit(&self) -> Result<bool, CatalogError> {
        if self.db.is_autocommit() {
            return Ok(false);
        }
        self.db.execute_batch("COMMIT")?;
        Ok(true)
    }

    /// Whether changes are waiting in an uncommitted batch.
    pub fn uncommitted(&self) -> bool {
        !self.db.is_autocommit()
    }

    /// A change, into the current batch.
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> Result<usize, CatalogError> {
        self.begin_batch()?;
        Ok(self.db.prepare_cached(sql)?.execute(params)?)
    }

    /// The connection, for the sync tables' own statements (src/sync/store.rs).
    pub(crate) fn conn(&self) -> &Connection {
        &self.db
    }

    /// The connection inside the current batch, for changes.
    pub(crate) fn batch(&self) -> Result<&Connection, CatalogError> {
        self.begin_batch()?;
        Ok(&self.db)
    }

    /// A savepoint inside the current batch, for a change of several
    /// statements that must be all or nothing: dropped without `commit`,
    /// it is taken back, and the batch's other changes stay.
    pub(crate) fn batch_savepoint(&mut self) -> Result<rusqlite::Savepoint<'_>, CatalogError> {
        self.begin_batch()?;
        Ok(self.db.savepoint()?)
    }

    /// A one-row query, its statement prepared once per connection.
    fn query_one<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        row: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.db.prepare_cached(sql)?.query_row(params, row)
    }

    /// The catalog's write-ahead log: syncing it makes every commit made so
    /// far durable (they are in it, with checksums; SQLite replays it after
    /// a power loss). A daemon syncs it without holding its connection.
    pub fn wal_path(&self) -> Option<std::path::PathBuf> {
        let db = self.db.path()?;
        Some(std::path::PathBuf::from(format!("{db}-wal")))
    }

    /// Commits the batch and makes every commit durable on disk.
    pub fn sync_to_disk(&self) -> Result<(), CatalogError> {
        self.commit()?;
        self.db.pragma_update(None, "synchronous", "FULL")?;
        let result = self.db.execute_batch("BEGIN IMMEDIATE; COMMIT;");
        self.db.pragma_update(None, "synchronous", "NORMAL")?;
        result?;
        self.query_one("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(()))?;
        Ok(())
    }

    pub fn node(&self, ino: Ino) -> Result<Option<Node>, CatalogError> {
        Ok(self
            .query_one(
                &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE ino = ?1"),
                [ino],
                row_to_node,
            )
            .optional()?)
    }

    /// The node the name (`parent`, `name`) leads to: for a hard link,
    /// the node it names (with that node's own first name).
    pub fn child(&self, parent: Ino, name: &str) -> Result<Option<Node>, CatalogError> {
        Ok(self
            .query_one(
                &format!("SELECT {N_COLUMNS} FROM {NAMED} WHERE r.parent = ?1 AND r.name = ?2 AND r.ino != ?1"),
                params![parent, name],
                row_to_node,
            )
            .optional()?)
    }

    /// The row of the name (`parent`, `name`) itself: a node's first name,
    /// or a hard link ([`Kind::Link`]). What unlink and rename change.
    pub fn name_row(&self, parent: Ino, name: &str) -> Result<Option<Node>, CatalogError> {
        Ok(self
            .query_one(
                &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE parent = ?1 AND name = ?2 AND ino != ?1"),
                params![parent, name],
                row_to_node,
            )
            .optional()?)
    }

    /// Children of a directory in the order of their name rows (stable
    /// offsets for readdir): each name row's number and name, and the node
    /// it leads to.
    pub fn children(&self, parent: Ino) -> Result<Vec<(Ino, String, Node)>, CatalogError> {
        let mut stmt = self.db.prepare_cached(&format!(
            "SELECT r.ino, r.name, {N_COLUMNS} FROM {NAMED} WHERE r.parent = ?1 AND r.ino != ?1 ORDER BY r.ino"
        ))?;
        let rows = stmt.query_map([parent], |r| Ok((r.get(0)?, r.get(1)?, row_to_node_at(r, 2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// [`Catalog::children`] with name rows numbered above `after`, each
    /// with what its node's attributes need besides the node, in one query
    /// (READDIRPLUS of a large directory).
    pub fn children_with_facts(
        &self,
        parent: Ino,
        after: Ino,
    ) -> Result<Vec<(Ino, String, Node, NodeFacts)>, CatalogError> {
        let mut stmt = self.db.prepare_cached(&format!(
            "SELECT r.ino, r.name, {N_COLUMNS}, {FACTS_COLUMNS}
             FROM {NAMED} WHERE r.parent = ?1 AND r.ino != ?1 AND r.ino > ?2 ORDER BY r.ino"
        ))?;
        let rows = stmt.query_map([parent, after], |r| {
            Ok((r.get(0)?, r.get(1)?, row_to_node_at(r, 2)?, row_to_facts(r, 13)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// What a node's attributes need besides the node itself.
    pub fn facts(&self, node: &Node) -> Result<NodeFacts, CatalogError> {
        Ok(self.query_one(
            &format!("SELECT {FACTS_COLUMNS} FROM nodes n WHERE n.ino = ?1"),
            [node.ino],
            |r| row_to_facts(r, 0),
        )?)
    }

    pub fn has_children(&self, parent: Ino) -> Result<bool, CatalogError> {
        Ok(self
            .query_one(
                "SELECT 1 FROM nodes WHERE parent = ?1 AND ino != ?1 LIMIT 1",
                [parent],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    pub fn create(&self, parent: Ino, name: &str, new: &NewNode<'_>) -> Result<Node, CatalogError> {
        let now = now_ns();
        // Inode numbers are never reused: a deleted file's versions stay on
        // record under its number, the kernel may still know it, and the
        // numbers up to `sync_legacy_max_ino` name node ids.
        self.exec(
            "INSERT INTO nodes (ino, parent, name, kind, mode, uid, gid, atime_ns, mtime_ns, ctime_ns, target)
             VALUES ((SELECT MAX(m) + 1 FROM (SELECT MAX(ino) AS m FROM nodes UNION ALL SELECT MAX(ino) FROM versions
                        UNION ALL SELECT MAX(ino) FROM sync_nodes
                        UNION ALL SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'sync_legacy_max_ino')),
                     ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?7, ?8)",
            params![
                parent,
                name,
                new.kind.as_str(),
                new.mode,
                new.uid,
                new.gid,
                now,
                new.target
            ],
        )?;
        // Row ids made as above are positive.
        let ino = self.db.last_insert_rowid() as Ino;
        self.touch_dir(parent, now)?;
        Ok(self.node(ino)?.expect("just inserted"))
    }

    fn touch_dir(&self, dir: Ino, now: i64) -> Result<(), CatalogError> {
        self.exec(
            "UPDATE nodes SET mtime_ns = ?2, ctime_ns = ?2 WHERE ino = ?1",
            params![dir, now],
        )?;
        Ok(())
    }

    /// Writes back a node's attributes (mode, owner, times).
    pub fn update_attrs(&self, node: &Node) -> Result<(), CatalogError> {
        self.exec(
            "UPDATE nodes SET mode = ?2, uid = ?3, gid = ?4, atime_ns = ?5, mtime_ns = ?6, ctime_ns = ?7 WHERE ino = ?1",
            params![node.ino, node.mode, node.uid, node.gid, node.atime_ns, node.mtime_ns, node.ctime_ns],
        )?;
        Ok(())
    }

    /// A further name (`parent`, `name`) for node `ino` (link(2)): a
    /// [`Kind::Link`] row. The node's ctime changes, as on ext4.
    pub fn link(&self, ino: Ino, parent: Ino, name: &str) -> Result<Node, CatalogError> {
        let target = ino.to_string();
        let row = self.create(
            parent,
            name,
            &NewNode {
                kind: Kind::Link,
                mode: 0,
                uid: 0,
                gid: 0,
                target: Some(&target),
            },
        )?;
        self.exec(
            "UPDATE nodes SET ctime_ns = ?2 WHERE ino = ?1",
            params![ino, row.ctime_ns],
        )?;
        Ok(row)
    }

    /// Removes the name `row` (as [`Catalog::name_row`] gives it). Returns
    /// whether that was its node's last name: the node then goes too,
    /// unless `keep_orphan` (the file is still open), when it stays,
    /// nameless, until `forget_orphan`.
    pub fn unlink(&mut self, row: &Node, keep_orphan: bool) -> Result<bool, CatalogError> {
        self.begin_batch()?;
        let tx = self.db.savepoint()?;
        let now = now_ns();
        let gone = remove_name(&tx, row, keep_orphan, now)?;
        tx.execute(
            "UPDATE nodes SET mtime_ns = ?2, ctime_ns = ?2 WHERE ino = ?1",
            params![row.parent, now],
        )?;
        tx.commit()?;
        Ok(gone)
    }

    pub fn forget_orphan(&mut self, ino: Ino) -> Result<(), CatalogError> {
        self.begin_batch()?;
        let tx = self.db.savepoint()?;
        delete_node(&tx, ino)?;
        tx.commit()?;
        Ok(())
    }

    /// Orphans left by a crash: open files that were unlinked (not files
    /// whose first name went while hard links of them are left).
    pub fn orphans(&self) -> Result<Vec<Ino>, CatalogError> {
        let mut stmt = self.db.prepare(
            "SELECT ino FROM nodes n WHERE parent = 0 AND ino != 1 AND NOT EXISTS
               (SELECT 1 FROM nodes l WHERE l.kind = 'link' AND l.target = CAST(n.ino AS TEXT))",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Moves the name `row` to (`parent`, `name`), removing the name
    /// `replaced` if given (with `keep_orphan` as in [`Catalog::unlink`]).
    /// Returns whether the replaced name was its node's last.
    pub fn rename(
        &mut self,
        row: &Node,
        parent: Ino,
        name: &str,
        replaced: Option<(&Node, bool)>,
    ) -> Result<bool, CatalogError> {
        self.begin_batch()?;
        let tx = self.db.savepoint()?;
        let now = now_ns();
        let gone = match replaced {
            Some((old, keep_orphan)) => remove_name(&tx, old, keep_orphan, now)?,
            None => false,
        };
        tx.execute(
            "UPDATE nodes SET parent = ?2, name = ?3, ctime_ns = ?4 WHERE ino = ?1",
            params![row.ino, parent, name, now],
        )?;
        if let Some(node) = linked_node(row) {
            tx.execute("UPDATE nodes SET ctime_ns = ?2 WHERE ino = ?1", params![node, now])?;
        }
        for dir in [row.parent, parent] {
            tx.execute(
                "UPDATE nodes SET mtime_ns = ?2, ctime_ns = ?2 WHERE ino = ?1",
                params![dir, now],
            )?;
        }
        tx.commit()?;
        Ok(gone)
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

    /// The path of a node, for messages and `cairn status`.
    pub fn path_of(&self, ino: Ino) -> Result<String, CatalogError> {
        let mut names = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO {
            // A node without a name of its own goes by its oldest link's.
            let named = match self.node(cur)? {
                Some(n) if n.parent == ORPHAN_PARENT => self
                    .query_one(
                        "SELECT parent, name FROM nodes WHERE kind = 'link' AND target = CAST(?1 AS TEXT)
                         ORDER BY ino LIMIT 1",
                        [cur],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?,
                Some(n) => Some((n.parent, n.name)),
                None => None,
            };
            match named {
                Some((parent, name)) => {
                    names.push(name);
                    cur = parent;
                }
                None => return Ok(format!("(deleted file {ino})")),
            }
        }
        names.reverse();
        Ok(format!("/{}", names.join("/")))
    }

    /// The file node at `path`, created with any missing parent directories.
    pub fn ensure_file(&mut self, path: &str) -> Result<Ino, CatalogError> {
        let names = split_path(path)?;
        let (file_name, dirs) = names
            .split_last()
            .ok_or_else(|| CatalogError::InvalidPath(path.to_string()))?;
        let mut parent = ROOT_INO;
        let owner = NewNode {
            kind: Kind::Dir,
            mode: 0o755,
            uid: crate::sys::current_owner().0,
            gid: crate::sys::current_owner().1,
            target: None,
        };
        for name in dirs {
            parent = match self.child(parent, name)? {
                Some(n) if n.kind == Kind::Dir => n.ino,
                Some(_) => return Err(CatalogError::NotADirectory(path.to_string())),
                None => self.create(parent, name, &owner)?.ino,
            };
        }
        match self.child(parent, file_name)? {
            Some(n) if n.kind == Kind::File => Ok(n.ino),
            Some(_) => Err(CatalogError::IsADirectory(path.to_string())),
            None => Ok(self
                .create(
                    parent,
                    file_name,
                    &NewNode {
                        kind: Kind::File,
                        mode: 0o644,
                        ..owner
                    },
                )?
                .ino),
        }
    }

    /// Records a new version of a file; returns its number. `origin` names
    /// the working copy it was sealed from, if any.
    pub fn add_version(
        &mut self,
        ino: Ino,
        size: u64,
        sha256: &str,
        state: VersionState,
        cap: Option<&str>,
        origin: Option<&str>,
    ) -> Result<i64, CatalogError> {
        let num = self.next_version_num(ino)?;
        self.exec(
            &format!("INSERT INTO versions ({VERSION_COLUMNS}, origin) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
            params![ino, num, size as i64, sha256, state.as_str(), cap, now_ns(), origin],
        )?;
        Ok(num)
    }

    /// The version (ino, num) sealed from the working copy named `origin`.
    pub fn sealed_from(&self, origin: &str) -> Result<Option<(Ino, i64)>, CatalogError> {
        Ok(self
            .query_one("SELECT ino, num FROM versions WHERE origin = ?1", [origin], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?)
    }

    /// The numbers of a file's versions, whatever their state.
    pub fn version_nums(&self, ino: Ino) -> Result<Vec<i64>, CatalogError> {
        let mut stmt = self.db.prepare_cached("SELECT num FROM versions WHERE ino = ?1")?;
        let rows = stmt.query_map([ino], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records the key of a version's new upload attempt; returns the key
    /// of the attempt before it, if any.
    pub fn new_upload_key(&self, ino: Ino, num: i64, fresh: &str) -> Result<Option<String>, CatalogError> {
        let previous = self.query_one(
            "SELECT upload_key FROM versions WHERE ino = ?1 AND num = ?2",
            params![ino, num],
            |r| r.get(0),
        )?;
        self.exec(
            "UPDATE versions SET upload_key = ?3 WHERE ino = ?1 AND num = ?2",
            params![ino, num, fresh],
        )?;
        Ok(previous)
    }

    pub fn set_version_state(&self, ino: Ino, num: i64, state: VersionState) -> Result<(), CatalogError> {
        self.exec(
            "UPDATE versions SET state = ?3 WHERE ino = ?1 AND num = ?2",
            params![ino, num, state.as_str()],
        )?;
        Ok(())
    }

    /// Marks a version committed, with what its upload learnt.
    pub fn commit_version(&self, ino: Ino, num: i64, cap: &str, sha256: &str) -> Result<(), CatalogError> {
        self.exec(
            "UPDATE versions SET state = 'committed', cap = ?3, sha256 = ?4 WHERE ino = ?1 AND num = ?2",
            params![ino, num, cap, sha256],
        )?;
        Ok(())
    }

    /// Carries `from`'s committed versions into `to`'s history, numbered
    /// just below `to`'s oldest (so at or below 0), in their order: a file
    /// replaced by a save-by-rename keeps its history under its name.
    /// Versions `to` already names (files renamed back and forth) are not
    /// carried twice. One transaction: a crash carries all or nothing.
    /// Returns how many were carried over.
    pub fn adopt_history(&mut self, from: Ino, to: Ino) -> Result<usize, CatalogError> {
        self.begin_batch()?;
        let tx = self.db.savepoint()?;
        let carried: Vec<(i64, String, String, i64)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT size, sha256, cap, created_ns FROM versions
                 WHERE ino = ?1 AND state = 'committed'
                   AND cap NOT IN (SELECT cap FROM versions WHERE ino = ?2 AND cap IS NOT NULL)
                 ORDER BY num",
            )?;
            let rows = stmt.query_map([from, to], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let oldest: i64 = tx.query_row(
            "SELECT MIN(COALESCE(MIN(num), 1), 1) FROM versions WHERE ino = ?1",
            [to],
            |r| r.get(0),
        )?;
        let first = oldest - carried.len() as i64;
        for (i, (size, sha256, cap, created_ns)) in carried.iter().enumerate() {
            tx.execute(
                &format!("INSERT INTO versions ({VERSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, 'committed', ?5, ?6)"),
                params![to, first + i as i64, size, sha256, cap, created_ns],
            )?;
        }
        tx.commit()?;
        Ok(carried.len())
    }

    /// The number the next version of `ino` will get: at least 1, since
    /// carried-over history sits at 0 and below.
    pub fn next_version_num(&self, ino: Ino) -> Result<i64, CatalogError> {
        Ok(self.query_one(
            "SELECT MAX(COALESCE(MAX(num), 0), 0) + 1 FROM versions WHERE ino = ?1",
            [ino],
            |r| r.get(0),
        )?)
    }

    fn select_versions(&self, filter: &str, params: impl rusqlite::Params) -> Result<Vec<Version>, CatalogError> {
        let mut stmt = self
            .db
            .prepare_cached(&format!("SELECT {VERSION_COLUMNS} FROM versions {filter}"))?;
        let rows = stmt.query_map(params, row_to_version)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn versions(&self, ino: Ino) -> Result<Vec<Version>, CatalogError> {
        self.select_versions("WHERE ino = ?1 ORDER BY num", [ino])
    }

    /// The newest version of a file, whatever its state.
    pub fn latest(&self, ino: Ino) -> Result<Option<Version>, CatalogError> {
        Ok(self
            .query_one(
                &format!("SELECT {VERSION_COLUMNS} FROM versions WHERE ino = ?1 ORDER BY num DESC LIMIT 1"),
                [ino],
                row_to_version,
            )
            .optional()?)
    }

    /// The newest version the grid holds.
    pub fn latest_committed(&self, ino: Ino) -> Result<Option<Version>, CatalogError> {
        Ok(self.query_one(
                &format!(
                    "SELECT {VERSION_COLUMNS} FROM versions WHERE ino = ?1 AND state = 'committed' ORDER BY num DESC LIMIT 1"
                ),
                [ino],
                row_to_version,
            )
            .optional()?)
    }

    /// Versions waiting for upload, oldest first.
    pub fn staged(&self) -> Result<Vec<Version>, CatalogError> {
        self.select_versions("WHERE state = 'staged' ORDER BY created_ns", [])
    }

    /// States of every version, for cache eviction.
    pub fn version_states(&self) -> Result<HashMap<(Ino, i64), VersionState>, CatalogError> {
        let mut stmt = self.db.prepare("SELECT ino, num, state FROM versions")?;
        let rows = stmt.query_map([], |r| {
            Ok(((r.get(0)?, r.get(1)?), VersionState::parse(&r.get::<_, String>(2)?)))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn set_degraded(&self, ino: Ino, num: i64, degraded: bool) -> Result<(), CatalogError> {
        self.exec(
            "UPDATE versions SET degraded = ?3 WHERE ino = ?1 AND num = ?2",
            params![ino, num, degraded],
        )?;
        Ok(())
    }

    /// Committed versions known to miss shares.
    pub fn degraded_versions(&self) -> Result<Vec<Version>, CatalogError> {
        self.select_versions("WHERE degraded != 0 AND state = 'committed' AND cap IS NOT NULL", [])
    }

    /// The namespace to publish: every node (but files without a committed
    /// version, and unlinked ones still open), all committed versions, and
    /// the nodes' extended attributes. Read in one transaction: consistent
    /// even while another connection commits.
    pub fn export(&self) -> Result<Snapshot, CatalogError> {
        let _read = match self.db.is_autocommit() {
            true => Some(self.db.unchecked_transaction()?),
            false => None,
        };
        let mut stmt = self.db.prepare(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes WHERE {NAMED_NODE} AND NOT (kind = 'file' AND NOT EXISTS
               (SELECT 1 FROM versions v WHERE v.ino = nodes.ino AND v.state = 'committed')) ORDER BY ino"
        ))?;
        let mut nodes: Vec<Node> = stmt.query_map([], row_to_node)?.collect::<Result<_, _>>()?;
        // A hard link to what is not shown (a file not yet uploaded) is not.
        let shown: std::collections::HashSet<Ino> = nodes.iter().map(|n| n.ino).collect();
        nodes.retain(|n| n.kind != Kind::Link || linked_node(n).is_some_and(|to| shown.contains(&to)));
        let versions = self
            .committed_versions()?
            .into_iter()
            .filter_map(|v| {
                Some(SnapshotVersion {
                    cap: v.cap?,
                    ino: v.ino,
                    num: v.num,
                    size: v.size,
                    sha256: v.sha256,
                    created_ns: v.created_ns,
                })
            })
            .collect();
        let mut stmt = self.db.prepare(&format!(
            "SELECT x.ino, x.name, x.value FROM xattrs x JOIN nodes n ON n.ino = x.ino
             WHERE {NAMED_NODE_N} ORDER BY x.ino, x.name"
        ))?;
        let xattrs = stmt
            .query_map([], |r| {
                Ok(SnapshotXattr {
                    ino: r.get(0)?,
                    name: r.get(1)?,
                    value: r.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(Snapshot {
            format: SNAPSHOT_FORMAT,
            nodes,
            versions,
            xattrs,
        })
    }

    /// Replaces the whole namespace with `snap` (recovery on a new machine).
    pub fn import(&mut self, snap: &Snapshot) -> Result<(), CatalogError> {
        self.begin_batch()?;
        let tx = self.db.savepoint()?;
        tx.execute_batch("DELETE FROM nodes; DELETE FROM versions; DELETE FROM xattrs;")?;
        for n in &snap.nodes {
            tx.execute(
                &format!("INSERT INTO nodes ({NODE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
                params![
                    n.ino,
                    n.parent,
                    n.name,
                    n.kind.as_str(),
                    n.mode,
                    n.uid,
                    n.gid,
                    n.atime_ns,
                    n.mtime_ns,
                    n.ctime_ns,
                    n.target
                ],
            )?;
        }
        for v in &snap.versions {
            tx.execute(
                &format!("INSERT INTO versions ({VERSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, 'committed', ?5, ?6)"),
                params![v.ino, v.num, v.size as i64, v.sha256, v.cap, v.created_ns],
            )?;
        }
        for x in &snap.xattrs {
            tx.execute(
                "INSERT INTO xattrs (ino, name, value) VALUES (?1, ?2, ?3)",
                params![x.ino, x.name, x.value],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, CatalogError> {
        Ok(self
            .query_one("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// The value of `key`, set to `value` first if it has none: of two
    /// processes racing to set it, both get the one that won.
    pub fn meta_or_insert(&self, key: &str, value: &str) -> Result<String, CatalogError> {
        self.exec(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
            params![key, value],
        )?;
        self.commit()?;
        Ok(self.meta(key)?.unwrap_or_else(|| value.to_string()))
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), CatalogError> {
        self.exec(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
            params![key, value],
        )?;
        Ok(())
    }

    pub fn add_namespace(&self, ns: &PublishedNamespace) -> Result<(), CatalogError> {
        self.exec(
            "INSERT OR REPLACE INTO namespaces (seq, cap, created_ns) VALUES (?1, ?2, ?3)",
            params![ns.seq as i64, ns.cap, ns.created_ns],
        )?;
        Ok(())
    }

    /// Published namespaces not yet collected, newest first.
    pub fn namespaces(&self) -> Result<Vec<PublishedNamespace>, CatalogError> {
        let mut stmt = self
            .db
            .prepare("SELECT seq, cap, created_ns FROM namespaces WHERE collected = 0 ORDER BY seq DESC")?;
        let rows = stmt.query_map([], |r| {
            Ok(PublishedNamespace {
                seq: r.get::<_, i64>(0)? as u64,
                cap: r.get(1)?,
                created_ns: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn collect_namespace(&self, seq: u64) -> Result<(), CatalogError> {
        self.exec("UPDATE namespaces SET collected = 1 WHERE seq = ?1", [seq as i64])?;
        Ok(())
    }

    /// Whether a node still has a name (deleted files' versions are kept
    /// for retention only).
    pub fn is_live(&self, ino: Ino) -> Result<bool, CatalogError> {
        Ok(match self.node(ino)? {
            Some(n) => n.parent != ORPHAN_PARENT || self.links(ino)? > 0,
            None => false,
        })
    }

    /// How many further names (hard links) node `ino` has.
    pub fn links(&self, ino: Ino) -> Result<u32, CatalogError> {
        links_of(&self.db, ino)
    }

    pub fn committed_versions(&self) -> Result<Vec<Version>, CatalogError> {
        self.select_versions(
            "WHERE state = 'committed' AND cap IS NOT NULL ORDER BY created_ns DESC",
            [],
        )
    }

    pub fn count_nodes(&self) -> Result<u64, CatalogError> {
        Ok(
            self.query_one("SELECT COUNT(*) FROM nodes WHERE kind != 'link'", [], |r| {
                r.get::<_, i64>(0)
            })? as u64,
        )
    }

    pub fn list(&self, path: &str) -> Result<Vec<Entry>, CatalogError> {
        let dir = self.resolve(path)?;
        if dir.kind != Kind::Dir {
            return Err(CatalogError::NotADirectory(path.to_string()));
        }
        let mut stmt = self.db.prepare(&format!(
            "SELECT n.ino, r.name, n.kind, n.mtime_ns,
                    (SELECT size FROM versions v WHERE v.ino = n.ino ORDER BY num DESC LIMIT 1),
                    (SELECT COUNT(*) FROM versions v WHERE v.ino = n.ino)
             FROM {NAMED} WHERE r.parent = ?1 AND r.ino != ?1 ORDER BY r.name"
        ))?;
        let rows = stmt.query_map([dir.ino], |r| {
            Ok(Entry {
                ino: r.get(0)?,
                name: r.get(1)?,
                kind: Kind::parse(&r.get::<_, String>(2)?),
                mtime_ns: r.get(3)?,
                size: r.get::<_, Option<i64>>(4)?.map(|s| s as u64),
                versions: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn xattr(&self, ino: Ino, name: &str) -> Result<Option<Vec<u8>>, CatalogError> {
        Ok(self
            .query_one(
                "SELECT value FROM xattrs WHERE ino = ?1 AND name = ?2",
                params![ino, name],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn xattr_names(&self, ino: Ino) -> Result<Vec<String>, CatalogError> {
        let mut stmt = self
            .db
            .prepare_cached("SELECT name FROM xattrs WHERE ino = ?1 ORDER BY name")?;
        let rows = stmt.query_map([ino], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn set_xattr(&self, ino: Ino, name: &str, value: &[u8]) -> Result<(), CatalogError> {
        self.exec(
            "INSERT OR REPLACE INTO xattrs (ino, name, value) VALUES (?1, ?2, ?3)",
            params![ino, name, value],
        )?;
        Ok(())
    }

    /// Returns whether the attribute existed.
    pub fn remove_xattr(&self, ino: Ino, name: &str) -> Result<bool, CatalogError> {
        Ok(self
            .db
            .execute("DELETE FROM xattrs WHERE ino = ?1 AND name = ?2", params![ino, name])?
            > 0)
    }
}

/// What several machines need (src/sync): the tree as this machine last
/// published or applied it, by node id; which local versions are which
/// shared version; every device log record known here; the other devices.
/// Triggers note every node whose row or committed versions change, so a
/// publication looks only at those.
const SYNC_SCHEMA: &str = "
CREATE TABLE sync_nodes (
    fid BLOB PRIMARY KEY,
    ino INTEGER NOT NULL UNIQUE,
    parent BLOB NOT NULL,
    name TEXT NOT NULL,
    attrs TEXT NOT NULL,
    xattrs TEXT NOT NULL,
    content BLOB,
    origin BLOB
);
CREATE TABLE sync_versions (
    ino INTEGER NOT NULL,
    num INTEGER NOT NULL,
    vid BLOB NOT NULL,
    PRIMARY KEY (ino, num)
);
CREATE INDEX sync_versions_by_vid ON sync_versions (vid);
CREATE TABLE sync_dirty (ino INTEGER PRIMARY KEY);
CREATE TABLE sync_log (
    device BLOB NOT NULL,
    seq INTEGER NOT NULL,
    bytes BLOB NOT NULL,
    placed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device, seq)
);
CREATE TABLE sync_devices (
    device BLOB PRIMARY KEY,
    key BLOB NOT NULL,
    merged_seq INTEGER NOT NULL,
    merged_link BLOB NOT NULL,
    head_time_ns INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER sync_node_added AFTER INSERT ON nodes
    BEGIN INSERT OR IGNORE INTO sync_dirty VALUES (NEW.ino); END;
CREATE TRIGGER sync_node_changed AFTER UPDATE OF parent, name, mode, uid, gid, mtime_ns, target ON nodes
    BEGIN INSERT OR IGNORE INTO sync_dirty VALUES (NEW.ino); END;
CREATE TRIGGER sync_node_removed AFTER DELETE ON nodes
    BEGIN INSERT OR IGNORE INTO sync_dirty VALUES (OLD.ino); END;
CREATE TRIGGER sync_xattr_set AFTER INSERT ON xattrs
    BEGIN INSERT OR IGNORE INTO sync_dirty VALUES (NEW.ino); END;
CREATE TRIGGER sync_xattr_removed AFTER DELETE ON xattrs
    BEGIN INSERT OR IGNORE INTO sync_dirty VALUES (OLD.ino); END;
CREATE TRIGGER sync_version_added AFTER INSERT ON versions WHEN NEW.state = 'committed'
    BEGIN INSERT OR IGNORE INTO sync_dirty VALUES (NEW.ino); END;
CREATE TRIGGER sync_version_committed AFTER UPDATE OF state ON versions WHEN NEW.state = 'committed'
    BEGIN INSERT OR IGNORE INTO sync_dirty VALUES (NEW.ino); END;
";
/// Meta key: the highest inode number before the sync tables were made.
/// Nodes up to it get ids derived from their number, the same on every
/// machine that recovered them from one snapshot.
pub const META_SYNC_LEGACY_INO: &str = "sync_legacy_max_ino";

/// Columns added after the first release of the schema.
fn migrate(db: &Connection) -> Result<(), CatalogError> {
    let has_sync = db
        .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sync_dirty'")?
        .exists([])?;
    if !has_sync {
        // Every node made before is waiting to be published.
        db.execute_batch(&format!(
            "BEGIN; {SYNC_SCHEMA}
             INSERT INTO sync_dirty SELECT ino FROM nodes WHERE ino != {ROOT_INO};
             INSERT INTO meta (key, value) SELECT '{META_SYNC_LEGACY_INO}', COALESCE(MAX(ino), 1) FROM nodes;
             COMMIT;"
        ))?;
    }
    // Checkpoints (sync::checkpoint): this machine's own that are on the
    // servers (`dropped`: to be removed from them), and the newest read of
    // each other device; `state` is kept only for the newest of each.
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS sync_checkpoints (
            device BLOB NOT NULL,
            seq INTEGER NOT NULL,
            link BLOB NOT NULL,
            cap TEXT NOT NULL,
            size INTEGER NOT NULL,
            made_ns INTEGER NOT NULL,
            state BLOB,
            dropped INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (device, seq)
        )",
    )?;
    let has = |column: &str| -> rusqlite::Result<bool> {
        let mut stmt = db.prepare("SELECT name FROM pragma_table_info('versions') WHERE name = ?1")?;
        stmt.exists([column])
    };
    // The working copy a version was sealed from: after a crash, a working
    // copy whose version exists was already sealed.
    if !has("origin")? {
        db.execute_batch("ALTER TABLE versions ADD COLUMN origin TEXT")?;
    }
    // The encryption key of an upload, kept so a retried or resumed upload
    // writes the same shares under the same names instead of new ones.
    if !has("upload_key")? {
        db.execute_batch("ALTER TABLE versions ADD COLUMN upload_key TEXT")?;
    }
    // Committed with fewer than n shares (a server was down): repaired later.
    if !has("degraded")? {
        db.execute_batch("ALTER TABLE versions ADD COLUMN degraded INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(())
}

/// The node a hard link row names.
pub fn linked_node(row: &Node) -> Option<Ino> {
    (row.kind == Kind::Link)
        .then(|| row.target.as_deref()?.parse().ok())
        .flatten()
}

/// Removes the name `row`; returns whether it was its node's last. A
/// node's first name with further names left goes alone too: the node
/// stays, nameless (parent [`ORPHAN_PARENT`], as a file unlinked while
/// open), under its links. The last name takes the node with it, or
/// leaves it nameless while open (`keep_orphan`).
fn remove_name(tx: &Connection, row: &Node, keep_orphan: bool, now: i64) -> Result<bool, CatalogError> {
    let (node, nameless) = match linked_node(row) {
        Some(node) => {
            tx.execute("DELETE FROM nodes WHERE ino = ?1", [row.ino])?;
            tx.execute("UPDATE nodes SET ctime_ns = ?2 WHERE ino = ?1", params![node, now])?;
            let parent: Option<Ino> = tx
                .query_row("SELECT parent FROM nodes WHERE ino = ?1", [node], |r| r.get(0))
                .optional()?;
            (node, parent == Some(ORPHAN_PARENT))
        }
        None => (row.ino, true),
    };
    if !nameless || links_of(tx, node)? > 0 {
        if linked_node(row).is_none() {
            tx.execute(
                "UPDATE nodes SET parent = ?2, name = ?1, ctime_ns = ?3 WHERE ino = ?1",
                params![node, ORPHAN_PARENT, now],
            )?;
        }
        return Ok(false);
    }
    if keep_orphan {
        tx.execute(
            "UPDATE nodes SET parent = ?2, name = ?1, ctime_ns = ?3 WHERE ino = ?1",
            params![node, ORPHAN_PARENT, now],
        )?;
    } else {
        delete_node(tx, node)?;
    }
    Ok(true)
}

/// How many further names (hard links) node `ino` has.
fn links_of(db: &Connection, ino: Ino) -> Result<u32, CatalogError> {
    Ok(db.query_row(
        "SELECT COUNT(*) FROM nodes WHERE kind = 'link' AND target = CAST(?1 AS TEXT)",
        [ino],
        |r| r.get(0),
    )?)
}

/// Deletes a node and its attributes; its versions not yet uploaded are
/// dropped (committed ones stay on record for retention and gc).
fn delete_node(tx: &Connection, ino: Ino) -> Result<(), CatalogError> {
    tx.execute("DELETE FROM nodes WHERE ino = ?1", [ino])?;
    // (None are left: the last name goes last. A name must never lead
    // nowhere, whatever a damaged catalog holds.)
    tx.execute(
        "DELETE FROM nodes WHERE kind = 'link' AND target = CAST(?1 AS TEXT)",
        [ino],
    )?;
    tx.execute("DELETE FROM xattrs WHERE ino = ?1", [ino])?;
    tx.execute(
        "UPDATE versions SET state = 'dropped' WHERE ino = ?1 AND state = 'staged'",
        [ino],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_versions(cat: &mut Catalog, name: &str, caps: &[&str]) -> Ino {
        let new = NewNode {
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            target: None,
        };
        let ino = cat.create(ROOT_INO, name, &new).unwrap().ino;
        for cap in caps {
            let num = cat.add_version(ino, 1, "", VersionState::Staged, None, None).unwrap();
            cat.commit_version(ino, num, cap, "00").unwrap();
        }
        ino
    }

    fn caps(cat: &Catalog, ino: Ino) -> Vec<(i64, String)> {
        cat.versions(ino)
            .unwrap()
            .into_iter()
            .map(|v| (v.num, v.cap.unwrap()))
            .collect()
    }

    #[test]
    fn carried_history_sits_below_and_is_never_carried_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalog::open(&dir.path().join("c.db")).unwrap();
        let a = file_with_versions(&mut cat, "a", &["a1", "a2"]);
        let b = file_with_versions(&mut cat, "b", &["b1"]);
        assert_eq!(cat.adopt_history(a, b).unwrap(), 2);
        let want = vec![(-1, "a1".to_string()), (0, "a2".into()), (1, "b1".into())];
        assert_eq!(caps(&cat, b), want);
        // Renamed back and forth: nothing b already names is added again.
        assert_eq!(cat.adopt_history(a, b).unwrap(), 0);
        assert_eq!(caps(&cat, b), want);
        // A file whose only versions are carried still numbers its own from 1.
        let c = file_with_versions(&mut cat, "c", &[]);
        cat.adopt_history(b, c).unwrap();
        assert_eq!(cat.next_version_num(c).unwrap(), 1);
        assert_eq!(caps(&cat, c).first().unwrap().0, -2);
    }
}
