//! Reads versions back from the grid: locate shares, verify every byte
//! against the capability, decode, and fall over to other shares on any
//! missing, unreachable or corrupt one. Unverified bytes never leave here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::codec::{Capability, FileCap, Hash, StorageIndex, VersionDecoder, FOOTER_LEN};
use crate::grid::Grid;
use crate::manifest::{self, Manifest};

/// Segments fetched ahead of the one being written out.
pub const READ_AHEAD: usize = 16;

/// Bytes of consecutive blocks `check` asks for in one request.
const CHECK_READ_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", tag = "state", content = "detail")]
pub enum ShareState {
    Ok,
    Corrupt(String),
    Unreachable(String),
}

/// What was found of one share on one server.
#[derive(Debug, Clone, Serialize)]
pub struct ShareFinding {
    pub share: u16,
    pub server: String,
    #[serde(flatten)]
    pub state: ShareState,
}

/// Everything the grid said about a version: the evidence in error messages
/// and in `cairn check`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Findings {
    pub shares: Vec<ShareFinding>,
    /// Servers that could not even be asked, with why.
    pub unreachable_servers: Vec<(String, String)>,
}

impl fmt::Display for Findings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .shares
            .iter()
            .map(|s| match &s.state {
                ShareState::Ok => format!("share {} on {} ok", s.share, s.server),
                ShareState::Corrupt(why) => format!("share {} on {} corrupt ({why})", s.share, s.server),
                ShareState::Unreachable(why) => format!("share {} on {} unreadable ({why})", s.share, s.server),
            })
            .collect();
        parts.extend(
            self.unreachable_servers
                .iter()
                .map(|(s, why)| format!("server {s} unreachable ({why})")),
        );
        if parts.is_empty() {
            write!(f, "no shares found on any server")
        } else {
            write!(f, "{}", parts.join("; "))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("only {valid} valid shares of the {needed} needed to rebuild the file. Found: {findings}")]
    TooFewShares {
        valid: usize,
        needed: u16,
        findings: Findings,
    },
    #[error("segment {segment}: fewer than {needed} shares had valid blocks. Found: {findings}")]
    SegmentLost {
        segment: u64,
        needed: u16,
        findings: Findings,
    },
    #[error("decoded content does not match the SHA-256 recorded at upload; nothing was written")]
    PlaintextMismatch,
    #[error("segment {segment} does not match the SHA-256 its manifest records")]
    SegmentMismatch { segment: u64 },
    #[error("writing {path}: {source}")]
    Output { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Codec(#[from] crate::codec::CodecError),
}

/// How long a share whose server did not answer is left alone.
const UNREACHABLE_RETRY: Duration = Duration::from_secs(5);

/// An open version on the grid, ready to serve verified segments.
pub struct GridReader {
    grid: Arc<Grid>,
    cap: Capability,
    decoder: VersionDecoder,
    /// (share number, server index) of shares whose trailer verified, by
    /// share number so data shares come first and decoding is cheapest.
    sources: Vec<(u16, usize)>,
    /// Shares that served a bad block (skipped from then on: `None`) or no
    /// block (skipped until the instant given: a server that was down for a
    /// moment is asked again, not dropped for the reader's lifetime).
    failed: Mutex<HashMap<u16, Option<Instant>>>,
    /// Shares that were slow to answer; asked last.
    laggards: Mutex<HashSet<u16>>,
    findings: Mutex<Findings>,
}

impl GridReader {
    /// Asks every server which shares it holds and verifies their trailers.
    /// Once `needed` shares verified, servers that have not answered get
    /// the grid's hedge delay more, then the read goes on without them.
    pub async fn open(grid: Arc<Grid>, cap: Capability) -> Result<Self, DownloadError> {
        let layout = cap.layout;
        let k = layout.params.needed as usize;
        let mut decoder = VersionDecoder::new(cap.clone());
        let mut findings = Findings::default();
        let mut pending: FuturesUnordered<_> = (0..grid.servers.len())
            .map(|idx| locate_on_server(&grid, &cap, idx))
            .collect();
        let mut waiting: HashSet<usize> = (0..grid.servers.len()).collect();
        let mut sources = Vec::new();
        let deadline = tokio::time::sleep(Duration::MAX);
        tokio::pin!(deadline);
        let mut deadline_set = false;
        loop {
            tokio::select! {
                next = pending.next() => {
                    let Some((idx, located)) = next else { break };
                    waiting.remove(&idx);
                    let server = grid.servers[idx].name.clone();
                    let trailers = match located {
                        Ok(t) => t,
                        Err(e) => {
                            findings.unreachable_servers.push((server, e.to_string()));
                            continue;
                        }
                    };
                    for (share, trailer) in trailers {
                        let state = match trailer {
                            Err(e) => ShareState::Unreachable(e.to_string()),
                            Ok(_) if decoder.has_trailer(share) => continue, // a duplicate copy; one is enough
                            Ok(bytes) => match decoder.accept_trailer(share, &bytes[..layout.trailer_len() as usize]) {
                                Ok(()) => {
                                    sources.push((share, idx));
                                    ShareState::Ok
                                }
                                Err(e) => ShareState::Corrupt(e.to_string()),
                            },
                        };
                        findings.shares.push(ShareFinding { share, server: server.clone(), state });
                    }
                    if sources.len() >= k && !deadline_set {
                        deadline.as_mut().reset(tokio::time::Instant::now() + grid.hedge_after);
                        deadline_set = true;
                    }
                }
                () = &mut deadline => break,
            }
        }
        drop(pending);
        for idx in waiting {
            let why = format!("no answer within {:?} of the others; read without it", grid.hedge_after);
            findings.unreachable_servers.push((grid.servers[idx].name.clone(), why));
        }
        sources.sort();
        if sources.len() < k {
            return Err(DownloadError::TooFewShares {
                valid: sources.len(),
                needed: layout.params.needed,
                findings,
            });
        }
        Ok(GridReader {
            grid,
            cap,
            decoder,
            sources,
            failed: Mutex::new(HashMap::new()),
            laggards: Mutex::new(HashSet::new()),
            findings: Mutex::new(findings),
        })
    }

    pub fn capability(&self) -> &Capability {
        &self.cap
    }

    /// The plaintext SHA-256 recorded by the uploader.
    pub fn plaintext_sha256(&self) -> Hash {
        self.decoder.plaintext_sha256().expect("a trailer was accepted")
    }

    /// Shares to ask, best first: not failed, and laggards last.
    fn candidates(&self) -> Vec<(u16, usize)> {
        let mut failed = self.failed.lock().expect("lock");
        let now = Instant::now();
        failed.retain(|_, until| until.is_none_or(|t| t > now));
        let laggards = self.laggards.lock().expect("lock");
        let mut c: Vec<(u16, usize)> = self
            .sources
            .iter()
            .filter(|(s, _)| !failed.contains_key(s))
            .copied()
            .collect();
        c.sort_by_key(|(s, _)| laggards.contains(s));
        c
    }

    /// One verified, decrypted plaintext segment. Blocks are asked from
    /// `needed` servers; every hedge delay without enough answers asks one
    /// more, and a failed or corrupt block is replaced at once.
    pub async fn read_segment(&self, segment: u64) -> Result<Vec<u8>, DownloadError> {
        let mut blocks = self.fetch_blocks(segment, Check::EachBlock).await?;
        Ok(self.decoder.decode_segment(segment, &mut blocks)?)
    }

    /// Segment `segment` when its plaintext's SHA-256 is known and pinned
    /// by the capability already (a mapped version's manifest records every
    /// segment's): the blocks are decoded as they come and the plaintext
    /// checked against `sha256`, one hash of the segment where checking
    /// each block as well would hash it twice. A mismatch (or blocks that
    /// do not decode) has the blocks given checked against their leaves,
    /// the shares that gave bad ones set aside, and the segment read again
    /// as [`Self::read_segment`] reads it.
    pub async fn read_segment_hashed(&self, segment: u64, sha256: &Hash) -> Result<Vec<u8>, DownloadError> {
        let mut blocks = self.fetch_blocks(segment, Check::LengthOnly).await?;
        let given: Vec<bool> = blocks.iter().map(Option::is_some).collect();
        // Blocks that match their leaves decode to the bytes the manifest
        // hashed; a forged one to anything else.
        if let Ok(plain) = self.decoder.decode_segment(segment, &mut blocks) {
            if sha256_of(&plain) == *sha256 {
                return Ok(plain);
            }
        }
        tracing::warn!(
            storage_index = %self.cap.storage_index(),
            segment,
            "a segment did not match its hash: checking its blocks"
        );
        for (share, block) in blocks.iter().enumerate().filter(|(share, _)| given[*share]) {
            let share = share as u16;
            let block = block.as_deref().expect("a block given");
            if let Err(e) = self.decoder.verify_block(share, segment, block) {
                self.set_aside(share, segment, ShareState::Corrupt(e.to_string()));
            }
        }
        let plain = self.read_segment(segment).await?;
        match sha256_of(&plain) == *sha256 {
            true => Ok(plain),
            false => Err(DownloadError::SegmentMismatch { segment }),
        }
    }

    /// `needed` blocks of `segment`, checked as `check` says: asked from
    /// `needed` servers, with one more every hedge delay without enough
    /// answers, and a failed or corrupt block replaced at once.
    async fn fetch_blocks(&self, segment: u64, check: Check) -> Result<Vec<Option<Vec<u8>>>, DownloadError> {
        let layout = self.cap.layout;
        let k = layout.params.needed as usize;
        let si = self.cap.storage_index();
        let fetch = |(share, idx): (u16, usize)| async move {
            let server = &self.grid.servers[idx].server;
            let offset = layout.block_offset(segment);
            let len = layout.block_len(segment) as u64;
            ((share, idx), self.grid.timed(server.read(si, share, offset, len)).await)
        };
        let mut blocks: Vec<Option<Vec<u8>>> = vec![None; layout.params.total as usize];
        let mut have = 0;
        let mut next = self.candidates().into_iter();
        let mut in_flight = FuturesUnordered::new();
        let mut asked = HashSet::new();
        let hedge = tokio::time::sleep(self.grid.hedge_after);
        tokio::pin!(hedge);
        while have < k {
            while have + in_flight.len() < k {
                let Some(c) = next.next() else { break };
                asked.insert(c.0);
                in_flight.push(fetch(c));
            }
            if in_flight.is_empty() {
                return Err(DownloadError::SegmentLost {
                    segment,
                    needed: layout.params.needed,
                    findings: self.findings.lock().expect("lock").clone(),
                });
            }
            tokio::select! {
                Some(((share, idx), result)) = in_flight.next() => {
                    asked.remove(&share);
                    self.take_block(share, idx, segment, result, check, &mut blocks, &mut have);
                }
                () = &mut hedge => {
                    // Those still out are slow: ask them last from now on,
                    // and ask one more server for this segment.
                    self.laggards.lock().expect("lock").extend(asked.iter().copied());
                    if let Some(c) = next.next() {
                        tracing::debug!(segment, share = c.0, "hedging a slow read");
                        asked.insert(c.0);
                        in_flight.push(fetch(c));
                    }
                    hedge.as_mut().reset(tokio::time::Instant::now() + self.grid.hedge_after);
                }
            }
        }
        Ok(blocks)
    }

    /// Checks one fetched block and keeps it, or records the share failed.
    #[allow(clippy::too_many_arguments)]
    fn take_block(
        &self,
        share: u16,
        idx: usize,
        segment: u64,
        result: Result<Vec<u8>, crate::grid::ServerError>,
        check: Check,
        blocks: &mut [Option<Vec<u8>>],
        have: &mut usize,
    ) {
        let checked = |block: &[u8]| match check {
            Check::EachBlock => self.decoder.verify_block(share, segment, block),
            Check::LengthOnly => self.decoder.check_block_len(share, segment, block),
        };
        let state = match result {
            Ok(block) => match checked(&block) {
                Ok(()) => {
                    self.laggards.lock().expect("lock").remove(&share);
                    blocks[share as usize] = Some(block);
                    *have += 1;
                    return;
                }
                Err(e) => ShareState::Corrupt(e.to_string()),
            },
            Err(e) => ShareState::Unreachable(e.to_string()),
        };
        self.set_aside_on(share, idx, segment, state);
    }

    /// Records share `share` failed (its server is the one it was read from).
    fn set_aside(&self, share: u16, segment: u64, state: ShareState) {
        if let Some(&(_, idx)) = self.sources.iter().find(|(s, _)| *s == share) {
            self.set_aside_on(share, idx, segment, state);
        }
    }

    /// Records share `share`, read from server `idx`, failed: a corrupt one
    /// for good, an unreachable one for a while.
    fn set_aside_on(&self, share: u16, idx: usize, segment: u64, state: ShareState) {
        let server = self.grid.servers[idx].name.clone();
        tracing::warn!(%server, share, segment, ?state, "share failed; using another");
        let until = matches!(state, ShareState::Unreachable(_)).then(|| Instant::now() + UNREACHABLE_RETRY);
        self.failed.lock().expect("lock").insert(share, until);
        let mut findings = self.findings.lock().expect("lock");
        if let Some(f) = findings.shares.iter_mut().find(|f| f.share == share) {
            f.state = state;
        }
    }
}

/// How [`GridReader::fetch_blocks`] checks a block as it arrives.
#[derive(Clone, Copy)]
enum Check {
    /// Against its hash: a block kept is the uploader's.
    EachBlock,
    /// Its length only: the caller checks the decoded segment instead.
    LengthOnly,
}

fn sha256_of(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

type Located = Result<Vec<(u16, Result<Vec<u8>, crate::grid::ServerError>)>, crate::grid::ServerError>;

/// The shares of a version one server holds, each with its trailer bytes.
async fn locate_on_server(grid: &Grid, cap: &Capability, idx: usize) -> (usize, Located) {
    let layout = cap.layout;
    let si = cap.storage_index();
    let server = &grid.servers[idx].server;
    let shares = match grid.timed(server.shares(si)).await {
        Ok(s) => s,
        Err(e) => return (idx, Err(e)),
    };
    let wanted: Vec<u16> = shares.into_iter().filter(|&s| s < layout.params.total).collect();
    let trailers =
        futures::future::join_all(wanted.iter().map(|&share| {
            grid.timed(server.read(si, share, layout.trailer_offset(), layout.trailer_len() + FOOTER_LEN))
        }))
        .await;
    (idx, Ok(wanted.into_iter().zip(trailers).collect()))
}

/// Downloads a version into `out`. The file appears only complete and
/// verified: bytes go to a hidden temporary beside it (a fresh random name,
/// created exclusively and owner-only, so nobody can aim it elsewhere by a
/// symlink or read it half-written), renamed at the end.
pub async fn download_to_file(
    grid: Arc<Grid>,
    cap: FileCap,
    out: &Path,
    progress: Arc<dyn crate::upload::Progress>,
) -> Result<Hash, DownloadError> {
    let reader = FileReader::open(grid, cap.clone()).await?;
    let output_err = output_error(out);
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.cairn-partial-"))
        .tempfile_in(&dir)
        .map_err(&output_err)?;
    let sha = match &cap {
        FileCap::Whole(_) => write_verified(&reader.own, tmp.as_file_mut(), out, progress)
            .await
            .map(|()| reader.own.plaintext_sha256())?,
        FileCap::Packed { .. } => write_packed(&reader.own, &cap, tmp.as_file_mut(), out, progress).await?,
        FileCap::Mapped { .. } => write_mapped(&reader, tmp.as_file_mut(), out, progress).await?,
    };
    tmp.as_file().sync_all().map_err(&output_err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::Permissions::from_mode(crate::home::user_file_mode());
        tmp.as_file().set_permissions(mode).map_err(&output_err)?;
    }
    tmp.persist(out).map_err(|e| output_err(e.error))?;
    Ok(sha)
}

fn output_error(path: &Path) -> impl Fn(std::io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Output {
        path: path.to_owned(),
        source,
    }
}

/// A mapped version into `file`, segment by segment (fetched ahead);
/// succeeds only if the whole matches the manifest's SHA-256.
async fn write_mapped(
    reader: &FileReader,
    file: &mut std::fs::File,
    out: &Path,
    progress: Arc<dyn crate::upload::Progress>,
) -> Result<Hash, DownloadError> {
    let (m, manifest) = match (&reader.map, reader.manifest()) {
        (Some(m), Some(manifest)) => (m, manifest),
        _ => unreachable!("a mapped version has a manifest"),
    };
    let recent = RecentSegments::new(READ_AHEAD);
    let mut hasher = Sha256::new();
    let mut stream = futures::stream::iter(0..manifest.segments.len() as u64)
        .map(|j| reader.segment(m, j, &recent))
        .buffered(READ_AHEAD);
    while let Some(segment) = stream.next().await {
        let segment = segment?;
        hasher.update(&segment[..]);
        file.write_all(&segment).map_err(output_error(out))?;
        progress.advance(segment.len() as u64);
    }
    let actual: Hash = hasher.finalize().into();
    if manifest.sha256.is_some_and(|whole| whole != actual) {
        return Err(DownloadError::PlaintextMismatch);
    }
    Ok(actual)
}

/// A packed version (small by construction) into `file`; returns its SHA-256.
async fn write_packed(
    reader: &GridReader,
    cap: &FileCap,
    file: &mut std::fs::File,
    out: &Path,
    progress: Arc<dyn crate::upload::Progress>,
) -> Result<Hash, DownloadError> {
    let (offset, len) = cap.stored_range(0, u64::MAX).expect("a packed version");
    let mut bytes = Arc::unwrap_or_clone(read_range(reader, offset, len, &RecentSegments::new(1)).await?);
    cap.open_stored(offset, &mut bytes);
    file.write_all(&bytes).map_err(output_error(out))?;
    progress.advance(len);
    Ok(sha256_of(&bytes))
}

/// An open file version, whatever its capability: its bytes read chunk
/// by chunk, each verified. A mapped version's manifest is read and
/// checked at open; the other encoded versions it names are opened when
/// first needed.
/// A verified chunk of a file version, and its SHA-256 where the reader
/// already knew it (a mapped version's manifest holds each segment's), so
/// the staging cache need not hash it again.
pub struct Chunk {
    pub bytes: Arc<Vec<u8>>,
    pub sha256: Option<Hash>,
}

pub struct FileReader {
    cap: FileCap,
    own: Arc<GridReader>,
    map: Option<Mapped>,
}

struct Mapped {
    grid: Arc<Grid>,
    manifest: Manifest,
    objects: Vec<tokio::sync::OnceCell<Arc<GridReader>>>,
}

impl FileReader {
    pub async fn open(grid: Arc<Grid>, cap: FileCap) -> Result<Self, DownloadError> {
        let own = Arc::new(GridReader::open(grid.clone(), cap.stored().clone()).await?);
        let map = match &cap {
            FileCap::Mapped {
                size,
                manifest_at,
                own: c,
            } => {
                // Its fixed part first: what it says bounds what is read.
                let recent = RecentSegments::new(1);
                let len = c.layout.size - manifest_at;
                let fixed = read_range(&own, *manifest_at, len.min(manifest::FIXED_LEN as u64), &recent).await?;
                if len > manifest::max_len(&fixed)? {
                    return Err(DownloadError::Codec(crate::codec::CodecError::Capability(
                        "the manifest is longer than its segments need".into(),
                    )));
                }
                let bytes = read_range(&own, *manifest_at, len, &recent).await?;
                let manifest = Manifest::parse(&bytes, c, *manifest_at)?;
                if manifest.size != *size {
                    return Err(DownloadError::Codec(crate::codec::CodecError::Capability(format!(
                        "the manifest is of {} bytes, the capability says {size}",
                        manifest.size
                    ))));
                }
                let objects = manifest.objects.iter().map(|_| tokio::sync::OnceCell::new()).collect();
                Some(Mapped {
                    grid,
                    manifest,
                    objects,
                })
            }
            _ => None,
        };
        Ok(FileReader { cap, own, map })
    }

    pub fn cap(&self) -> &FileCap {
        &self.cap
    }

    /// A reader of `cap`, another file in this one's pack, at no cost:
    /// the pack is open already.
    pub fn sharing(&self, cap: &FileCap) -> Option<FileReader> {
        let same_pack = !matches!(cap, FileCap::Mapped { .. }) && cap.stored() == self.cap.stored();
        same_pack.then(|| FileReader {
            cap: cap.clone(),
            own: self.own.clone(),
            map: None,
        })
    }

    /// A mapped version's manifest.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.map.as_ref().map(|m| &m.manifest)
    }

    /// Every encoded version the file's bytes lie in, its own first.
    pub fn objects(&self) -> Vec<Capability> {
        let mut out = vec![self.cap.stored().clone()];
        if let Some(m) = &self.map {
            out.extend(m.manifest.objects.iter().cloned());
        }
        out
    }

    /// Chunk `index`: the file's bytes from `index * chunk_size`,
    /// `chunk_size` of them (the last chunk shorter), verified.
    pub async fn read_chunk(
        &self,
        index: u64,
        chunk_size: u64,
        recent: &RecentSegments,
    ) -> Result<Chunk, DownloadError> {
        let bytes = match (&self.cap, &self.map) {
            (FileCap::Whole(whole), _) if whole.layout.params.segment_size as u64 == chunk_size => {
                self.own.read_segment(index).await?
            }
            (_, Some(m)) if m.manifest.segment_size as u64 == chunk_size => {
                let e = m.manifest.segments.get(index as usize).copied();
                let bytes = self.segment(m, index, recent).await?;
                return Ok(Chunk {
                    bytes,
                    sha256: e.map(|e| e.sha256),
                });
            }
            (_, Some(m)) => {
                // Another chunk size than the segments': gather the range.
                let s = m.manifest.segment_size as u64;
                let (from, to) = (index * chunk_size, ((index + 1) * chunk_size).min(m.manifest.size));
                let mut out = Vec::with_capacity(to.saturating_sub(from) as usize);
                for j in from / s..to.div_ceil(s) {
                    let seg = self.segment(m, j, recent).await?;
                    let start = j * s;
                    out.extend_from_slice(
                        &seg[(from.max(start) - start) as usize..(to.min(start + s) - start) as usize],
                    );
                }
                out
            }
            (cap, None) => {
                let (offset, len) = cap.stored_range(index * chunk_size, chunk_size).expect("not mapped");
                let mut bytes = Arc::unwrap_or_clone(read_range(&self.own, offset, len, recent).await?);
                cap.open_stored(offset, &mut bytes);
                bytes
            }
        };
        Ok(Chunk {
            bytes: Arc::new(bytes),
            sha256: None,
        })
    }

    /// Segment `j` of a mapped version, from the object holding it,
    /// checked against the manifest's hash of it.
    async fn segment(&self, m: &Mapped, j: u64, recent: &RecentSegments) -> Result<Arc<Vec<u8>>, DownloadError> {
        // The catalog's size of a version (from another machine's record)
        // may say more than its manifest.
        let e = *m.manifest.segments.get(j as usize).ok_or_else(|| {
            DownloadError::Codec(crate::codec::CodecError::Capability(format!(
                "segment {j} is past the manifest's {} segments",
                m.manifest.segments.len()
            )))
        })?;
        let reader = match e.object {
            0 => self.own.clone(),
            i => {
                let i = i as usize - 1;
                let open = || async {
                    GridReader::open(m.grid.clone(), m.manifest.objects[i].clone())
                        .await
                        .map(Arc::new)
                };
                m.objects[i].get_or_try_init(open).await?.clone()
            }
        };
        let len = m.manifest.segment_len(j);
        let layout = reader.capability().layout;
        let at = e.offset / layout.params.segment_size as u64;
        if at < layout.num_segments() && layout.segment_offset(at) == e.offset && layout.segment_len(at) as u64 == len {
            // The whole of one segment of its object, as every segment
            // but a file's last is: its hash checks it as it is decoded.
            // (Its error names the file's segment, not the object's.)
            return recent.read_hashed(&reader, at, &e.sha256).await.map_err(|e| match e {
                DownloadError::SegmentMismatch { .. } => DownloadError::SegmentMismatch { segment: j },
                e => e,
            });
        }
        let bytes = read_range(&reader, e.offset, len, recent).await?;
        if sha256_of(&bytes) != e.sha256 {
            return Err(DownloadError::SegmentMismatch { segment: j });
        }
        Ok(bytes)
    }
}

/// The last few segments [`read_range`] decoded, of any version. The small
/// files of a pack lie side by side in its segments: reading them one after
/// another (`cp -r`, `diff -r`, a build) then fetches and decodes each
/// segment once, not once per file. Holds at most `capacity` segments.
pub struct RecentSegments {
    capacity: usize,
    recent: Mutex<VecDeque<DecodedSegment>>,
}

/// A version's segment, by storage index, number and what it was checked
/// against, and its plaintext.
type DecodedSegment = ((StorageIndex, u64, Proof), Arc<Vec<u8>>);

/// What a kept segment was checked against: every block against its
/// object's root, or its plaintext against a hash the caller knew (a
/// manifest's, which a reader of the object by its root need not trust).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proof {
    Root(Hash),
    Plaintext(Hash),
}

impl RecentSegments {
    pub fn new(capacity: usize) -> RecentSegments {
        RecentSegments {
            capacity: capacity.max(1),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    async fn read(&self, reader: &GridReader, segment: u64) -> Result<Arc<Vec<u8>>, DownloadError> {
        let proof = Proof::Root(reader.capability().root);
        self.kept_or(reader, segment, proof, reader.read_segment(segment)).await
    }

    /// As `read`, for a segment whose plaintext SHA-256 the caller knows
    /// ([`GridReader::read_segment_hashed`]).
    async fn read_hashed(
        &self,
        reader: &GridReader,
        segment: u64,
        sha256: &Hash,
    ) -> Result<Arc<Vec<u8>>, DownloadError> {
        let proof = Proof::Plaintext(*sha256);
        self.kept_or(reader, segment, proof, reader.read_segment_hashed(segment, sha256))
            .await
    }

    /// The segment if it is kept here, checked as `proof` says, else what
    /// `decode` gives, kept from now on.
    async fn kept_or(
        &self,
        reader: &GridReader,
        segment: u64,
        proof: Proof,
        decode: impl std::future::Future<Output = Result<Vec<u8>, DownloadError>>,
    ) -> Result<Arc<Vec<u8>>, DownloadError> {
        let key = (reader.capability().storage_index(), segment, proof);
        let hit = self
            .lock()
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, bytes)| bytes.clone());
        if let Some(bytes) = hit {
            return Ok(bytes);
        }
        let bytes = Arc::new(decode.await?);
        let mut recent = self.lock();
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        recent.push_back((key, bytes.clone()));
        Ok(bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<DecodedSegment>> {
        self.recent.lock().expect("recent segments")
    }
}

/// The bytes `[offset, offset + len)` of a stored version, from the
/// segments that hold them, each segment verified against the version's
/// hashes: how a packed file version, or a chunk of one, is read.
pub async fn read_range(
    reader: &GridReader,
    offset: u64,
    len: u64,
    recent: &RecentSegments,
) -> Result<Arc<Vec<u8>>, DownloadError> {
    if len == 0 {
        return Ok(Arc::default());
    }
    let layout = reader.capability().layout;
    let segment_size = layout.params.segment_size as u64;
    let end = offset + len;
    let (first, last) = (offset / segment_size, end.div_ceil(segment_size));
    if last - first == 1 && offset == layout.segment_offset(first) {
        // A whole segment, as a chunk of a big file is: shared, not copied.
        let bytes = recent.read(reader, first).await?;
        if bytes.len() as u64 == len {
            return Ok(bytes);
        }
    }
    let mut out = Vec::with_capacity(len as usize);
    for segment in first..last {
        let bytes = recent.read(reader, segment).await?;
        let start = layout.segment_offset(segment);
        let from = offset.max(start) - start;
        let to = (end.min(start + bytes.len() as u64) - start) as usize;
        out.extend_from_slice(&bytes[from as usize..to]);
    }
    Ok(Arc::new(out))
}

async fn write_verified(
    reader: &GridReader,
    file: &mut std::fs::File,
    out: &Path,
    progress: Arc<dyn crate::upload::Progress>,
) -> Result<(), DownloadError> {
    each_verified_segment(reader, |segment| {
        file.write_all(segment).map_err(output_error(out))?;
        progress.advance(segment.len() as u64);
        Ok(())
    })
    .await
}

/// Feeds every segment, in order, to `sink`; succeeds only if the whole
/// matches the SHA-256 recorded at upload.
async fn each_verified_segment(
    reader: &GridReader,
    mut sink: impl FnMut(&[u8]) -> Result<(), DownloadError>,
) -> Result<(), DownloadError> {
    let mut hasher = Sha256::new();
    let segments = reader.capability().layout.num_segments();
    let mut stream = futures::stream::iter(0..segments)
        .map(|j| reader.read_segment(j))
        .buffered(READ_AHEAD);
    while let Some(segment) = stream.next().await {
        let segment = segment?;
        hasher.update(&segment);
        sink(&segment)?;
    }
    let actual: Hash = hasher.finalize().into();
    if actual != reader.plaintext_sha256() {
        return Err(DownloadError::PlaintextMismatch);
    }
    Ok(())
}

/// A whole small version in memory, verified (the namespace snapshot).
pub async fn download_to_vec(grid: Arc<Grid>, cap: Capability) -> Result<Vec<u8>, DownloadError> {
    let mut out = Vec::with_capacity(cap.layout.size as usize);
    download_into(grid, cap, &mut out, Path::new("memory")).await?;
    Ok(out)
}

/// A whole version written to `out` (named `what` in errors) segment by
/// segment as each is verified: a checkpoint, tens of MB, not held in
/// memory. Whole and checked only once this returns `Ok`.
pub async fn download_into(
    grid: Arc<Grid>,
    cap: Capability,
    out: &mut impl std::io::Write,
    what: &Path,
) -> Result<(), DownloadError> {
    let reader = GridReader::open(grid, cap).await?;
    each_verified_segment(&reader, |segment| {
        out.write_all(segment).map_err(|source| DownloadError::Output {
            path: what.to_owned(),
            source,
        })
    })
    .await
}

/// Reads every share of a version in full and verifies every block.
/// Healthy means all `total` shares are present and valid.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub storage_index: String,
    pub needed: u16,
    pub total: u16,
    /// Every share valid, on `total` distinct servers (shares piled on
    /// one server fall with it).
    pub healthy: bool,
    pub recoverable: bool,
    pub missing_shares: Vec<u16>,
    /// Distinct servers holding at least one valid share.
    pub servers_with_valid_shares: usize,
    pub findings: Findings,
}

pub async fn check(grid: Arc<Grid>, cap: Capability) -> CheckReport {
    let layout = cap.layout;
    let si = cap.storage_index();
    let mut findings = Findings::default();
    let mut good: HashSet<u16> = HashSet::new();
    let mut holding = 0;
    // Servers are checked at once; each one's shares in turn.
    let per_server = futures::future::join_all(grid.servers.iter().enumerate().map(|(idx, server)| {
        let grid = &grid;
        let cap = &cap;
        async move {
            let shares = grid.timed(server.server.shares(si)).await?;
            let mut states = Vec::new();
            for share in shares {
                states.push((share, verify_whole_share(grid, idx, cap, share).await));
            }
            Ok::<_, crate::grid::ServerError>(states)
        }
    }))
    .await;
    for (server, states) in grid.servers.iter().zip(per_server) {
        match states {
            Ok(states) => {
                holding += usize::from(states.iter().any(|(_, s)| *s == ShareState::Ok));
                for (share, state) in states {
                    if state == ShareState::Ok {
                        good.insert(share);
                    }
                    findings.shares.push(ShareFinding {
                        share,
                        server: server.name.clone(),
                        state,
                    });
                }
            }
            Err(e) => findings.unreachable_servers.push((server.name.clone(), e.to_string())),
        }
    }
    let missing_shares: Vec<u16> = (0..layout.params.total).filter(|s| !good.contains(s)).collect();
    CheckReport {
        storage_index: si.to_string(),
        needed: layout.params.needed,
        total: layout.params.total,
        healthy: missing_shares.is_empty() && holding >= layout.params.total as usize,
        recoverable: good.len() >= layout.params.needed as usize,
        missing_shares,
        servers_with_valid_shares: holding,
        findings,
    }
}

/// `check` of every encoded version a file version's bytes lie in (one,
/// unless it is mapped), as one report: as healthy as the least healthy.
pub async fn check_file(grid: Arc<Grid>, cap: FileCap) -> CheckReport {
    let mut report = check(grid.clone(), cap.stored().clone()).await;
    if !matches!(cap, FileCap::Mapped { .. }) || !report.recoverable {
        return report;
    }
    let objects = match FileReader::open(grid.clone(), cap).await {
        Ok(reader) => reader.objects(),
        Err(e) => {
            report.healthy = false;
            report.recoverable = false;
            report
                .findings
                .unreachable_servers
                .push(("manifest".into(), e.to_string()));
            return report;
        }
    };
    for object in objects.into_iter().skip(1) {
        let other = check(grid.clone(), object).await;
        report.healthy &= other.healthy;
        report.recoverable &= other.recoverable;
        report.servers_with_valid_shares = report.servers_with_valid_shares.min(other.servers_with_valid_shares);
        for s in other.missing_shares {
            if !report.missing_shares.contains(&s) {
                report.missing_shares.push(s);
            }
        }
        report.findings.shares.extend(other.findings.shares);
        report
            .findings
            .unreachable_servers
            .extend(other.findings.unreachable_servers);
    }
    report.missing_shares.sort();
    report
}

async fn verify_whole_share(grid: &Grid, idx: usize, cap: &Capability, share: u16) -> ShareState {
    let layout = cap.layout;
    let si = cap.storage_index();
    let server = &grid.servers[idx].server;
    let mut decoder = VersionDecoder::new(cap.clone());
    if share >= layout.params.total {
        return ShareState::Corrupt("share number out of range".into());
    }
    // Framing first: length, magic and footer; then the trailer by hash.
    match grid.timed(server.share_len(si, share)).await {
        Ok(len) if len == layout.share_len() => {}
        Ok(len) => return ShareState::Corrupt(format!("{len} bytes long, {} expected", layout.share_len())),
        Err(e) => return ShareState::Unreachable(e.to_string()),
    }
    match grid
        .timed(server.read(si, share, 0, crate::codec::SHARE_MAGIC.len() as u64))
        .await
    {
        Ok(h) if h == crate::codec::SHARE_MAGIC => {}
        Ok(_) => return ShareState::Corrupt("bad magic".into()),
        Err(e) => return ShareState::Unreachable(e.to_string()),
    }
    let tail = match grid
        .timed(server.read(si, share, layout.trailer_offset(), layout.trailer_len() + FOOTER_LEN))
        .await
    {
        Ok(t) => t,
        Err(e) => return ShareState::Unreachable(e.to_string()),
    };
    let (trailer, footer) = tail.split_at(layout.trailer_len() as usize);
    if footer != crate::codec::footer_bytes(layout) {
        return ShareState::Corrupt("bad footer".into());
    }
    if let Err(e) = decoder.accept_trailer(share, trailer) {
        return ShareState::Corrupt(e.to_string());
    }
    // Blocks are contiguous in a share: read runs of them in one request.
    let m = layout.num_segments();
    let block_end = |j: u64| layout.block_offset(j) + layout.block_len(j) as u64;
    let mut first = 0;
    while first < m {
        let start = layout.block_offset(first);
        let mut last = first;
        while last + 1 < m && block_end(last + 1) - start <= CHECK_READ_BYTES {
            last += 1;
        }
        let run = match grid.timed(server.read(si, share, start, block_end(last) - start)).await {
            Ok(run) => run,
            Err(e) => return ShareState::Unreachable(e.to_string()),
        };
        for j in first..=last {
            let at = (layout.block_offset(j) - start) as usize;
            if let Err(e) = decoder.verify_block(share, j, &run[at..at + layout.block_len(j)]) {
                return ShareState::Corrupt(e.to_string());
            }
        }
        first = last + 1;
    }
    ShareState::Ok
}
