//! Uploads one sealed, stable file as a version: encode segment by segment,
//! stream blocks to one server per share, commit when happiness holds.
//!
//! Memory is bounded however large the file and however slow the servers:
//! each server has at most `QUEUE_BLOCKS` blocks in memory, all of them
//! within the grid's shared [`Budget`]. The encoder keeps pace with the
//! `happy`-th fastest server; blocks for servers behind that spill to disk
//! ([`crate::budget::SpillFile`]), and a server whose spill no longer fits, or whose
//! request times out, is dropped from the upload.

pub mod pack;
pub mod schedule;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::budget::{Budget, SpillError, SpillFile, Spilled};
use crate::codec::{Capability, Hash, Key, StorageIndex, VersionEncoder, SHARE_MAGIC};
use crate::grid::{timed, Block, Grid, ShareSink};

/// Blocks held in memory per server. Two keep a server busy while the next
/// segment is encoded; more only add memory.
pub const QUEUE_BLOCKS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("reading the version to upload: {0}")]
    Source(std::io::Error),
    #[error(
        "not enough servers took a share: {placed} of {happy} needed for happiness; nothing was committed. {}",
        describe_failures(failures)
    )]
    NotHappy {
        placed: usize,
        happy: usize,
        failures: Vec<(String, String)>,
    },
    #[error("encoder: {0}")]
    Codec(#[from] crate::codec::CodecError),
}

fn describe_failures(failures: &[(String, String)]) -> String {
    let parts: Vec<String> = failures.iter().map(|(s, e)| format!("{s}: {e}")).collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("Failures: {}", parts.join("; "))
    }
}

#[derive(Debug, Clone)]
pub struct UploadReport {
    pub cap: Capability,
    pub plaintext_sha256: Hash,
    /// (share number, server name) of every published share.
    pub placed: Vec<(u16, String)>,
    /// (server name, error) of every server dropped along the way.
    pub failures: Vec<(String, String)>,
}

/// What the caller learns as the upload goes.
pub trait Progress: Send + Sync {
    fn advance(&self, _plaintext_bytes: u64) {}
}
impl Progress for () {}

/// A stable byte source of known size: a sealed version or a snapshot.
/// It must not change while it is read.
pub struct Source {
    pub reader: Box<dyn std::io::Read + Send>,
    pub size: u64,
}

impl Source {
    pub fn file(path: &Path) -> std::io::Result<Source> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Source {
            reader: Box::new(file),
            size,
        })
    }
}

/// Uploads one version of `source` under `key`.
pub async fn upload(
    grid: &Grid,
    params: crate::codec::Params,
    happy: u16,
    source: Source,
    key: Key,
    progress: Arc<dyn Progress>,
) -> Result<UploadReport, UploadError> {
    let Source { reader, size } = source;
    crate::codec::Layout::new(params, size)?;
    let encoder = VersionEncoder::new(params, key, size);
    let si = encoder.storage_index();
    let happy = happy as usize;

    let (sinks, mut failures) = place_shares(grid, si, params.total).await;
    let shared = Arc::new(Shared {
        alive: AtomicUsize::new(sinks.len()),
        drained: (Mutex::new(()), Condvar::new()),
    });
    let mut lanes = Vec::new();
    let mut feeders = Vec::new();
    for (share, server, sink) in sinks {
        let lane = Arc::new(Lane {
            share,
            server,
            in_memory: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            reason: Mutex::new(None),
            cancel: Notify::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        lanes.push(ProducerLane {
            lane: lane.clone(),
            tx: Some(tx),
            spill: None,
        });
        let budget = grid.budget.clone();
        feeders.push(tokio::spawn(feed(sink, rx, lane, budget, grid.timeout, shared.clone())));
    }

    let queue = Queue {
        lanes,
        budget: grid.budget.clone(),
        shared: shared.clone(),
        happy,
    };
    let producer = tokio::task::spawn_blocking(move || produce(reader, encoder, queue, progress));
    let produced = producer.await.expect("encoder thread");

    let mut sealed = Vec::new();
    for f in feeders {
        match f.await.expect("feeder task") {
            Ok(done) => sealed.push(done),
            Err(failure) => failures.push(failure),
        }
    }
    let encoded = match produced {
        Ok(encoded) if sealed.len() >= happy => encoded,
        outcome => {
            let placed = shared.alive.load(Ordering::SeqCst).min(sealed.len());
            for (_, _, sink) in sealed.drain(..) {
                sink.abort().await;
            }
            return Err(match outcome {
                Err(ProduceError::Io(e)) => UploadError::Source(e),
                Err(ProduceError::Codec(e)) => e.into(),
                Err(ProduceError::TooFewServers) | Ok(_) => UploadError::NotHappy {
                    placed,
                    happy,
                    failures,
                },
            });
        }
    };

    let publishes = sealed.into_iter().map(|(share, server, sink)| async move {
        let r = grid.timed(sink.publish()).await;
        (share, server, r)
    });
    let mut placed = Vec::new();
    for (share, server, r) in futures::future::join_all(publishes).await {
        match r {
            Ok(()) => placed.push((share, server)),
            Err(e) => failures.push((server, format!("publish: {e}"))),
        }
    }
    if placed.len() < happy {
        // Too few went visible: withdraw the rest so no reader finds a
        // version the catalog never committed.
        for (share, server) in &placed {
            if let Some(s) = grid.servers.iter().find(|s| &s.name == server) {
                let _ = grid.timed(s.server.delete(si, *share)).await;
            }
        }
        return Err(UploadError::NotHappy {
            placed: placed.len(),
            happy,
            failures,
        });
    }
    placed.sort();
    Ok(UploadReport {
        cap: encoded.cap,
        plaintext_sha256: encoded.plaintext_sha256,
        placed,
        failures,
    })
}

type PlacedSink = (u16, String, Box<dyn ShareSink>);
type Failure = (String, String);

/// Opens one share per distinct server: the first `total` servers in
/// permuted order at once, then spares in order for any that refused.
async fn place_shares(grid: &Grid, si: StorageIndex, total: u16) -> (Vec<PlacedSink>, Vec<Failure>) {
    let open = |idx: usize, share: u16| async move {
        let server = &grid.servers[idx];
        match grid.timed(server.server.create_share(si, share)).await {
            Ok(sink) => Ok((share, server.name.clone(), sink)),
            Err(e) => {
                tracing::warn!(server = %server.name, error = %e, "server refused a share");
                Err((server.name.clone(), e.to_string()))
            }
        }
    };
    let order = grid.permuted(si);
    let first = order.len().min(total as usize);
    let mut spares = order[first..].iter();
    let opened = futures::future::join_all((0..first).map(|share| open(order[share], share as u16))).await;
    let mut placed = Vec::new();
    let mut failures = Vec::new();
    for (share, result) in opened.into_iter().enumerate() {
        let mut result = result;
        loop {
            match result {
                Ok(sink) => placed.push(sink),
                Err(failure) => {
                    failures.push(failure);
                    if let Some(&idx) = spares.next() {
                        result = open(idx, share as u16).await;
                        continue;
                    }
                }
            }
            break;
        }
    }
    (placed, failures)
}

/// State of one upload shared by the encoder and every server's feeder.
struct Shared {
    /// Servers still in the upload.
    alive: AtomicUsize,
    /// Signalled whenever a feeder frees a block of memory.
    drained: (Mutex<()>, Condvar),
}

impl Shared {
    fn signal_drained(&self) {
        let _guard = self.drained.0.lock().expect("lock");
        self.drained.1.notify_all();
    }
}

/// One server's share of an upload, seen by the encoder and the feeder.
struct Lane {
    share: u16,
    server: String,
    /// Blocks queued in memory (not spilled) and not yet written.
    in_memory: AtomicUsize,
    failed: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Wakes a feeder stuck in a request once the server is dropped.
    cancel: Notify,
}

impl Lane {
    /// Drops the server from the upload; the first reason given sticks.
    fn fail(&self, shared: &Shared, reason: String) {
        if !self.failed.swap(true, Ordering::SeqCst) {
            tracing::warn!(server = %self.server, share = self.share, %reason, "dropping server from upload");
            *self.reason.lock().expect("lock") = Some(reason);
            shared.alive.fetch_sub(1, Ordering::SeqCst);
            self.cancel.notify_one();
            shared.signal_drained();
        }
    }

    fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn failure(&self) -> Failure {
        let reason = self.reason.lock().expect("lock").clone();
        (self.server.clone(), reason.unwrap_or_default())
    }
}

enum Queued {
    Memory(Block),
    Spilled(Spilled),
}

/// Writes one queued block. A spilled one is read back into memory
/// counted against the budget like any other.
async fn write_queued(sink: &mut dyn ShareSink, item: Queued, budget: &Budget, limit: Duration) -> Result<(), String> {
    let block = match item {
        Queued::Memory(block) => block,
        Queued::Spilled(spilled) => {
            let memory = timed(limit, async { Ok(budget.wait_memory(spilled.len()).await) })
                .await
                .map_err(|_| format!("no room in the upload memory budget within {limit:?}"))?;
            let read = tokio::task::spawn_blocking(move || spilled.read()).await;
            let data = read
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(|e| format!("reading its spilled blocks: {e}"))?;
            Block { data, memory }
        }
    };
    timed(limit, sink.write(block)).await.map_err(|e| e.to_string())
}

/// Writes one server's queue into its share, in order. After a failure it
/// keeps draining (and dropping) so memory and spill space come back.
async fn feed(
    mut sink: Box<dyn ShareSink>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    lane: Arc<Lane>,
    budget: Arc<Budget>,
    limit: Duration,
    shared: Arc<Shared>,
) -> Result<PlacedSink, Failure> {
    while let Some(item) = rx.recv().await {
        let from_memory = matches!(item, Queued::Memory(_));
        if !lane.is_failed() {
            let written = tokio::select! {
                r = write_queued(&mut *sink, item, &budget, limit) => r,
                () = lane.cancel.notified() => Ok(()),
            };
            if let Err(reason) = written {
                lane.fail(&shared, reason);
            }
        }
        if from_memory {
            lane.in_memory.fetch_sub(1, Ordering::SeqCst);
            shared.signal_drained();
        }
    }
    if !lane.is_failed() {
        if let Err(e) = timed(limit, sink.seal()).await {
            lane.fail(&shared, e.to_string());
        }
    }
    if lane.is_failed() {
        sink.abort().await;
        return Err(lane.failure());
    }
    Ok((lane.share, lane.server.clone(), sink))
}

/// The encoder's side of every server's queue.
struct ProducerLane {
    lane: Arc<Lane>,
    /// Dropped once the server fails, which ends its feeder's queue.
    tx: Option<mpsc::UnboundedSender<Queued>>,
    spill: Option<Arc<SpillFile>>,
}

struct Queue {
    lanes: Vec<ProducerLane>,
    budget: Arc<Budget>,
    shared: Arc<Shared>,
    happy: usize,
}

impl Queue {
    /// Queues one block set (a block per share, by share number): waits
    /// until `happy` servers have room, spills for those that don't.
    fn send(&mut self, blocks: Vec<Vec<u8>>) -> Result<(), ProduceError> {
        self.wait_for_room()?;
        let mut blocks: Vec<Option<Vec<u8>>> = blocks.into_iter().map(Some).collect();
        for pl in &mut self.lanes {
            let lane = &pl.lane;
            if lane.is_failed() {
                pl.tx = None;
            }
            let Some(tx) = &pl.tx else { continue };
            let block = blocks[lane.share as usize].take().expect("one block per share");
            let permit = match lane.in_memory.load(Ordering::SeqCst) < QUEUE_BLOCKS {
                true => self.budget.try_memory(block.len()),
                false => None,
            };
            let item = match permit {
                Some(permit) => {
                    lane.in_memory.fetch_add(1, Ordering::SeqCst);
                    Queued::Memory(Block {
                        data: block,
                        memory: Some(permit),
                    })
                }
                None => match spill(&mut pl.spill, &self.budget, &block, lane) {
                    Ok(spilled) => Queued::Spilled(spilled),
                    Err(e) => {
                        lane.fail(&self.shared, e.to_string());
                        pl.tx = None;
                        continue;
                    }
                },
            };
            // A closed queue means the feeder is gone; it reported why.
            let _ = tx.send(item);
        }
        Ok(())
    }

    fn wait_for_room(&self) -> Result<(), ProduceError> {
        let (lock, cvar) = &self.shared.drained;
        let mut guard = lock.lock().expect("lock");
        loop {
            let alive = self.lanes.iter().filter(|pl| !pl.lane.is_failed());
            let (mut count, mut with_room) = (0, 0);
            for pl in alive {
                count += 1;
                with_room += usize::from(pl.lane.in_memory.load(Ordering::SeqCst) < QUEUE_BLOCKS);
            }
            if count < self.happy {
                return Err(ProduceError::TooFewServers);
            }
            if with_room >= self.happy {
                return Ok(());
            }
            // Woken by any drained block; the time-out only re-checks.
            guard = cvar.wait_timeout(guard, Duration::from_millis(100)).expect("lock").0;
        }
    }
}

fn spill(file: &mut Option<Arc<SpillFile>>, budget: &Budget, block: &[u8], lane: &Lane) -> Result<Spilled, SpillError> {
    let file = match file {
        Some(f) => f,
        None => {
            tracing::info!(server = %lane.server, share = lane.share, "server is behind; spilling its blocks to disk");
            file.insert(Arc::new(budget.spill_file()?))
        }
    };
    file.push(block)
}

enum ProduceError {
    Io(std::io::Error),
    Codec(crate::codec::CodecError),
    TooFewServers,
}

/// Reads, encodes and queues every segment; runs on a blocking thread.
fn produce(
    mut source: Box<dyn std::io::Read + Send>,
    mut encoder: VersionEncoder,
    mut queue: Queue,
    progress: Arc<dyn Progress>,
) -> Result<crate::codec::EncodedVersion, ProduceError> {
    use std::io::Read;
    let total = encoder.layout().params.total as usize;
    queue.send(vec![SHARE_MAGIC.to_vec(); total])?;
    let layout = encoder.layout();
    let mut buf = Vec::with_capacity(layout.params.segment_size as usize);
    for j in 0..layout.num_segments() {
        buf.resize(layout.segment_len(j), 0);
        source.read_exact(&mut buf).map_err(ProduceError::Io)?;
        let blocks = encoder.encode_segment(&buf).map_err(ProduceError::Codec)?;
        queue.send(blocks)?;
        progress.advance(buf.len() as u64);
    }
    let encoded = encoder.finish().map_err(ProduceError::Codec)?;
    queue.send(encoded.tails.clone())?;
    Ok(encoded)
}
