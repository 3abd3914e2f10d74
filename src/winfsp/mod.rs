//! The WinFsp adapter: Windows Explorer, Word and robocopy over the same
//! platform-neutral [`Vfs`](crate::vfs::Vfs) core the FUSE adapter serves.
//!
//! Everything that decides something is plain Rust, compiled and tested on
//! every platform:
//! - [`status`]: core errors to NTSTATUS, in one function;
//! - [`time`]: FILETIME conversion;
//! - [`names`]: reversible escaping of names Windows forbids, UTF-16
//!   lengths, and the case-insensitive, case-preserving lookup rule;
//! - [`handles`]: per-node handle counting that decides, on the last
//!   Cleanup, whether a node is sealed, deleted or left alone;
//! - [`attributes`]: DOS attributes and creation time kept beside a node;
//! - [`volume`]: the volume parameters, as data.
//!
//! The `cfg(windows)` [`ffi`] layer only decodes WinFsp's arguments, calls
//! the core through these rules and encodes the results.

pub mod attributes;
pub mod handles;
pub mod names;
pub mod status;
pub mod time;
pub mod volume;

#[cfg(windows)]
pub mod ffi;
