//! Chunked copy-on-write staging: working copies and sealed versions.
//!
//! A sealed version is a directory of chunk files `0`, `1`, ... each exactly
//! `chunk_size` bytes except the last; it never changes. A working copy
//! starts from a sealed base (or from nothing) in O(1): it owns only the
//! chunks written since it was opened, and reads every other chunk from the
//! base. Sealing renames the copy's directory into place as the version,
//! with a [`Layer`] naming the base for the chunks it did not write, so a
//! 4 KiB edit of a 1 GiB file stores one new chunk and costs O(changed
//! chunks), not O(file). [`SealedVersion::settle`], in the background, later
//! hard-links the base's chunks in, so no version depends on another for
//! long.
//!
//! The chunk size equals the codec's segment size, so the uploader reads a
//! sealed version segment by segment, one chunk file each.
//!
//! Every chunk of a sealed version has its exact length and, in the file
//! `sums` beside it, its SHA-256 ([`super::sums`]): a chunk that has lost
//! either is an error wherever it is read, never zeros.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::sync::{Arc, LazyLock, Mutex};

use sha2::{Digest, Sha256};

use super::sums::{self, Sum};
use crate::sys::PositionalIo;
use std::path::{Path, PathBuf};

/// The file of a sealed version that does not hold every chunk itself:
/// which of the rest it reads from which earlier version (see [`Layer`]).
pub const LAYER_FILE: &str = "layer";
/// A layer file is a few ranges per source; more than this is damage.
const LAYER_MAX_BYTES: u64 = 16 << 20;
/// Versions a read may pass through to find a chunk: settling keeps it at
/// two, so more is damage (or a loop).
const LAYER_MAX_DEPTH: usize = 64;

/// Chunks a sealed version takes from an earlier version of its file in the
/// cache rather than holding them: sealing an edit writes only the chunks
/// it changed (O(changed), not O(file)). Each source is another version
/// directory beside this one, with the half-open chunk ranges taken from
/// it. Those chunks have the same length and bytes there, and their sums
/// are copied into this version's `sums`, so a read through a layer is
/// checked against this version's own record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layer {
    pub from: Vec<LayerSource>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSource {
    pub dir: PathBuf,
    pub size: u64,
    pub chunks: Vec<(u64, u64)>,
}

/// Layers read, by version directory and size, with the identity of the
/// file each was parsed from (a layer is replaced whole, by a rename; on
/// Windows its length and time only) and dropped when this process
/// replaces or removes it. An
/// edit reads its base's layer, which the seal before it wrote: parsing it
/// again each time costs more than the edit. Layers over
/// [`LAYER_CACHED_BYTES`] are not kept; past [`LAYERS_CACHED`] the cache
/// starts again.
type LayerKey = (PathBuf, u64);
type LayerId = ((u64, u64), u64, std::time::SystemTime);
type LayerCache = HashMap<LayerKey, (LayerId, Arc<Layer>)>;
static LAYERS: LazyLock<Mutex<LayerCache>> = LazyLock::new(Default::default);
const LAYERS_CACHED: usize = 256;
const LAYER_CACHED_BYTES: u64 = 1 << 20;

/// Drops what the cache keeps of `dir`'s layer, which is being replaced or
/// removed (on Windows, where a file has no identity std can read, this is
/// what keeps the cache true).
fn forget_layer(dir: &Path) {
    LAYERS
        .lock()
        .expect("layer cache")
        .retain(|(cached, _), _| cached.as_os_str() != dir.as_os_str());
}

/// A source as the layer file keeps it: by its directory's name beside the
/// version's, so a moved `$CAIRN_HOME` still reads.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSource {
    name: String,
    size: u64,
    chunks: Vec<(u64, u64)>,
}

impl Layer {
    /// The version chunk `index` is read from, if this layer takes it.
    pub fn source(&self, index: u64, chunk_size: u64) -> Option<SealedVersion> {
        self.from
            .iter()
            .find(|s| s.chunks.iter().any(|&(start, end)| (start..end).contains(&index)))
            .map(|s| SealedVersion::open(s.dir.clone(), s.size, chunk_size))
    }

    /// Adds chunk `index` from `source`, merging with the last range.
    fn push(&mut self, source: &SealedVersion, index: u64) {
        // Runs of chunks come from one source: the last one is tried first,
        // and directories compared as bytes (`Path`'s `==` parses both).
        let same = |s: &LayerSource| s.dir.as_os_str() == source.dir.as_os_str();
        let at = match self.from.last().is_some_and(same) {
            true => Some(self.from.len() - 1),
            false => self.from.iter().position(same),
        };
        let entry = match at {
            Some(i) => &mut self.from[i],
            None => {
                self.from.push(LayerSource {
                    dir: source.dir.clone(),
                    size: source.size,
                    chunks: Vec::new(),
                });
                self.from.last_mut().expect("pushed")
            }
        };
        match entry.chunks.last_mut() {
            Some((_, end)) if *end == index => *end += 1,
            _ => entry.chunks.push((index, index + 1)),
        }
    }

    fn chunks(&self) -> impl Iterator<Item = u64> + '_ {
        self.from.iter().flat_map(|s| s.chunks.iter().flat_map(|&(a, b)| a..b))
    }
}

/// Where a chunk of a sealed version is in the cache.
#[derive(Debug)]
pub struct Located {
    /// The file holding it, if any version on the way holds it.
    pub held: Option<PathBuf>,
    /// The versions it is read through, this one first: the last one holds
    /// it, or (`held` is none: evicted) is the one it was written in. Any
    /// of them the grid holds gives it back.
    pub chain: Vec<SealedVersion>,
}

/// An immutable version in the staging cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedVersion {
    pub dir: PathBuf,
    pub size: u64,
    pub chunk_size: u64,
}

fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

/// Writes `layer` as the layer of the version (or copy) in `dir`, whole or
/// not at all; an empty one removes the file.
fn write_layer(dir: &Path, layer: &Layer) -> io::Result<()> {
    forget_layer(dir);
    let path = dir.join(LAYER_FILE);
    if layer.from.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let stored: Vec<StoredSource> = layer
        .from
        .iter()
        .map(|s| StoredSource {
            name: s
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            size: s.size,
            chunks: s.chunks.clone(),
        })
        .collect();
    let bytes = serde_json::to_vec(&stored).map_err(io::Error::other)?;
    if bytes.len() as u64 > LAYER_MAX_BYTES {
        return Err(io::Error::other(format!(
            "the layer of {} would take {} bytes: more than a layer may",
            dir.display(),
            bytes.len()
        )));
    }
    // Two settles of one version may race: each writes its own file.
    let tmp = dir.join(format!("{LAYER_FILE}.{:016x}", rand::random::<u64>()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Reads `buf.len()` bytes at `offset` of a chunk file, zero-filling past
/// its end (chunk files of a working copy may be short).
fn read_chunk_at(path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            buf.fill(0);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    buf[done..].fill(0);
    Ok(())
}

impl SealedVersion {
    /// Opens a sealed version written by [`WorkingCopy::seal`].
    pub fn open(dir: PathBuf, size: u64, chunk_size: u64) -> Self {
        SealedVersion { dir, size, chunk_size }
    }

    pub fn chunk_path(&self, index: u64) -> PathBuf {
        self.dir.join(index.to_string())
    }

    pub fn chunk_len(&self, index: u64) -> u64 {
        (self.size.saturating_sub(index * self.chunk_size)).min(self.chunk_size)
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many (0 at EOF).
    /// Every chunk file of a sealed version has its exact length and sum: a
    /// missing, short or altered one is an error (kind `NotFound` or
    /// `InvalidData`, with no OS code, so it reaches an application as EIO),
    /// never read as zeros.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        read_range(offset, buf, self.size, self.chunk_size, |index, within, out| {
            self.read_in_chunk(index, within, out)
        })
    }

    /// Starts reading chunk `index` from the disk, if the cache holds it,
    /// for a read that will come to it soon.
    pub fn will_need(&self, index: u64) {
        if let Ok(Located { held: Some(path), .. }) = self.locate(index) {
            if let Ok(file) = File::open(path) {
                crate::sys::will_need(&file);
            }
        }
    }

    fn read_in_chunk(&self, index: u64, within: u64, out: &mut [u8]) -> io::Result<()> {
        self.open_checked(index)?.read_exact_at(out, within)
    }

    /// Opens chunk `index` once its length and (on the first open by this
    /// process) its sum are found right.
    fn open_checked(&self, index: u64) -> io::Result<File> {
        let (path, file) = self.open_chunk(index)?;
        sums::check_file(&self.dir, index, &path, &file)?;
        Ok(file)
    }

    /// Opens chunk `index` (here, or where its layer takes it from) once
    /// its length is found right.
    fn open_chunk(&self, index: u64) -> io::Result<(PathBuf, File)> {
        let path = self.chunk_path(index);
        let opened = match File::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => match self.locate(index)?.held {
                Some(path) => File::open(&path).map(|f| (path, f)),
                None => Err(e),
            },
            other => other.map(|f| (path, f)),
        };
        let (path, file) = opened.map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => io::Error::new(
                io::ErrorKind::NotFound,
                format!("chunk {index} of the sealed version {} is missing", self.dir.display()),
            ),
            _ => e,
        })?;
        self.check_len(index, file.metadata()?.len())?;
        Ok((path, file))
    }

    /// This version's layer, if it does not hold every chunk itself;
    /// checked to name only sibling versions and chunks this one has.
    pub fn layer(&self) -> io::Result<Option<Arc<Layer>>> {
        let path = self.dir.join(LAYER_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let facts = crate::sys::file_facts(&path, &meta);
        let id = (facts.identity, meta.len(), facts.modified);
        let key = (self.dir.clone(), self.size);
        if let Some((known, layer)) = LAYERS.lock().expect("layer cache").get(&key) {
            if *known == id {
                return Ok(Some(layer.clone()));
            }
        }
        let layer = Arc::new(self.parse_layer(file)?);
        if meta.len() <= LAYER_CACHED_BYTES {
            let mut cache = LAYERS.lock().expect("layer cache");
            if cache.len() >= LAYERS_CACHED {
                cache.clear();
            }
            cache.insert(key, (id, layer.clone()));
        }
        Ok(Some(layer))
    }

    fn parse_layer(&self, file: File) -> io::Result<Layer> {
        let damaged = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the layer of the sealed version {} {why}: the staging cache was damaged",
                    self.dir.display()
                ),
            )
        };
        let mut bytes = Vec::new();
        file.take(LAYER_MAX_BYTES + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > LAYER_MAX_BYTES {
            return Err(damaged("is too long"));
        }
        let stored: Vec<StoredSource> = serde_json::from_slice(&bytes).map_err(|_| damaged("is unreadable"))?;
        let count = chunk_count(self.size, self.chunk_size);
        let beside = self.dir.parent().unwrap_or(&self.dir);
        let mut layer = Layer::default();
        for s in stored {
            let plain = Path::new(&s.name).file_name().is_some_and(|n| n == s.name.as_str());
            if !plain || s.name == ".." || self.dir.file_name().is_some_and(|own| own == s.name.as_str()) {
                return Err(damaged("names a source outside the cache"));
            }
            let theirs = chunk_count(s.size, self.chunk_size);
            if s.chunks.iter().any(|&(a, b)| a >= b || b > count || b > theirs) {
                return Err(damaged("names chunks it cannot take"));
            }
            layer.from.push(LayerSource {
                dir: beside.join(&s.name),
                size: s.size,
                chunks: s.chunks,
            });
        }
        Ok(layer)
    }

    /// Where chunk `index` is in the cache: here, or in a version reached
    /// through layers.
    pub fn locate(&self, index: u64) -> io::Result<Located> {
        let mut chain = Vec::new();
        let mut at = self.clone();
        loop {
            let path = at.chunk_path(index);
            if path.exists() {
                chain.push(at);
                return Ok(Located {
                    held: Some(path),
                    chain,
                });
            }
            let next = at.layer()?.and_then(|l| l.source(index, self.chunk_size));
            chain.push(at);
            match next {
                None => return Ok(Located { held: None, chain }),
                Some(_) if chain.len() >= LAYER_MAX_DEPTH => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "chunk {index} of the sealed version {} is layered too deep: the staging cache was damaged",
                            self.dir.display()
                        ),
                    ));
                }
                Some(next) => at = next,
            }
        }
    }

    /// Takes into this version's directory (a hard link each) every chunk
    /// its layer names that a version on the way still holds, and names for
    /// each other one the first version on the way that `on_grid` says the
    /// grid holds (or else the one it was written in), with its sum if a
    /// version on the way has learnt it (they all hold the same bytes
    /// there). Afterwards no version but those is needed to read this one,
    /// so any other may go; a version holding all its chunks has no layer
    /// left. Idempotent.
    pub fn settle(&self, on_grid: &dyn Fn(&Path) -> bool) -> io::Result<()> {
        let Some(layer) = self.layer()? else {
            return Ok(());
        };
        let count = chunk_count(self.size, self.chunk_size);
        let ours = sums::read_all(&self.dir, count)?;
        let mut rest = Layer::default();
        for index in layer.chunks() {
            let dest = self.chunk_path(index);
            let found = self.locate(index)?;
            match (found.held, found.chain.last()) {
                (Some(path), _) if path == dest => {}
                (Some(path), _) => match std::fs::hard_link(&path, &dest) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                },
                (None, Some(written_in)) if written_in.dir != self.dir => {
                    let from = found.chain[1..].iter().find(|v| on_grid(&v.dir)).unwrap_or(written_in);
                    rest.push(from, index);
                    if ours[index as usize].is_none() {
                        for on_way in &found.chain[1..] {
                            if let Some(sum) = sums::recorded(&on_way.dir, index)? {
                                sums::record(&self.dir, index, &sum)?;
                                break;
                            }
                        }
                    }
                }
                // Not ours to name: a read of it says it is missing.
                _ => {}
            }
        }
        write_layer(&self.dir, &rest)
    }

    /// Reads chunk `index` whole, checked against its length and sum.
    fn read_chunk(&self, index: u64) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0; self.chunk_len(index) as usize];
        self.read_chunk_into(index, &mut bytes)?;
        Ok(bytes)
    }

    /// Reads chunk `index` whole into `out` (exactly its length) and checks
    /// the bytes read, not an earlier read of them, against its sum.
    fn read_chunk_into(&self, index: u64, out: &mut [u8]) -> io::Result<()> {
        self.open_chunk(index)?.1.read_exact_at(out, 0)?;
        sums::check_bytes(&self.dir, index, out)
    }

    /// What the cache holds of chunk `index`: checked by length only, or
    /// with `deep` by its sum too (once per process).
    pub fn chunk_state(&self, index: u64, deep: bool) -> ChunkState {
        let Ok(Located { held: Some(path), .. }) = self.locate(index) else {
            return ChunkState::Absent;
        };
        let Ok(file) = File::open(&path) else {
            return ChunkState::Absent;
        };
        let good = match file.metadata() {
            Ok(meta) => self.check_len(index, meta.len()).is_ok(),
            Err(_) => false,
        };
        if good && (!deep || sums::check_file(&self.dir, index, &path, &file).is_ok()) {
            ChunkState::Good
        } else {
            ChunkState::Damaged
        }
    }

    fn check_len(&self, index: u64, have: u64) -> io::Result<()> {
        let want = self.chunk_len(index);
        if have == want {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "chunk {index} of the sealed version {} holds {have} bytes, not {want}: the staging cache was damaged",
                self.dir.display()
            ),
        ))
    }

    /// A sequential reader over the whole version, for the uploader.
    pub fn reader(&self) -> SealedReader {
        self.ranges(vec![(0, self.size)])
    }

    /// A sequential reader over the byte ranges `(offset, len)` of the
    /// version, one after the other (the segments an upload sends).
    pub fn ranges(&self, ranges: Vec<(u64, u64)>) -> SealedReader {
        SealedReader {
            version: self.clone(),
            ranges: ranges.into(),
        }
    }

    /// Removes the version's chunks from the cache. Chunks shared with other
    /// versions survive through their other links.
    pub fn remove(self) -> io::Result<()> {
        forget_layer(&self.dir);
        std::fs::remove_dir_all(&self.dir)
    }
}

/// What the cache holds of one chunk of a sealed version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    Absent,
    /// Present, but of the wrong length or not matching its sum.
    Damaged,
    Good,
}

/// Splits a read at `offset` over chunk boundaries, clamped to `size`.
fn read_range(
    offset: u64,
    buf: &mut [u8],
    size: u64,
    chunk_size: u64,
    mut read_chunk: impl FnMut(u64, u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<usize> {
    if offset >= size {
        return Ok(0);
    }
    let len = (buf.len() as u64).min(size - offset) as usize;
    let mut done = 0;
    while done < len {
        let pos = offset + done as u64;
        let (index, within) = (pos / chunk_size, pos % chunk_size);
        let take = ((chunk_size - within) as usize).min(len - done);
        read_chunk(index, within, &mut buf[done..done + take])?;
        done += take;
    }
    Ok(len)
}

pub struct SealedReader {
    version: SealedVersion,
    /// What is left to read: (offset, len), in order.
    ranges: std::collections::VecDeque<(u64, u64)>,
}

impl Read for SealedReader {
    /// A read of a whole chunk (the uploader reads segment by segment) checks
    /// the very bytes it returns against the chunk's sum.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let v = &self.version;
        let Some(&(offset, left)) = self.ranges.iter().find(|(_, len)| *len > 0) else {
            return Ok(0);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        let take = (left as usize).min(buf.len());
        let buf = &mut buf[..take];
        let (index, within) = (offset / v.chunk_size, offset % v.chunk_size);
        let len = v.chunk_len(index) as usize;
        let n = if within == 0 && len > 0 && buf.len() >= len {
            v.read_chunk_into(index, &mut buf[..len])?;
            len
        } else {
            v.read_at(offset, buf)?
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "sealed version cut short"));
        }
        while self.ranges.front().is_some_and(|(_, len)| *len == 0) {
            self.ranges.pop_front();
        }
        let front = self.ranges.front_mut().expect("a range with bytes left");
        *front = (front.0 + n as u64, front.1 - n as u64);
        Ok(n)
    }
}

/// What a working copy needs besides its chunk files to be rebuilt after a
/// crash: where its base is and the size it was truncated to. Written at
/// the creation of a copy over a base and at every truncation (the only
/// size changes a chunk file's length does not record), followed by the
/// partial chunks' log ([`PARTIAL_RECORD`]). A new file's copy has none
/// until truncated: its chunk files say it all.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct PersistedState {
    base_dir: Option<PathBuf>,
    base_size: u64,
    base_valid: u64,
    /// The size at the last creation or truncation; writes only grow it.
    size_floor: u64,
}

const STATE_FILE: &str = "state";
/// A partial chunk's file is `N.part`; filled, it becomes `N`.
const PARTIAL_SUFFIX: &str = ".part";
/// The state file is its JSON on one line, then the log of its partial
/// chunks' written ranges (see [`Partial`]): a record a write, the chunk's
/// index, then the start and end of the bytes written, little-endian u64s.
/// One file, so the first write of an edit creates no file for it.
const PARTIAL_RECORD: usize = 24;
/// A partial chunk's write this many-th is not logged: the chunk is filled
/// from its base instead. Bounds the log (a record a write) and the ranges
/// a read merges.
const PARTIAL_MAX_WRITES: usize = 64;
/// Suffix of a working copy over a base while its state is being written
/// (in the mount, a spare directory is used instead): such a directory was
/// never used, and recovery removes it.
pub const UNFINISHED_SUFFIX: &str = ".new";
/// Past this many chunks written since the last fsync, an fsync syncs the
/// staging file system once (syncfs: one device flush) rather than each
/// chunk (a flush each: 2,048 for a 2 GiB file, about a second here).
const SYNC_FILESYSTEM_ABOVE: usize = 64;

/// The chunks of a working copy written since its last fsync. They are opened when taken: the handles stay good whatever happens to
/// the copy's paths meanwhile (a seal renames or links its chunks away).
#[derive(Debug)]
pub struct PendingSync {
    dir: PathBuf,
    chunks: BTreeSet<u64>,
    /// The chunk files and the state file, then (on Unix) the copy's
    /// directory and its parent; or, past [`SYNC_FILESYSTEM_ABOVE`]
    /// chunks, one handle on the staging file system (`cache/work`, which
    /// a seal never moves).
    files: Vec<File>,
    filesystem: Option<File>,
}

impl PendingSync {
    /// With `over_base`, the copy reads from a sealed version (its partial
    /// chunks are filled from it at seal), which may be younger than the
    /// last disk sync: the whole staging file system is synced, so that an
    /// fsync that returned never leaves a copy whose base a power loss took.
    fn open(dir: &Path, chunks: &BTreeSet<u64>, paths: Vec<PathBuf>, over_base: bool) -> io::Result<PendingSync> {
        // Windows has no syncfs (crate::sys::sync_filesystem does nothing there).
        let whole = cfg!(unix) && (over_base || chunks.len() > SYNC_FILESYSTEM_ABOVE);
        let parent = dir.parent().unwrap_or(dir);
        let mut files = Vec::new();
        if !whole {
            // Opened for writing: Windows refuses to flush a read-only handle.
            let open = |p: &Path| OpenOptions::new().write(true).open(p);
            for path in paths {
                files.push(open(&path)?);
            }
            match open(&dir.join(STATE_FILE)) {
                Ok(f) => files.push(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            #[cfg(unix)]
            files.extend([File::open(dir)?, File::open(parent)?]);
        }
        Ok(PendingSync {
            dir: dir.to_owned(),
            chunks: chunks.clone(),
            files,
            filesystem: if whole { Some(File::open(parent)?) } else { None },
        })
    }

    /// Syncs them: each chunk file with the copy's state and directories,
    /// or the whole staging file system.
    pub fn run(&self) -> io::Result<()> {
        if let Some(fs) = &self.filesystem {
            return crate::sys::sync_filesystem_of(fs);
        }
        self.files.iter().try_for_each(File::sync_all)
    }
}

/// A file open for writing: its own chunks over an optional sealed base.
#[derive(Debug)]
pub struct WorkingCopy {
    dir: PathBuf,
    base: Option<SealedVersion>,
    /// Bytes below this offset still come from the base where this copy has
    /// no chunk of its own. Shrinks on truncation so that extending again
    /// reads zeros, as on a local file system.
    base_valid: u64,
    size: u64,
    chunk_size: u64,
    own: BTreeSet<u64>,
    /// Own chunks over the base written only in part so far.
    partial: HashMap<u64, Partial>,
    /// The state file, open for appending the log once a chunk is partial.
    log: Option<File>,
    /// Own chunks written since the last fsync.
    unsynced: BTreeSet<u64>,
    /// The SHA-256 of own chunks written from their start in order, kept up
    /// as they are written so that sealing reads none of them back. Own
    /// chunks not here (written out of order, recovered) are read at seal.
    hashes: HashMap<u64, ChunkHash>,
}

/// An own chunk of a copy over a base, written only in part: a first write
/// into a base chunk writes its bytes, not the chunk (the copy-on-write is
/// left to the seal, which fills the file from the base). Its file `N.part`
/// holds the bytes written; below the copy's `base_valid` every byte
/// outside `written` is the base's (the file holds zeros there). Each
/// write's range is appended to the copy's `partial` log after its bytes
/// are written, so after a kill -9 recovery knows which bytes are the
/// writer's (a write cut short was never answered; the base shows there).
#[derive(Debug, Default)]
struct Partial {
    /// Byte ranges within the chunk written, sorted, apart and merged.
    written: Vec<(u64, u64)>,
    writes: usize,
}

impl Partial {
    fn add(&mut self, (start, end): (u64, u64)) {
        let mut merged = (start, end);
        self.written.retain(|&(a, b)| {
            let apart = b < merged.0 || a > merged.1;
            if !apart {
                merged = (merged.0.min(a), merged.1.max(b));
            }
            apart
        });
        let at = self.written.partition_point(|&(a, _)| a < merged.0);
        self.written.insert(at, merged);
        self.writes += 1;
    }

    /// The ranges of `lo..hi` not written.
    fn gaps(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut at = lo;
        for &(a, b) in &self.written {
            if a >= hi {
                break;
            }
            if a > at {
                gaps.push((at, a));
            }
            at = at.max(b);
        }
        if at < hi {
            gaps.push((at, hi));
        }
        gaps
    }
}

/// A state file's JSON is this long at most (a path and three numbers).
const STATE_JSON_MAX: u64 = 64 << 10;

/// Reads a copy's state file: its JSON, and its log into `partial` (ranges
/// of the chunks still partial; records of chunks since filled are passed
/// over). Checked: a range outside a chunk, or more writes than a partial
/// chunk logs, is damage. A record cut short (by a power loss) describes a
/// write never answered: passed over.
fn read_state(dir: &Path, partial: &mut HashMap<u64, Partial>, chunk_size: u64) -> io::Result<PersistedState> {
    let file = match File::open(dir.join(STATE_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(PersistedState::default()),
        Err(e) => return Err(e),
    };
    let damaged = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the state of the working copy {} {why}", dir.display()),
        )
    };
    let mut reader = io::BufReader::new(file);
    let mut json = Vec::new();
    io::BufRead::read_until(&mut (&mut reader).take(STATE_JSON_MAX), b'\n', &mut json)?;
    // A state before the log had no line end.
    if json.last() == Some(&b'\n') {
        json.pop();
    }
    let state = serde_json::from_slice(&json).map_err(|e| damaged(&format!("is unreadable ({e})")))?;
    let mut record = [0u8; PARTIAL_RECORD];
    loop {
        match reader.read_exact(&mut record) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(state),
            Err(e) => return Err(e),
        }
        let field = |i: usize| u64::from_le_bytes(record[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let (index, start, end) = (field(0), field(1), field(2));
        if let Some(p) = partial.get_mut(&index) {
            if start >= end || end > chunk_size || p.writes >= PARTIAL_MAX_WRITES {
                return Err(damaged("logs a write it cannot hold"));
            }
            p.add((start, end));
        }
    }
}

fn log_record(index: u64, (start, end): (u64, u64)) -> [u8; PARTIAL_RECORD] {
    let mut record = [0u8; PARTIAL_RECORD];
    for (i, v) in [index, start, end].into_iter().enumerate() {
        record[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    record
}

/// The hash of an own chunk's bytes so far.
#[derive(Debug, Clone)]
enum ChunkHash {
    /// Of its first `len` bytes, which is its file's length.
    Running(Sha256, u64),
    /// Of the whole chunk, `chunk_size` bytes, being made from its file on
    /// the hashing thread since a write finished it.
    Later(Arc<sums::Later>),
}

impl WorkingCopy {
    /// Starts a working copy in `dir` (which must not exist) over `base`.
    /// Copies nothing: O(1) whatever the base's size. A copy over a base
    /// appears with its state already written (built under a temporary
    /// name), so recovery never mistakes it for an empty new file.
    pub fn create(dir: PathBuf, base: Option<SealedVersion>, chunk_size: u64) -> io::Result<Self> {
        Self::create_with(dir, base, chunk_size, Self::make_dir)
    }

    /// [`WorkingCopy::create`], with `make_dir(dir, files)` making its
    /// directory, holding `files` (name, bytes) when it appears.
    pub fn create_with(
        dir: PathBuf,
        base: Option<SealedVersion>,
        chunk_size: u64,
        make_dir: impl FnOnce(&Path, &[(&str, &[u8])]) -> io::Result<()>,
    ) -> io::Result<Self> {
        let size = base.as_ref().map_or(0, |b| b.size);
        let copy = WorkingCopy {
            dir,
            base,
            base_valid: size,
            size,
            chunk_size,
            own: BTreeSet::new(),
            partial: HashMap::new(),
            log: None,
            unsynced: BTreeSet::new(),
            hashes: HashMap::new(),
        };
        match &copy.base {
            None => make_dir(&copy.dir, &[])?,
            Some(b) => {
                debug_assert_eq!(b.chunk_size, chunk_size);
                // Not synced: a power loss may leave the state empty, and
                // recovery then sets the copy aside (a copy written in the
                // last seconds before a power loss is not kept, as
                // SEMANTICS says); it never seals it without its base.
                make_dir(&copy.dir, &[(STATE_FILE, &copy.state_bytes()?)])?;
            }
        }
        Ok(copy)
    }

    /// Makes the directory `to` holding `files`: built under a temporary
    /// name (which recovery removes) and renamed, so that it never appears
    /// without them.
    pub fn make_dir(to: &Path, files: &[(&str, &[u8])]) -> io::Result<()> {
        if files.is_empty() {
            return std::fs::create_dir(to);
        }
        let mut unfinished = to.as_os_str().to_owned();
        unfinished.push(UNFINISHED_SUFFIX);
        let unfinished = PathBuf::from(unfinished);
        std::fs::create_dir(&unfinished)?;
        for (name, bytes) in files {
            std::fs::write(unfinished.join(name), bytes)?;
        }
        crate::sys::rename_retrying(&unfinished, to)
    }

    /// Rebuilds a working copy left in `dir` by a crash: every byte that
    /// reached its chunk files is kept.
    pub fn recover(dir: PathBuf, chunk_size: u64) -> io::Result<Self> {
        let damaged = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the working copy {} {why}", dir.display()),
            )
        };
        let mut own = BTreeSet::new();
        let mut partial = HashMap::new();
        let mut size = 0;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_str().unwrap_or_default();
            let (index, part) = match name.strip_suffix(PARTIAL_SUFFIX) {
                Some(n) => (n.parse::<u64>().ok(), true),
                None => (name.parse::<u64>().ok(), false),
            };
            let Some(index) = index else { continue };
            if !own.insert(index) {
                return Err(damaged("holds a chunk both whole and partial"));
            }
            if part {
                partial.insert(index, Partial::default());
            }
            let len = entry.metadata()?.len();
            if len > chunk_size {
                return Err(damaged("holds a chunk longer than a chunk"));
            }
            size = size.max(index * chunk_size + len);
        }
        let state = read_state(&dir, &mut partial, chunk_size)?;
        size = size.max(state.size_floor);
        let base = state
            .base_dir
            .map(|d| SealedVersion::open(d, state.base_size, chunk_size));
        if !partial.is_empty() && base.is_none() {
            return Err(damaged("has partial chunks but no base"));
        }
        for (index, p) in &partial {
            let file = File::open(dir.join(format!("{index}{PARTIAL_SUFFIX}")))?;
            for &(a, b) in &p.written {
                if !crate::sys::stored(&file, a, b)? {
                    return Err(damaged("lost bytes its log says were written (a power loss)"));
                }
            }
        }
        Ok(WorkingCopy {
            dir,
            base,
            base_valid: state.base_valid,
            size,
            chunk_size,
            // Written before the crash, maybe never synced.
            unsynced: own.clone(),
            own,
            partial,
            log: None,
            hashes: HashMap::new(),
        })
    }

    /// The state, with a log of the partial chunks' ranges as they are.
    fn state_bytes(&self) -> io::Result<Vec<u8>> {
        let state = PersistedState {
            base_dir: self.base.as_ref().map(|b| b.dir.clone()),
            base_size: self.base.as_ref().map_or(0, |b| b.size),
            base_valid: self.base_valid,
            size_floor: self.size,
        };
        let mut bytes = serde_json::to_vec(&state).map_err(io::Error::other)?;
        bytes.push(b'\n');
        for (&index, p) in &self.partial {
            for &range in &p.written {
                bytes.extend_from_slice(&log_record(index, range));
            }
        }
        Ok(bytes)
    }

    /// Replaces the state, whole: written beside and renamed. Not synced
    /// (an fsync of the file syncs it; so does the periodic disk sync).
    fn save_state(&mut self) -> io::Result<()> {
        let tmp = self.dir.join("state.tmp");
        std::fs::write(&tmp, self.state_bytes()?)?;
        // The log goes on in the new file.
        self.log = None;
        std::fs::rename(tmp, self.dir.join(STATE_FILE))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The sealed version this copy reads unchanged chunks from.
    pub fn base(&self) -> Option<&SealedVersion> {
        self.base.as_ref()
    }

    pub fn base_dir(&self) -> Option<&Path> {
        self.base.as_ref().map(|b| b.dir.as_path())
    }

    fn own_path(&self, index: u64) -> PathBuf {
        match self.partial.contains_key(&index) {
            true => self.dir.join(format!("{index}{PARTIAL_SUFFIX}")),
            false => self.dir.join(index.to_string()),
        }
    }

    /// How many bytes of chunk `index` come from the base where this copy
    /// did not write them.
    fn base_bytes_in(&self, index: u64) -> u64 {
        self.base_valid
            .saturating_sub(index * self.chunk_size)
            .min(self.chunk_size)
    }

    /// Where chunk `index` comes from when this copy does not own it, and how
    /// many of its bytes are valid there.
    fn base_chunk(&self, index: u64) -> Option<(PathBuf, u64)> {
        let base = self.base.as_ref()?;
        let valid = self.base_bytes_in(index);
        (valid > 0).then(|| (base.chunk_path(index), valid))
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        read_range(offset, buf, self.size, self.chunk_size, |index, within, out| {
            if self.own.contains(&index) {
                read_chunk_at(&self.own_path(index), within, out)?;
                if let (Some(p), Some(base)) = (self.partial.get(&index), &self.base) {
                    let end = within + out.len() as u64;
                    for (a, b) in p.gaps(within, end.min(self.base_bytes_in(index))) {
                        base.read_in_chunk(index, a, &mut out[(a - within) as usize..(b - within) as usize])?;
                    }
                }
                return Ok(());
            }
            match (self.base_chunk(index), &self.base) {
                (Some((_, valid)), Some(base)) if within < valid => {
                    let from_base = ((valid - within) as usize).min(out.len());
                    base.read_in_chunk(index, within, &mut out[..from_base])?;
                    out[from_base..].fill(0);
                    Ok(())
                }
                _ => {
                    out.fill(0);
                    Ok(())
                }
            }
        })
    }

    /// Gives this copy its own file for chunk `index`: over the base, a
    /// partial chunk (nothing copied: see [`Partial`]); past it, a new one
    /// hashed as it is written.
    fn own_chunk(&mut self, index: u64) -> io::Result<File> {
        if self.own.contains(&index) {
            return OpenOptions::new().write(true).open(self.own_path(index));
        }
        let over_base = self.base.is_some() && self.base_chunk(index).is_some();
        if over_base {
            self.partial.insert(index, Partial::default());
        }
        match OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.own_path(index))
        {
            Ok(file) => {
                self.own.insert(index);
                if !over_base {
                    self.hashes.insert(index, ChunkHash::Running(Sha256::new(), 0));
                }
                Ok(file)
            }
            Err(e) => {
                self.partial.remove(&index);
                Err(e)
            }
        }
    }

    /// Logs that `start..end` of partial chunk `index` was written (its
    /// bytes are in the file already); at [`PARTIAL_MAX_WRITES`], fills
    /// the chunk instead.
    fn note_partial(&mut self, index: u64, start: u64, end: u64) -> io::Result<()> {
        let Some(p) = self.partial.get_mut(&index) else {
            return Ok(());
        };
        if p.writes + 1 >= PARTIAL_MAX_WRITES {
            // Filled instead of logged: the log never holds more than a
            // partial chunk may. If the fill fails, the write is as if not
            // made (unlogged: the base shows there) and the next tries again.
            let before = p.written.clone();
            p.add((start, end));
            p.writes -= 1;
            return self.fill(index).inspect_err(|_| {
                if let Some(p) = self.partial.get_mut(&index) {
                    p.written = before;
                }
            });
        }
        if self.log.is_none() {
            self.log = Some(OpenOptions::new().append(true).open(self.dir.join(STATE_FILE))?);
        }
        // One write of the whole record: a kill -9 never cuts it.
        let record = log_record(index, (start, end));
        io::Write::write_all(self.log.as_mut().expect("opened"), &record)?;
        self.partial.get_mut(&index).expect("checked").add((start, end));
        Ok(())
    }

    /// Makes partial chunk `index` whole: the base's bytes, checked against
    /// their sum, written where the copy did not write, then renamed `N`
    /// (a crash before the rename fills it again from the log, the same
    /// way). Its hash is kept, of the bytes the file then holds.
    fn fill(&mut self, index: u64) -> io::Result<()> {
        let Some(p) = self.partial.get(&index) else {
            return Ok(());
        };
        let path = self.own_path(index);
        let from_base = self.base_bytes_in(index);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let on_file = file.metadata()?.len();
        if on_file > self.chunk_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} holds {on_file} bytes, more than a chunk", path.display()),
            ));
        }
        // What the file holds (bytes written unlogged too: they show past
        // the base), with the base's where the log says nothing was written.
        let mut bytes = vec![0; on_file.max(from_base) as usize];
        file.read_exact_at(&mut bytes[..on_file as usize], 0)?;
        let gaps = p.gaps(0, from_base);
        if !gaps.is_empty() {
            let base = self.base.as_ref().expect("a partial chunk has a base");
            let theirs = base.read_chunk(index)?;
            for &(a, b) in &gaps {
                let (a, b) = (a as usize, b as usize);
                bytes[a..b].copy_from_slice(&theirs[a..b]);
                file.write_all_at(&bytes[a..b], a as u64)?;
            }
        }
        drop(file);
        crate::sys::rename_retrying(&path, &self.dir.join(index.to_string()))?;
        self.partial.remove(&index);
        let len = bytes.len() as u64;
        self.hashes
            .insert(index, ChunkHash::Running(Sha256::new_with_prefix(&bytes), len));
        Ok(())
    }

    /// Keeps the running hash of chunk `index` up after `data` was written
    /// at `within`: a write at or past its end extends it (a hole between
    /// reads as zeros); one that rewrites hashed bytes drops it.
    /// A write that finishes a chunk (a whole-chunk write: `dd bs=1M`, or
    /// the last piece of one) has the chunk hashed from its file on the
    /// hashing thread instead; a later write to it drops that hash.
    fn hash_write(&mut self, index: u64, within: u64, data: &[u8]) {
        // A partial chunk is hashed when it is filled from its base.
        if within + data.len() as u64 == self.chunk_size && !self.partial.contains_key(&index) {
            let later = sums::hash_later(self.own_path(index));
            self.hashes.insert(index, ChunkHash::Later(later));
            return;
        }
        let Some(ChunkHash::Running(hasher, len)) = self.hashes.get_mut(&index) else {
            self.hashes.remove(&index);
            return;
        };
        if within < *len {
            self.hashes.remove(&index);
            return;
        }
        sums::hash_zeros(hasher, within - *len);
        hasher.update(data);
        *len = within + data.len() as u64;
    }

    /// The SHA-256 of own chunk `index`, brought to its exact length `want`
    /// already: from its running hash, or read back.
    fn own_sum(&mut self, index: u64, want: u64) -> io::Result<Sum> {
        match self.hashes.remove(&index) {
            Some(ChunkHash::Later(later)) if want == self.chunk_size => later.wait(),
            Some(ChunkHash::Running(mut hasher, len)) if len <= want => {
                sums::hash_zeros(&mut hasher, want - len);
                Ok(hasher.finalize().into())
            }
            _ => sums::hash_file(&self.own_path(index)),
        }
    }

    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let pos = offset + done as u64;
            let (index, within) = (pos / self.chunk_size, pos % self.chunk_size);
            let take = ((self.chunk_size - within) as usize).min(data.len() - done);
            let piece = &data[done..done + take];
            let file = self.own_chunk(index)?;
            if let Err(e) = file.write_all_at(piece, within) {
                self.hashes.remove(&index);
                return Err(e);
            }
            if within + take as u64 == self.chunk_size {
                // A chunk written to its end is likely done with: to disk.
                crate::sys::start_writeback(&file);
            }
            drop(file);
            self.hash_write(index, within, piece);
            self.unsynced.insert(index);
            self.note_partial(index, within, within + take as u64)?;
            done += take;
        }
        self.size = self.size.max(offset + data.len() as u64);
        Ok(())
    }

    pub fn truncate(&mut self, size: u64) -> io::Result<()> {
        if size < self.size {
            self.base_valid = self.base_valid.min(size);
            let keep = chunk_count(size, self.chunk_size);
            for index in self.own.split_off(&keep) {
                std::fs::remove_file(self.own_path(index))?;
                self.partial.remove(&index);
            }
            self.unsynced.retain(|index| *index < keep);
            self.hashes.retain(|index, _| *index < keep);
            // The chunk cut in the middle must read zeros past the cut if
            // the file grows again.
            if !size.is_multiple_of(self.chunk_size) && self.own.contains(&(keep - 1)) {
                let cut = size % self.chunk_size;
                File::options()
                    .write(true)
                    .open(self.own_path(keep - 1))?
                    .set_len(cut)?;
                self.unsynced.insert(keep - 1);
                // A hash of bytes past the cut no longer holds; one of fewer
                // does (the rest of the chunk reads zeros).
                if !matches!(self.hashes.get(&(keep - 1)), Some(ChunkHash::Running(_, len)) if *len <= cut) {
                    self.hashes.remove(&(keep - 1));
                }
                // Past the cut a partial chunk reads its file (zeros), as
                // past `base_valid` always; its ranges end at the cut (a
                // range past its file's end is what a power loss leaves).
                if let Some(p) = self.partial.get_mut(&(keep - 1)) {
                    p.written.retain_mut(|(a, b)| {
                        *b = (*b).min(cut);
                        *a < *b
                    });
                }
            }
        }
        self.size = size;
        self.save_state()
    }

    /// Makes every written byte durable on the local disk.
    pub fn fsync(&mut self) -> io::Result<()> {
        let pending = self.take_sync()?;
        if let Err(e) = pending.run() {
            self.give_back(pending);
            return Err(e);
        }
        Ok(())
    }

    /// What an fsync must make durable, opened and taken from the copy so
    /// that the syncing runs without it (and without any lock over it):
    /// writes after this go to the next fsync.
    pub fn take_sync(&mut self) -> io::Result<PendingSync> {
        let paths = self.unsynced.iter().map(|&i| self.own_path(i)).collect();
        let pending = PendingSync::open(&self.dir, &self.unsynced, paths, self.base.is_some())?;
        self.unsynced.clear();
        Ok(pending)
    }

    /// Puts back what a failed fsync did not make durable.
    pub fn give_back(&mut self, pending: PendingSync) {
        if pending.dir == self.dir {
            self.unsynced
                .extend(pending.chunks.into_iter().filter(|i| self.own.contains(i)));
        }
    }

    /// Seals this working copy as the immutable version at `version_dir`
    /// (which must not exist). `record` is called once the version's bytes
    /// are final and must make the version known durably (the catalog row,
    /// committed); a crash at any point loses nothing. The copy is brought
    /// to exact chunk lengths in place, with its sums and a [`Layer`] over
    /// its base for the chunks it did not write (no chunk is copied or
    /// linked: O(changed chunks)), recorded, then renamed to `version_dir`.
    /// A crash before the record leaves a working copy that reads as before
    /// (its state still names its base); one between the record and the
    /// rename, a recorded copy that [`WorkingCopy::finish_seal`] moves into
    /// place.
    ///
    /// Nothing is fsynced: a sealed version survives the daemon's crash at
    /// once, and a power loss once the staging disk is synced (fsync, or
    /// the periodic sync). On failure the copy comes back reading the same
    /// bytes, with the error.
    pub fn seal<E: From<io::Error>>(
        mut self,
        version_dir: PathBuf,
        record: impl FnOnce(u64) -> Result<(), E>,
    ) -> Result<SealedVersion, Box<(WorkingCopy, E)>> {
        let sealed = SealedVersion {
            dir: version_dir.clone(),
            size: self.size,
            chunk_size: self.chunk_size,
        };
        if let Err(e) = self.prepare_seal() {
            return Err(Box::new((self, e.into())));
        }
        if let Err(e) = record(self.size) {
            return Err(Box::new((self, e)));
        }
        match Self::finish_seal(&self.dir, &version_dir) {
            Ok(()) => Ok(sealed),
            Err(e) => Err(Box::new((self, e.into()))),
        }
    }

    /// The base's chunks a seal reads (those of partial chunks; one the
    /// base holds only in part, cut by a truncation or grown past) and the
    /// cache lacks: to be fetched before sealing.
    pub fn seal_needs(&self) -> io::Result<Vec<u64>> {
        let mut needs: Vec<u64> = self.partial.keys().copied().collect();
        needs.extend(self.cut_chunk());
        needs.sort_unstable();
        self.not_held(needs)
    }

    /// The base's chunk cut by a truncation or grown past, if the cache
    /// lacks it: the one chunk a seal reads that no write of the copy made
    /// partial (a partial chunk's was fetched at its first write).
    pub fn cut_chunk_needed(&self) -> io::Result<Vec<u64>> {
        self.not_held(self.cut_chunk().into_iter().collect())
    }

    fn cut_chunk(&self) -> Option<u64> {
        let index = self.base_valid / self.chunk_size;
        let cut = !self.base_valid.is_multiple_of(self.chunk_size)
            && index < chunk_count(self.size, self.chunk_size)
            && !self.own.contains(&index);
        cut.then_some(index)
    }

    /// The chunks of `len` bytes at `offset` this copy reads from its base
    /// (a partial chunk's too) and the cache lacks (evicted): to be fetched
    /// before they are read or written over.
    pub fn missing_base(&self, offset: u64, len: u64) -> io::Result<Vec<u64>> {
        // By chunk: a write past the base's end into the chunk holding it
        // makes it partial over that chunk's valid part too.
        let wanted = (offset / self.chunk_size..(offset + len).div_ceil(self.chunk_size))
            .take_while(|index| index * self.chunk_size < self.base_valid)
            .filter(|index| !self.own.contains(index) || self.partial.contains_key(index))
            .collect();
        self.not_held(wanted)
    }

    /// Those of the base's chunks `indices` the cache lacks.
    fn not_held(&self, indices: Vec<u64>) -> io::Result<Vec<u64>> {
        let Some(base) = &self.base else {
            return Ok(Vec::new());
        };
        let mut missing = Vec::new();
        for index in indices {
            if base.locate(index)?.held.is_none() {
                missing.push(index);
            }
        }
        Ok(missing)
    }

    /// Brings the copy to exactly what its sealed version holds: every own
    /// chunk at its exact length; a chunk the base holds only in part, and
    /// a hole past the base, made own; the sums of all; and the chunks left
    /// (unchanged, of the same length) named in a layer over the base.
    fn prepare_seal(&mut self) -> io::Result<()> {
        let partial: Vec<u64> = self.partial.keys().copied().collect();
        for index in partial {
            self.fill(index)?;
        }
        self.log = None;
        let count = chunk_count(self.size, self.chunk_size);
        let (base_sums, base_layer) = match &self.base {
            Some(base) => (sums::read_all(&base.dir, count)?, base.layer()?.unwrap_or_default()),
            None => (Vec::new(), Arc::default()),
        };
        let mut all = Vec::with_capacity(count as usize);
        let mut layer = Layer::default();
        for index in 0..count {
            let want = (self.size - index * self.chunk_size).min(self.chunk_size);
            if !self.own.contains(&index) {
                match (self.base_chunk(index), &self.base) {
                    // Unchanged and of the same length: taken, with its sum,
                    // from where the base takes it (so a read goes at most
                    // one layer deep, however many seals come between
                    // settles).
                    (Some((_, valid)), Some(base)) if valid == want && valid == base.chunk_len(index) => {
                        match base_layer.source(index, self.chunk_size) {
                            Some(source) => layer.push(&source, index),
                            None => layer.push(base, index),
                        }
                        all.push(base_sums.get(index as usize).copied().flatten());
                        continue;
                    }
                    // The valid part of a base chunk, then zeros: written
                    // under a temporary name, so a crash never leaves a
                    // short own chunk that would read zeros.
                    (Some((_, valid)), Some(base)) => {
                        let mut bytes = base.read_chunk(index)?;
                        bytes.truncate(valid as usize);
                        bytes.resize(want as usize, 0);
                        let tmp = self.dir.join(format!("{index}.cow"));
                        std::fs::write(&tmp, &bytes)?;
                        std::fs::rename(&tmp, self.own_path(index))?;
                        self.own.insert(index);
                        self.hashes
                            .insert(index, ChunkHash::Running(Sha256::new_with_prefix(&bytes), want));
                    }
                    // A hole: zeros.
                    _ => {
                        drop(
                            File::options()
                                .write(true)
                                .create(true)
                                .truncate(false)
                                .open(self.own_path(index))?,
                        );
                        self.own.insert(index);
                        self.hashes.insert(index, ChunkHash::Running(Sha256::new(), 0));
                    }
                }
            }
            let file = File::options().write(true).open(self.own_path(index))?;
            if file.metadata()?.len() != want {
                file.set_len(want)?;
            }
            all.push(Some(self.own_sum(index, want)?));
            // Its sum is of the bytes as written (or just read back): its
            // first read need not hash it again (docs/BENCHMARKS.md).
            sums::written_checked(&self.own_path(index))?;
        }
        sums::write_all(&self.dir, &all)?;
        write_layer(&self.dir, &layer)
    }

    /// The last step of sealing: a recorded copy becomes its version
    /// directory (its state, which named its base and truncations for
    /// recovery, goes: the layer says what it takes from its base). Also
    /// run by recovery after a crash.
    pub fn finish_seal(copy_dir: &Path, version_dir: &Path) -> io::Result<()> {
        match std::fs::remove_file(copy_dir.join(STATE_FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        crate::sys::rename_retrying(copy_dir, version_dir)
    }

    /// Drops the working copy and its own chunks.
    pub fn discard(mut self) -> io::Result<()> {
        // Closed first: Windows cannot remove a directory with a file open.
        self.log = None;
        std::fs::remove_dir_all(&self.dir)
    }
}
