//! The grid: storage servers holding shares, and the back ends that reach them.
//!
//! A server stores opaque share files named by storage index and share number.
//! Writing a share is two-phase: bytes go to a private staging name, and the
//! share becomes visible to readers only on `publish`, so an abandoned upload
//! never leaves anything a reader could take for a share.

mod dir;
mod faults;
mod s3;

pub use dir::DirServer;
pub use faults::FaultyServer;
pub use s3::S3Server;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::budget::Budget;
use crate::codec::{tagged_hash, StorageIndex};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("share not found")]
    NotFound,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("short read: {got} of {wanted} bytes at offset {offset}")]
    Short { offset: u64, wanted: u64, got: u64 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// Longest mutable record a server may return (pointer records are about
/// 200 bytes).
pub const MAX_RECORD: u64 = 64 << 10;

/// Most record names one listing may return: a drive's records are a few
/// per machine plus its log records, which gc thins.
pub const MAX_LISTED: usize = 1 << 20;

fn too_many_records() -> ServerError {
    ServerError::Other(format!("more than {MAX_LISTED} records listed"))
}

fn record_too_long(len: u64) -> ServerError {
    ServerError::Other(format!(
        "record of {len} bytes or more, longer than any cairn writes ({MAX_RECORD})"
    ))
}

/// One storage server, whatever its back end.
#[async_trait]
pub trait Server: Send + Sync {
    /// Starts writing a share; nothing is visible until `publish`.
    async fn create_share(&self, si: StorageIndex, share: u16) -> Result<Box<dyn ShareSink>, ServerError>;
    /// Exactly `len` bytes at `offset` of a published share.
    async fn read(&self, si: StorageIndex, share: u16, offset: u64, len: u64) -> Result<Vec<u8>, ServerError>;
    /// Length in bytes of a published share.
    async fn share_len(&self, si: StorageIndex, share: u16) -> Result<u64, ServerError>;
    /// Share numbers of `si` this server holds.
    async fn shares(&self, si: StorageIndex) -> Result<Vec<u16>, ServerError>;
    async fn delete(&self, si: StorageIndex, share: u16) -> Result<(), ServerError>;
    /// Removes what uploads of crashed processes left half-written;
    /// returns how many objects went.
    async fn clean_abandoned(&self) -> Result<usize, ServerError>;
    /// Replaces the small mutable record `name` at once: a reader sees the
    /// old bytes or the new, never a mixture.
    async fn put_record(&self, name: &str, data: Vec<u8>) -> Result<(), ServerError>;
    /// The record `name`, or `None` if there is none. A record longer than
    /// [`MAX_RECORD`] is an error, found before it is held in memory.
    async fn get_record(&self, name: &str) -> Result<Option<Vec<u8>>, ServerError>;
    /// Names of the records starting with `prefix`, in no order; at most
    /// [`MAX_LISTED`] (more is an error: no cairn writes that many).
    async fn list_records(&self, prefix: &str) -> Result<Vec<String>, ServerError>;
    /// Removes record `name`; removing one that is not there is no error.
    async fn delete_record(&self, name: &str) -> Result<(), ServerError>;
}

/// Bytes on their way into a share, with the memory budget they hold (if
/// any): a sink that keeps the bytes after `write` returns keeps the
/// permit with them, so buffered bytes stay counted.
pub struct Block {
    pub data: Vec<u8>,
    pub memory: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl From<Vec<u8>> for Block {
    fn from(data: Vec<u8>) -> Block {
        Block { data, memory: None }
    }
}

/// A share being written. Dropping it without `publish` leaves at most an
/// invisible staging object behind, which `abort` or a cleaner removes.
#[async_trait]
pub trait ShareSink: Send {
    async fn write(&mut self, block: Block) -> Result<(), ServerError>;
    /// Makes the written bytes durable, still invisible to readers.
    async fn seal(&mut self) -> Result<(), ServerError>;
    /// Makes the share visible under its final name.
    async fn publish(self: Box<Self>) -> Result<(), ServerError>;
    async fn abort(self: Box<Self>);
}

/// A server of the grid with its configured name.
#[derive(Clone)]
pub struct GridServer {
    pub name: String,
    pub server: Arc<dyn Server>,
}

/// The configured servers and the rules for using them.
pub struct Grid {
    pub servers: Vec<GridServer>,
    /// Longest wait for any one server request.
    pub timeout: Duration,
    /// How long a read waits for a server before asking another as well.
    pub hedge_after: Duration,
    /// Memory and spill space shared by every upload through this grid.
    pub budget: Arc<Budget>,
}

impl Grid {
    /// The grid of `config`; uploads spill blocks for slow servers under
    /// `state_dir/spill`.
    pub fn from_config(config: &Config, state_dir: &Path) -> anyhow::Result<Grid> {
        let servers = config
            .servers
            .iter()
            .map(|s| {
                let server = match s.backend.as_str() {
                    "dir" => Arc::new(DirServer {
                        root: s.path.clone().expect("validated"),
                    }) as Arc<dyn Server>,
                    "s3" => Arc::new(S3Server::new(s, config.timeout(), state_dir)?),
                    other => unreachable!("config validation admits no back end {other}"),
                };
                Ok(GridServer {
                    name: s.name.clone(),
                    server: match &s.faults {
                        Some(f) => Arc::new(FaultyServer::new(server, f.clone())),
                        None => server,
                    },
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let g = &config.grid;
        Ok(Grid {
            servers,
            timeout: config.timeout(),
            hedge_after: config.hedge_after(),
            budget: Arc::new(Budget::new(
                g.memory_budget_mib << 20,
                state_dir.join("spill"),
                g.spill_limit_mib.map(|m| m << 20),
            )),
        })
    }

    /// Server indices in the order a version's shares are placed: a
    /// permutation keyed by storage index, so load spreads across servers and
    /// a reader can predict where shares are.
    pub fn permuted(&self, si: StorageIndex) -> Vec<usize> {
        let mut order: Vec<(crate::codec::Hash, usize)> = self
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| (tagged_hash(b"cairn-v1-permute", &[&si.0, s.name.as_bytes()]), i))
            .collect();
        order.sort();
        order.into_iter().map(|(_, i)| i).collect()
    }

    /// Removes, on every server, what uploads of crashed processes left
    /// half-written (partial files, incomplete multipart uploads); returns
    /// how many went. A server that cannot be asked is logged and skipped.
    pub async fn clean_abandoned(&self) -> usize {
        let mut total = 0;
        for s in &self.servers {
            match self.timed(s.server.clean_abandoned()).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(server = %s.name, n, "removed abandoned partial shares");
                    total += n;
                }
                Err(e) => tracing::warn!(server = %s.name, error = %e, "could not clean abandoned shares"),
            }
        }
        total
    }

    /// Runs one server request under the grid's time-out.
    pub async fn timed<T>(&self, fut: impl Future<Output = Result<T, ServerError>>) -> Result<T, ServerError> {
        timed(self.timeout, fut).await
    }
}

/// Whether the process named in an abandoned-upload marker still runs.
fn process_alive(pid: Option<u32>) -> bool {
    pid.is_some_and(crate::sys::process_alive)
}

pub async fn timed<T>(limit: Duration, fut: impl Future<Output = Result<T, ServerError>>) -> Result<T, ServerError> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(ServerError::Timeout(limit)))
}
