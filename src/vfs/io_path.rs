//! Which data path the mount uses, as the platform adapter found it: what
//! the kernel caches and how far it reads ahead. `cairn status` shows it,
//! since each part depends on the kernel and on privileges (issue 23).

use serde::{Deserialize, Serialize};

use super::Vfs;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IoPath {
    /// How long the kernel keeps a file's pages: "kept until changed
    /// elsewhere" when the kernel drops them only when told (a restore, a
    /// change from another machine), or why it drops them sooner.
    pub page_cache: String,
    /// The kernel's read-ahead for the mount, in KiB (0: not known).
    pub read_ahead_kib: u32,
    /// Why the read-ahead is not the one cairn asks for, if it is not.
    pub read_ahead_note: Option<String>,
}

impl Vfs {
    /// Records part of the data path; the adapter calls it as it learns.
    pub fn set_io_path(&self, change: impl FnOnce(&mut IoPath)) {
        change(&mut self.io_path.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn io_path(&self) -> IoPath {
        self.io_path.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
