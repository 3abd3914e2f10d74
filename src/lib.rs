//! cairn: a mounted drive whose files live on a grid of storage servers as
//! encrypted, erasure-coded shares. See docs/ARCHITECTURE.md.

pub mod bench;
pub mod budget;
pub mod catalog;
pub mod codec;
pub mod config;
pub mod control;
pub mod download;
#[cfg(unix)]
pub mod fuse;
pub mod gc;
pub mod grid;
pub mod home;
pub mod manifest;
pub mod namespace;
pub mod repair;
pub mod stage;
pub mod sync;
pub mod sys;
pub mod upload;
pub mod vfs;
pub mod winfsp;
#[cfg(windows)]
pub mod winsec;
