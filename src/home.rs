//! `$CAIRN_HOME`: the catalog (root capability, every file capability),
//! config.toml (S3 credentials) and the staging cache (plaintext). It is the
//! owner's alone: cairn runs with a private umask, tightens a home an older
//! cairn left readable, refuses one that someone else owns or can write, and
//! lets one process at a time change it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error(
        "{dir} is owned by user {owner}, not by you (user {me}): cairn keeps its secrets there and will not \
         use another user's directory; set CAIRN_HOME to a directory of your own"
    )]
    NotOwned { dir: PathBuf, owner: String, me: String },
    #[error(
        "{dir} can be written by other users (mode {mode:o}), who could replace cairn's catalog or staged \
         files; fix it with `chmod 700 {dir}`"
    )]
    Writable { dir: PathBuf, mode: u32 },
    #[error("{dir} is not a directory")]
    NotADirectory { dir: PathBuf },
    #[error(
        "{dir} is in use by {holder}; stop it first (one cairn at a time may change a CAIRN_HOME: \
         two would undo each other's staging and catalog)"
    )]
    Busy { dir: PathBuf, holder: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The umask the process was started with, for the files it writes for
/// the user outside the home.
static USER_UMASK: AtomicU32 = AtomicU32::new(0o022);

/// Files and directories this process creates are its owner's only,
/// whatever umask it was started with.
pub fn private_umask() {
    #[cfg(unix)]
    // SAFETY: umask only swaps the process's creation mask.
    let previous = unsafe { libc::umask(0o077) } as u32;
    #[cfg(windows)]
    let previous = 0o022;
    USER_UMASK.store(previous, Ordering::Relaxed);
}

/// The mode a file written for the user (`cairn get`'s output) gets: what
/// the user's own umask gives a new file.
pub fn user_file_mode() -> u32 {
    0o666 & !USER_UMASK.load(Ordering::Relaxed)
}

/// Checks (and, if `create`, makes) the home before anything reads or
/// writes in it. A home is refused if another user owns it or anyone but
/// its owner can write it; read and search bits for others (homes made by
/// a cairn before the owner-only rule) are taken away, so nothing below is
/// reachable by them whatever its own mode.
pub fn secure(dir: &Path, create: bool) -> Result<(), HomeError> {
    if create && !dir.exists() {
        make_private_dir_all(dir).map_err(io_at(dir))?;
    }
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(()); // commands that need it say so in their own words
    };
    if !meta.is_dir() {
        return Err(HomeError::NotADirectory { dir: dir.to_owned() });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let me = crate::sys::current_owner().0;
        if meta.uid() != me {
            return Err(HomeError::NotOwned {
                dir: dir.to_owned(),
                owner: meta.uid().to_string(),
                me: me.to_string(),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(HomeError::Writable {
                dir: dir.to_owned(),
                mode,
            });
        }
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_at(dir))?;
            tracing::warn!(dir = %dir.display(), "made the home owner-only (it was mode {mode:o})");
        }
        // The secrets themselves too, in case the home is ever opened up.
        for name in ["catalog.db", "catalog.db-wal", "catalog.db-shm", "config.toml"] {
            let path = dir.join(name);
            if let Ok(m) = std::fs::symlink_metadata(&path) {
                if m.is_file() && m.mode() & 0o077 != 0 {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io_at(&path))?;
                }
            }
        }
    }
    // Windows: an owner-only DACL on the home, inherited by all in it; a
    // home whose DACL still inherits from its parent (new, or made by an
    // older cairn) gets it, once.
    #[cfg(windows)]
    {
        let security = crate::winsec::home_security(dir).map_err(io_at(dir))?;
        if let Some(owner) = security.foreign_owner {
            return Err(HomeError::NotOwned {
                dir: dir.to_owned(),
                owner,
                me: "the current user".into(),
            });
        }
        if !security.protected {
            crate::winsec::make_owner_only(dir).map_err(io_at(dir))?;
            tracing::info!(dir = %dir.display(), "made the home owner-only (its own user and SYSTEM)");
        }
    }
    Ok(())
}

/// `create_dir_all` whose new directories are 0700 even where the process
/// umask was not made private (library users, tests).
pub fn make_private_dir_all(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// The home's exclusive lock, held for as long as a command changes the
/// home (init, mount, put, gc, recover, repair, sync without a daemon). The lock file names its holder
/// so a second command can say who it waits for.
pub struct HomeLock {
    _file: File,
}

impl HomeLock {
    pub fn acquire(dir: &Path, what: &str) -> Result<HomeLock, HomeError> {
        let path = dir.join("lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_at(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.take(256).read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(HomeError::Busy {
                    dir: dir.to_owned(),
                    holder: if holder.is_empty() {
                        "another cairn process".into()
                    } else {
                        holder.to_string()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_at(&path)(e)),
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "`cairn {what}` (pid {})", std::process::id());
        Ok(HomeLock { _file: file })
    }
}

/// Removes what an interrupted `cairn put` left in `stage/` (plaintext
/// snapshots). Only under the home's lock: a running put's snapshot is
/// there too.
pub fn clean_stage(dir: &Path, _lock: &HomeLock) {
    let Ok(entries) = std::fs::read_dir(dir.join("stage")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with("snapshot-") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => tracing::info!(file = %e.path().display(), "removed an interrupted put's snapshot"),
                Err(err) => tracing::warn!(file = %e.path().display(), error = %err, "removing a stale snapshot"),
            }
        }
    }
}
