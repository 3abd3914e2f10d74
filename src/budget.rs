//! What every upload of a process shares: a memory budget for share blocks
//! in flight, and a spill queue on disk for servers that fall behind.
//!
//! A block waiting for a slow server goes to disk instead of memory, so a
//! slow server costs disk space, not RAM, and never slows the others. When
//! the spill space is used up, the server that needs more counts as failed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::sys::PositionalIo;

/// Share of the spill directory's free space used when no limit is set.
const DEFAULT_SPILL_FRACTION: u64 = 10;

pub struct Budget {
    memory: Arc<Semaphore>,
    memory_limit: u64,
    spill_dir: PathBuf,
    spill_limit: u64,
    spill_used: Arc<AtomicU64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("spill queue full ({limit_mib} MiB on disk): the server is too slow")]
    Full { limit_mib: u64 },
    #[error("spill queue: {0}")]
    Io(#[from] std::io::Error),
}

impl Budget {
    /// `memory` bytes of blocks in RAM; `spill_limit` bytes on disk under
    /// `spill_dir`, or 10% of its free space when unset.
    pub fn new(memory: u64, spill_dir: PathBuf, spill_limit: Option<u64>) -> Budget {
        let spill_limit = spill_limit.unwrap_or_else(|| free_space(&spill_dir) / DEFAULT_SPILL_FRACTION);
        Budget {
            memory: Arc::new(Semaphore::new(memory as usize)),
            memory_limit: memory,
            spill_dir,
            spill_limit,
            spill_used: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Memory for one block, if the budget has room now.
    pub fn try_memory(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let len = u32::try_from(len).ok()?;
        self.memory.clone().try_acquire_many_owned(len).ok()
    }

    /// Memory for one block, waiting for room; `None` for a block larger
    /// than the whole budget, which then goes uncounted rather than never.
    pub async fn wait_memory(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let len = u32::try_from(len).ok().filter(|&l| l as u64 <= self.memory_limit)?;
        self.memory.clone().acquire_many_owned(len).await.ok()
    }

    pub fn memory_limit(&self) -> u64 {
        self.memory_limit
    }

    pub fn memory_in_use(&self) -> u64 {
        self.memory_limit - self.memory.available_permits() as u64
    }

    pub fn spill_in_use(&self) -> u64 {
        self.spill_used.load(Ordering::SeqCst)
    }

    /// An anonymous file beside the spill queues for a large value made
    /// once and read back in order (a checkpoint), rather than held in
    /// memory; not counted against the spill limit.
    pub(crate) fn scratch_file(&self) -> std::io::Result<std::fs::File> {
        std::fs::create_dir_all(&self.spill_dir)?;
        tempfile::tempfile_in(&self.spill_dir)
    }

    /// A new, anonymous spill file: it has no name, so a crash leaves
    /// nothing behind.
    pub(crate) fn spill_file(&self) -> Result<SpillFile, SpillError> {
        std::fs::create_dir_all(&self.spill_dir)?;
        Ok(SpillFile {
            file: tempfile::tempfile_in(&self.spill_dir)?,
            end: AtomicU64::new(0),
            used: self.spill_used.clone(),
            limit: self.spill_limit,
        })
    }
}

/// Free bytes of the file system holding `dir` (or its nearest existing
/// ancestor); zero if it cannot be asked.
fn free_space(dir: &std::path::Path) -> u64 {
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(dir);
    crate::sys::fs_space(existing).map_or(0, |(_, free)| free)
}

/// One server's queue of spilled blocks, written and read in order.
pub(crate) struct SpillFile {
    file: std::fs::File,
    end: AtomicU64,
    used: Arc<AtomicU64>,
    limit: u64,
}

impl SpillFile {
    /// Appends a block, charged to the shared spill limit.
    pub fn push(self: &Arc<Self>, block: &[u8]) -> Result<Spilled, SpillError> {
        let len = block.len() as u64;
        if self.used.fetch_add(len, Ordering::SeqCst) + len > self.limit {
            self.used.fetch_sub(len, Ordering::SeqCst);
            return Err(SpillError::Full {
                limit_mib: self.limit >> 20,
            });
        }
        let spilled = Spilled {
            file: self.clone(),
            offset: self.end.fetch_add(len, Ordering::SeqCst),
            len,
        };
        self.file.write_all_at(block, spilled.offset)?;
        Ok(spilled)
    }
}

/// A block on disk. Dropping it frees its space and its charge.
pub(crate) struct Spilled {
    file: Arc<SpillFile>,
    offset: u64,
    len: u64,
}

impl Spilled {
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0; self.len as usize];
        self.file.file.read_exact_at(&mut buf, self.offset)?;
        Ok(buf)
    }
}

impl Drop for Spilled {
    fn drop(&mut self) {
        // Give the disk space back as the queue drains, not only when the
        // upload ends; on a file system without hole punching it comes back
        // when the (unnamed) file is closed.
        crate::sys::punch_hole(&self.file.file, self.offset, self.len);
        self.file.used.fetch_sub(self.len, Ordering::SeqCst);
    }
}
