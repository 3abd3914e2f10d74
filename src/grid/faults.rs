//! A testing aid: a wrapper that makes any server slow, stalled, flaky,
//! full or lying, as configured under `[server.faults]`. Real faults (a
//! killed process, a removed directory, a full tmpfs) are used wherever a
//! test can produce them; these are the ones it cannot produce on demand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Block, Server, ServerError, ShareSink};
use crate::codec::StorageIndex;
use crate::config::FaultConfig;

pub struct FaultyServer {
    inner: Arc<dyn Server>,
    faults: Arc<Faults>,
}

struct Faults {
    config: FaultConfig,
    rng: Mutex<StdRng>,
    /// Share bytes written through this wrapper, for fill-up and
    /// mid-upload stalls.
    written: AtomicU64,
}

impl FaultyServer {
    pub fn new(inner: Arc<dyn Server>, config: FaultConfig) -> FaultyServer {
        let rng = Mutex::new(StdRng::seed_from_u64(config.seed));
        FaultyServer {
            inner,
            faults: Arc::new(Faults {
                config,
                rng,
                written: AtomicU64::new(0),
            }),
        }
    }
}

fn injected(what: &str) -> ServerError {
    ServerError::Io(std::io::Error::other(format!("injected fault: {what}")))
}

impl Faults {
    fn draw(&self, rate: f64) -> bool {
        rate > 0.0 && self.rng.lock().expect("lock").gen_bool(rate)
    }

    fn stalled(&self) -> bool {
        let c = &self.config;
        c.stall || c.stall_flag.as_ref().is_some_and(|f| f.exists())
    }

    /// What every request goes through first: delay, stall, random error.
    async fn before(&self) -> Result<(), ServerError> {
        if self.config.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.config.delay_ms)).await;
        }
        while self.stalled() {
            // Hang like a server that never answers; the caller's time-out
            // is what ends this. A lifted flag lets the request through.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.draw(self.config.error_rate) {
            return Err(injected("I/O error"));
        }
        Ok(())
    }

    async fn before_write(&self, len: u64) -> Result<(), ServerError> {
        self.before().await?;
        let total = self.written.fetch_add(len, Ordering::SeqCst) + len;
        if self.config.stall_after_bytes.is_some_and(|limit| total > limit) {
            std::future::pending::<()>().await;
        }
        if self.config.capacity_bytes.is_some_and(|cap| total > cap) {
            self.written.fetch_sub(len, Ordering::SeqCst);
            return Err(ServerError::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "injected fault: no space left on device",
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Server for FaultyServer {
    async fn create_share(&self, si: StorageIndex, share: u16) -> Result<Box<dyn ShareSink>, ServerError> {
        self.faults.before().await?;
        let inner = self.inner.create_share(si, share).await?;
        Ok(Box::new(FaultySink {
            inner,
            faults: self.faults.clone(),
        }))
    }

    async fn read(&self, si: StorageIndex, share: u16, offset: u64, len: u64) -> Result<Vec<u8>, ServerError> {
        self.faults.before().await?;
        let mut data = self.inner.read(si, share, offset, len).await?;
        if !data.is_empty() && self.faults.draw(self.faults.config.corrupt_read_rate) {
            let bit = self.faults.rng.lock().expect("lock").gen_range(0..data.len() * 8);
            data[bit / 8] ^= 1 << (bit % 8);
        }
        Ok(data)
    }

    async fn share_len(&self, si: StorageIndex, share: u16) -> Result<u64, ServerError> {
        self.faults.before().await?;
        self.inner.share_len(si, share).await
    }

    async fn shares(&self, si: StorageIndex) -> Result<Vec<u16>, ServerError> {
        self.faults.before().await?;
        self.inner.shares(si).await
    }

    async fn delete(&self, si: StorageIndex, share: u16) -> Result<(), ServerError> {
        self.faults.before().await?;
        self.inner.delete(si, share).await
    }

    async fn clean_abandoned(&self) -> Result<usize, ServerError> {
        self.faults.before().await?;
        self.inner.clean_abandoned().await
    }

    async fn put_record(&self, name: &str, data: Vec<u8>) -> Result<(), ServerError> {
        self.faults.before().await?;
        self.inner.put_record(name, data).await
    }

    async fn get_record(&self, name: &str) -> Result<Option<Vec<u8>>, ServerError> {
        self.faults.before().await?;
        self.inner.get_record(name).await
    }

    async fn list_records(&self, prefix: &str) -> Result<Vec<String>, ServerError> {
        self.faults.before().await?;
        self.inner.list_records(prefix).await
    }

    async fn delete_record(&self, name: &str) -> Result<(), ServerError> {
        self.faults.before().await?;
        self.inner.delete_record(name).await
    }
}

struct FaultySink {
    inner: Box<dyn ShareSink>,
    faults: Arc<Faults>,
}

#[async_trait]
impl ShareSink for FaultySink {
    async fn write(&mut self, block: Block) -> Result<(), ServerError> {
        self.faults.before_write(block.data.len() as u64).await?;
        self.inner.write(block).await
    }

    async fn seal(&mut self) -> Result<(), ServerError> {
        self.faults.before().await?;
        self.inner.seal().await
    }

    async fn publish(self: Box<Self>) -> Result<(), ServerError> {
        self.faults.before().await?;
        self.inner.publish().await
    }

    async fn abort(self: Box<Self>) {
        self.inner.abort().await
    }
}
