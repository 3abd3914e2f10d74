//! Stable snapshots of files that may still change.
//!
//! `cairn put` never encodes a live file. It first takes a snapshot under
//! `$CAIRN_HOME/stage` (a reflink where the file system can, else a copy) and
//! checks that the source did not change while it was taken, so what is
//! uploaded is exactly one state the file had (Tahoe-LAFS ticket #427).

use std::path::{Path, PathBuf};
use std::time::Duration;

const ATTEMPTS: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} kept changing while it was read ({attempts} attempts); nothing was uploaded. Try again when it is not being written")]
    Unstable { path: PathBuf, attempts: u32 },
    #[error("{0}: not a regular file")]
    NotAFile(PathBuf),
}

/// A private, immutable copy of a source file. Removed on drop.
#[derive(Debug)]
pub struct Snapshot {
    pub path: PathBuf,
    pub size: u64,
    pub reflinked: bool,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What identifies one state of a file: if none of these changed, no write
/// happened in between (see `snapshot` for the clock-granularity rule).
#[derive(Debug, PartialEq, Eq)]
struct FileState {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileState {
    #[cfg(unix)]
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileState {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Windows has no inode or change time in stable std: size, write time
    /// and creation time (a replaced file gets a new one) stand in.
    #[cfg(windows)]
    fn of(meta: &std::fs::Metadata) -> Self {
        let stamp = |t: std::io::Result<std::time::SystemTime>| {
            let d = t
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .unwrap_or_default();
            (d.as_secs() as i64, d.subsec_nanos() as i64)
        };
        FileState {
            dev: 0,
            ino: 0,
            size: meta.len(),
            mtime: stamp(meta.modified()),
            ctime: stamp(meta.created()),
        }
    }
}

/// Takes a stable snapshot of `src` into `stage_dir`.
///
/// A write during the copy changes the ctime to a value at or after the
/// moment the attempt began. So an attempt is trusted only if the source's
/// ctime was strictly older than that moment (else a write in the same
/// clock tick could leave ctime unchanged) and nothing changed across it.
pub fn snapshot(src: &Path, stage_dir: &Path) -> Result<Snapshot, SnapshotError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| SnapshotError::Io { path, source }
    };
    std::fs::create_dir_all(stage_dir).map_err(io_err(stage_dir))?;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(20 << attempt.min(5)));
        }
        let started = crate::sys::coarse_now();
        let mut source = std::fs::File::open(src).map_err(io_err(src))?;
        let before_meta = source.metadata().map_err(io_err(src))?;
        if !before_meta.is_file() {
            return Err(SnapshotError::NotAFile(src.to_owned()));
        }
        let before = FileState::of(&before_meta);
        if before.ctime >= started {
            tracing::info!(path = %src.display(), attempt, "source changed during snapshot (this clock tick); retrying");
            continue;
        }
        let dest = stage_dir.join(format!("snapshot-{:016x}", rand::random::<u64>()));
        let mut out = std::fs::File::create_new(&dest).map_err(io_err(&dest))?;
        let snap = Snapshot {
            path: dest.clone(),
            size: before.size,
            reflinked: crate::sys::reflink(&source, &out),
        };
        if !snap.reflinked {
            std::io::copy(&mut source, &mut out).map_err(io_err(src))?;
        }
        let copied = out.metadata().map_err(io_err(&dest))?.len();
        let after = FileState::of(&std::fs::metadata(src).map_err(io_err(src))?);
        if after == before && copied == before.size {
            out.sync_all().map_err(io_err(&dest))?;
            return Ok(snap);
        }
        tracing::info!(path = %src.display(), attempt, "source changed during snapshot; retrying");
    }
    Err(SnapshotError::Unstable {
        path: src.to_owned(),
        attempts: ATTEMPTS,
    })
}
