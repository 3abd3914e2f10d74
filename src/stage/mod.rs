//! The local staging area under `$CAIRN_HOME`: everything written stays here
//! until the grid holds it.
//!
//! - [`snapshot`]: stable copies of outside files for `cairn put`.
//! - [`chunks`]: the mount's staging cache. Files are stored as fixed-size
//!   chunk files; sealed versions are immutable and share unchanged chunks
//!   with each other by hard link, so reopening a large file for a small
//!   edit copies one chunk, not the file.
//! - [`recovery`]: the cache's layout, sealing into it, crash recovery.
//! - [`evict`]: which clean chunks leave the cache over its bound.
//! - [`sums`]: the SHA-256 of every chunk of a sealed version, checked
//!   before its bytes are served or uploaded.

pub mod chunks;
pub mod evict;
pub mod recovery;
pub mod snapshot;
pub mod spare;
pub mod sums;

pub use snapshot::{snapshot, Snapshot, SnapshotError};
