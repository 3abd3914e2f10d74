//! The local staging area under `$CAIRN_HOME`: everything written stays here
//! until the grid holds it.
//!
//! - [`snapshot`]: stable copies of outside files for `cairn put`.
//! - [`chunks`]: the mount's staging cache. Files are stored as fixed-size
//!   chunk files; sealed versions are immutable and share unchanged chunks
//!   with each other by hard link, so reopening a large file for a small
//!   edit copies one chunk, not the file.

pub mod chunks;
pub mod snapshot;

pub use snapshot::{snapshot, Snapshot, SnapshotError};

/// (total, free to unprivileged users) bytes of the file system holding `path`.
pub fn fs_space(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills the struct we own from a valid C string.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize))
}
