//! Uploads one sealed, stable file as a version: encode segment by segment,
//! stream blocks to one server per share, commit when happiness holds.
//!
//! Memory is bounded by `QUEUE_BLOCKS` blocks per server plus the segment
//! being encoded, however large the file: the encoder waits when a server's
//! queue is full, and a server that stops answering is dropped after the
//! grid's time-out.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::codec::{Capability, Hash, Key, StorageIndex, VersionEncoder, SHARE_MAGIC};
use crate::grid::{timed, Grid, ServerError, ShareSink};

/// Blocks queued per server. Two keep a server busy while the next segment
/// is encoded; more only add memory.
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
    let encoder = VersionEncoder::new(params, key, size);
    let si = encoder.storage_index();
    let happy = happy as usize;

    let (sinks, mut failures) = place_shares(grid, si, params.total).await;
    let alive = Arc::new(AtomicUsize::new(sinks.len()));
    let mut senders: Vec<Option<mpsc::Sender<Vec<u8>>>> = (0..params.total).map(|_| None).collect();
    let mut feeders = Vec::new();
    for (share, server, sink) in sinks {
        let (tx, rx) = mpsc::channel(QUEUE_BLOCKS);
        senders[share as usize] = Some(tx);
        feeders.push(tokio::spawn(feed(sink, rx, grid.timeout, alive.clone(), share, server)));
    }

    let producer = {
        let alive = alive.clone();
        tokio::task::spawn_blocking(move || produce(reader, encoder, senders, alive, happy, progress))
    };
    let produced = producer.await.expect("encoder thread");

    let mut sealed = Vec::new();
    for f in feeders {
        match f.await.expect("feeder task") {
            Ok(done) => sealed.push(done),
            Err((server, e)) => failures.push((server, e.to_string())),
        }
    }
    let encoded = match produced {
        Ok(encoded) if sealed.len() >= happy => encoded,
        outcome => {
            let placed = alive.load(Ordering::SeqCst).min(sealed.len());
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
        let r = timed_publish(grid, sink).await;
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

async fn timed_publish(grid: &Grid, sink: Box<dyn ShareSink>) -> Result<(), ServerError> {
    grid.timed(sink.publish()).await
}

type PlacedSink = (u16, String, Box<dyn ShareSink>);

/// Opens one share per distinct server, in permuted order; a server that
/// refuses is replaced by the next spare, if the grid has one.
async fn place_shares(grid: &Grid, si: StorageIndex, total: u16) -> (Vec<PlacedSink>, Vec<(String, String)>) {
    let mut candidates = grid.permuted(si).into_iter();
    let mut placed = Vec::new();
    let mut failures = Vec::new();
    for share in 0..total {
        for idx in candidates.by_ref() {
            let server = &grid.servers[idx];
            match grid.timed(server.server.create_share(si, share)).await {
                Ok(sink) => {
                    placed.push((share, server.name.clone(), sink));
                    break;
                }
                Err(e) => {
                    tracing::warn!(server = %server.name, error = %e, "server refused a share");
                    failures.push((server.name.clone(), e.to_string()));
                }
            }
        }
    }
    (placed, failures)
}

/// Drains one server's queue into its share. After a failure it keeps
/// draining (and dropping) so the encoder never waits on a dead server.
async fn feed(
    mut sink: Box<dyn ShareSink>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    limit: std::time::Duration,
    alive: Arc<AtomicUsize>,
    share: u16,
    server: String,
) -> Result<PlacedSink, (String, ServerError)> {
    let mut failure = None;
    while let Some(buf) = rx.recv().await {
        if failure.is_none() {
            if let Err(e) = timed(limit, sink.write(buf)).await {
                tracing::warn!(%server, share, error = %e, "dropping server from upload");
                alive.fetch_sub(1, Ordering::SeqCst);
                failure = Some(e);
            }
        }
    }
    let result = match failure {
        Some(e) => Err(e),
        None => timed(limit, sink.seal()).await,
    };
    match result {
        Ok(()) => Ok((share, server, sink)),
        Err(e) => {
            sink.abort().await;
            Err((server, e))
        }
    }
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
    senders: Vec<Option<mpsc::Sender<Vec<u8>>>>,
    alive: Arc<AtomicUsize>,
    happy: usize,
    progress: Arc<dyn Progress>,
) -> Result<crate::codec::EncodedVersion, ProduceError> {
    use std::io::Read;
    let send_all = |blocks: Vec<Vec<u8>>| -> Result<(), ProduceError> {
        if alive.load(Ordering::SeqCst) < happy {
            return Err(ProduceError::TooFewServers);
        }
        for (tx, block) in senders.iter().zip(blocks) {
            if let Some(tx) = tx {
                // A closed channel means its feeder is gone; it reported why.
                let _ = tx.blocking_send(block);
            }
        }
        Ok(())
    };
    send_all(vec![SHARE_MAGIC.to_vec(); senders.len()])?;
    let layout = encoder.layout();
    let mut buf = Vec::with_capacity(layout.params.segment_size as usize);
    for j in 0..layout.num_segments() {
        buf.resize(layout.segment_len(j), 0);
        source.read_exact(&mut buf).map_err(ProduceError::Io)?;
        let blocks = encoder.encode_segment(&buf).map_err(ProduceError::Codec)?;
        send_all(blocks)?;
        progress.advance(buf.len() as u64);
    }
    let encoded = encoder.finish().map_err(ProduceError::Codec)?;
    send_all(encoded.tails.clone())?;
    Ok(encoded)
}
