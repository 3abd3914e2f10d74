//! Per-node handle counting: what happens on each node's last Cleanup.
//!
//! Windows sends Cleanup when an application closes its handle, and Close
//! only when the system lets go of the file object, which may be much later
//! (an antivirus scan held one for an hour) or never for files open at
//! unmount. So the adapter seals on the **last Cleanup** of a node that was
//! written, never on Close. All WinFsp handles of a node share one core
//! file handle; it is released on the last Cleanup, which is what seals.
//! A delete (SetDelete, or a delete-on-close open) is carried out on the
//! last Cleanup too, and a deleted node is never sealed or uploaded.

use std::collections::HashMap;

/// What the adapter does after a Cleanup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCleanup {
    /// Other handles remain: nothing yet.
    Keep,
    /// The last handle: release the core handle (`fh`); the core seals the
    /// node if it was written since it was opened.
    Release { fh: Option<u64>, written: bool },
    /// The last handle of a node to delete: remove its name, then release
    /// `fh`, so the core discards what was written instead of sealing it.
    Delete { fh: Option<u64> },
}

#[derive(Debug, Default)]
struct Node {
    handles: u32,
    fh: Option<u64>,
    writable: bool,
    written: bool,
}

/// Open WinFsp handles by node.
#[derive(Debug, Default)]
pub struct OpenNodes {
    nodes: HashMap<u64, Node>,
}

/// Whether a new handle can use the node's core handle or needs one opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The shared core handle serves this access.
    Shared(u64),
    /// Open a core handle (for writing if `write`) and [`OpenNodes::attach`] it.
    Open { write: bool },
}

impl OpenNodes {
    /// A handle opens on `ino`; returns what core handle it needs.
    pub fn open(&mut self, ino: u64, write: bool) -> Need {
        let node = self.nodes.entry(ino).or_default();
        node.handles += 1;
        match node.fh {
            Some(fh) if node.writable || !write => Need::Shared(fh),
            _ => Need::Open { write },
        }
    }

    /// Records the core handle opened for `ino`; returns the one it
    /// replaces (a read-only handle upgraded for writing), to release.
    pub fn attach(&mut self, ino: u64, fh: u64, writable: bool) -> Option<u64> {
        let node = self.nodes.entry(ino).or_default();
        node.writable |= writable;
        node.fh.replace(fh)
    }

    /// An open failed after [`open`](Self::open) counted it.
    pub fn abandon(&mut self, ino: u64) -> Option<u64> {
        let node = self.nodes.get_mut(&ino)?;
        node.handles -= 1;
        if node.handles == 0 {
            return self.nodes.remove(&ino).and_then(|n| n.fh);
        }
        None
    }

    pub fn wrote(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.written = true;
        }
    }

    /// The node's shared core handle, while any handle is open.
    pub fn fh(&self, ino: u64) -> Option<u64> {
        self.nodes.get(&ino)?.fh
    }

    pub fn handles(&self, ino: u64) -> u32 {
        self.nodes.get(&ino).map_or(0, |n| n.handles)
    }

    /// One handle of `ino` is cleaned up; `delete` is WinFsp's delete flag
    /// (set on the last Cleanup of a node marked for deletion).
    pub fn cleanup(&mut self, ino: u64, delete: bool) -> AfterCleanup {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return AfterCleanup::Keep;
        };
        node.handles = node.handles.saturating_sub(1);
        if node.handles > 0 && !delete {
            return AfterCleanup::Keep;
        }
        let node = self.nodes.remove(&ino).expect("present");
        if delete {
            AfterCleanup::Delete { fh: node.fh }
        } else {
            AfterCleanup::Release {
                fh: node.fh,
                written: node.written,
            }
        }
    }

    /// Nodes with handles still open.
    #[cfg(test)]
    fn open_nodes(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_handles_seal_once_on_the_last_cleanup() {
        let mut nodes = OpenNodes::default();
        assert_eq!(nodes.open(7, true), Need::Open { write: true });
        assert_eq!(nodes.attach(7, 100, true), None);
        assert_eq!(nodes.open(7, true), Need::Shared(100));
        nodes.wrote(7);
        assert_eq!(nodes.cleanup(7, false), AfterCleanup::Keep);
        assert_eq!(
            nodes.cleanup(7, false),
            AfterCleanup::Release {
                fh: Some(100),
                written: true
            }
        );
        assert_eq!(nodes.handles(7), 0);
    }

    #[test]
    fn a_read_only_handle_is_upgraded_for_a_writer() {
        let mut nodes = OpenNodes::default();
        assert_eq!(nodes.open(3, false), Need::Open { write: false });
        nodes.attach(3, 10, false);
        assert_eq!(nodes.open(3, false), Need::Shared(10));
        assert_eq!(nodes.open(3, true), Need::Open { write: true });
        assert_eq!(nodes.attach(3, 11, true), Some(10), "the read-only handle is released");
        assert_eq!(nodes.open(3, false), Need::Shared(11));
    }

    #[test]
    fn untouched_nodes_release_without_a_write() {
        let mut nodes = OpenNodes::default();
        nodes.open(5, true);
        nodes.attach(5, 1, true);
        assert_eq!(
            nodes.cleanup(5, false),
            AfterCleanup::Release {
                fh: Some(1),
                written: false
            }
        );
    }

    #[test]
    fn delete_on_the_last_cleanup_never_seals() {
        let mut nodes = OpenNodes::default();
        nodes.open(9, true);
        nodes.attach(9, 4, true);
        nodes.wrote(9);
        // A delete-on-close temp file (Word's ~$ owner file).
        assert_eq!(nodes.cleanup(9, true), AfterCleanup::Delete { fh: Some(4) });
        assert_eq!(
            nodes.cleanup(9, false),
            AfterCleanup::Keep,
            "gone: a late Cleanup does nothing"
        );
    }

    #[test]
    fn a_failed_open_gives_its_count_back() {
        let mut nodes = OpenNodes::default();
        nodes.open(2, false);
        assert_eq!(nodes.abandon(2), None);
        assert_eq!(nodes.handles(2), 0);
        assert!(nodes.open_nodes().is_empty());
    }
}
