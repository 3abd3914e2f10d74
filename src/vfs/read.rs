//! Reads: from a file's working copy, or from its sealed version in the
//! cache, fetching missing chunks from the grid, with read-ahead.

use super::*;
use crate::download::Chunk;

/// Segments fetched ahead of a sequential reader.
pub(super) const READ_AHEAD_SEGMENTS: u64 = 4;
/// How far past chunk `c` a read entering it asks the disk for: a chunk
/// file's own read-ahead starts only at its first read. It ramps up as the
/// kernel's does, so a read of a file's first bytes asks for one chunk
/// more, and a long sequential read keeps READ_AHEAD_SEGMENTS ahead.
fn hinted_through(c: u64) -> u64 {
    c + (c + 1).min(READ_AHEAD_SEGMENTS)
}

/// Versions a read may find superseded and freed under it before it gives
/// up (each is a writer's close during this one read).
const READ_RETRIES: usize = 64;
/// The longest a read waits for a chunk the read-ahead is fetching before
/// fetching it itself.
const READ_AHEAD_WAIT: Duration = Duration::from_secs(30);
/// Writes a verified chunk into a version's cache directory atomically.
pub(super) fn store_chunk(cache: &Path, v: &Version, index: u64, chunk: &Chunk) -> std::io::Result<()> {
    let bytes = &chunk.bytes[..];
    let dir = version_dir(cache, v.ino, v.num);
    std::fs::create_dir_all(&dir)?;
    let tmp = cache
        .join("fetch")
        .join(format!("{}.{}.{index}.{:016x}", v.ino, v.num, rand::random::<u64>()));
    std::fs::write(&tmp, bytes)?;
    // The sum first: a chunk is never in the cache without it.
    let sum = chunk.sha256.unwrap_or_else(|| crate::stage::sums::sum_of(bytes));
    crate::stage::sums::record(&dir, index, &sum)?;
    let dest = dir.join(index.to_string());
    match std::fs::rename(&tmp, &dest) {
        // Noting it checked only spares a hash; a chunk evicted at once is
        // no error of the store.
        Ok(()) => {
            let _ = crate::stage::sums::written_checked(&dest);
            Ok(())
        }
        // Another fetch stored the same verified chunk first, and a reader
        // holds it open: Windows refuses to replace an open file. The bytes
        // are identical (a version never changes), so keep the one there.
        Err(_) if dest.exists() => std::fs::remove_file(&tmp),
        Err(e) => Err(e),
    }
}

impl Vfs {
    pub(super) fn sealed(&self, v: &Version) -> SealedVersion {
        SealedVersion::open(version_dir(&self.cache, v.ino, v.num), v.size, self.chunk_size())
    }

    /// The catalog's record of the sealed version in `dir`.
    pub(super) fn version_at(&self, dir: &Path) -> VfsResult<Option<Version>> {
        let Some((ino, num)) = version_dir_key(dir) else {
            return Ok(None);
        };
        self.read_catalog(|catalog| Ok(catalog.versions(ino)?.into_iter().find(|v| v.num == num)))
    }

    /// The chunks among `indices` of `v` to fetch from the grid before they
    /// are read, each with the version to fetch it from: absent ones
    /// (evicted), and damaged ones (of the wrong length; removed first).
    /// A chunk is fetched from the first version on its way (`v`, then the
    /// versions its layers name) that the grid holds, into that version's
    /// directory, where every version reading through it finds it. Where
    /// none is on the grid, a missing or damaged chunk is an error, never
    /// zeros. `deep` checks chunks against their sums too; a whole version
    /// (a restore) is checked by length only: reading every chunk of a big
    /// file would cost the whole file.
    pub(super) fn chunks_to_fetch(
        &self,
        v: &Version,
        indices: impl IntoIterator<Item = u64>,
        deep: bool,
    ) -> VfsResult<Vec<(Version, u64)>> {
        let sealed = self.sealed(v);
        let mut fetch = Vec::new();
        for index in indices {
            let state = sealed.chunk_state(index, deep);
            if state == ChunkState::Good {
                continue;
            }
            let found = sealed.locate(index)?;
            let mut source = None;
            for (i, on_way) in found.chain.iter().enumerate() {
                let known = if i == 0 {
                    Some(v.clone())
                } else {
                    self.version_at(&on_way.dir)?
                };
                if let Some(known) = known.filter(|k| k.cap.is_some()) {
                    source = Some(known);
                    break;
                }
            }
            let Some(source) = source else {
                // NotFound for a missing chunk: `read` retries, since the
                // version may have been superseded (and freed) meanwhile.
                let (what, kind) = match state {
                    ChunkState::Absent => ("missing", std::io::ErrorKind::NotFound),
                    _ => ("damaged", std::io::ErrorKind::InvalidData),
                };
                return Err(VfsError::Io(std::io::Error::new(
                    kind,
                    format!(
                        "version {} of file {}: staged chunk {index} is {what} and the version is not on the grid",
                        v.num, v.ino
                    ),
                )));
            };
            if let (ChunkState::Damaged, Some(path)) = (state, &found.held) {
                tracing::warn!(
                    ino = v.ino,
                    num = v.num,
                    index,
                    "a cached chunk was damaged; fetching it again"
                );
                let _ = std::fs::remove_file(path);
            }
            fetch.push((source, index));
        }
        Ok(fetch)
    }

    /// Fetches the chunks `missing` that a working copy reads from its base
    /// (evicted, or never fetched: an edit of a file not in the cache
    /// fetches only the chunks it reads or changes).
    pub(super) fn fetch_base(&self, work: &WorkingCopy, missing: Vec<u64>) -> VfsResult<()> {
        let Some(base) = work.base().filter(|_| !missing.is_empty()) else {
            return Ok(());
        };
        let v = self.version_at(&base.dir)?.ok_or_else(|| {
            VfsError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the version {} a working copy reads from is gone", base.dir.display()),
            ))
        })?;
        self.fetch_missing(&v, missing, true)
    }

    /// Fetches whichever chunks among `indices` of `v` the cache lacks or
    /// holds damaged, each from where [`Vfs::chunks_to_fetch`] says.
    pub(super) fn fetch_missing(
        &self,
        v: &Version,
        indices: impl IntoIterator<Item = u64>,
        deep: bool,
    ) -> VfsResult<()> {
        for (source, index) in self.chunks_to_fetch(v, indices, deep)? {
            // A chunk the read-ahead is fetching is waited for, not decoded
            // a second time beside it; fetched here if that failed.
            if self.wait_for_read_ahead(&source, index) && self.chunks_to_fetch(&source, [index], deep)?.is_empty() {
                continue;
            }
            self.fetch_chunk(&source, index)?;
        }
        Ok(())
    }

    /// Waits while read-ahead fetches chunk `index` of `v` (for as long as
    /// a fetch of our own could take, at most); whether it was.
    fn wait_for_read_ahead(&self, v: &Version, index: u64) -> bool {
        let key = (v.ino, v.num, index);
        let until = Instant::now() + READ_AHEAD_WAIT;
        let mut waited = false;
        while self.reading_ahead.lock().expect("read-ahead set").contains(&key) && Instant::now() < until {
            waited = true;
            std::thread::sleep(Duration::from_millis(1));
        }
        waited
    }

    /// Reads into `buf` from `offset`; the count read (0 at the end). The
    /// adapter lends the buffer: a fresh 1 MiB one per request was an mmap,
    /// 256 page faults and an munmap each time (docs/BENCHMARKS.md).
    pub fn read(&self, fh: u64, offset: u64, buf: &mut [u8]) -> VfsResult<usize> {
        let (ino, copy) = self.handle(fh, false)?;
        // A version superseded while we read may vanish, and one committed
        // while we read may have its chunks evicted: the catalog is read
        // again, for as long as it says something new (writers closing the
        // file beside us). The same version, as the catalog has it, missing
        // a chunk twice is the error.
        let mut vanished = None;
        let mut last = VfsError::NotFound;
        for _ in 0..READ_RETRIES {
            if let Some(work) = copy.read().expect("working copy lock").as_ref() {
                self.fetch_base(work, work.missing_base(offset, buf.len() as u64)?)?;
                return Ok(work.read_at(offset, buf)?);
            }
            let Some(version) = self.read_catalog(|catalog| Ok(catalog.latest(ino)?))? else {
                return Ok(0);
            };
            match self.read_version(&version, offset, buf) {
                Ok(n) => return Ok(n),
                Err(VfsError::Io(e))
                    if e.kind() == std::io::ErrorKind::NotFound
                        && vanished.as_ref() != Some(&(version.num, version.cap.clone())) =>
                {
                    vanished = Some((version.num, version.cap));
                    last = VfsError::Io(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Reads from a sealed version, fetching from the grid the chunks the
    /// cache does not hold, and starting read-ahead of the next ones.
    pub(super) fn read_version(&self, v: &Version, offset: u64, buf: &mut [u8]) -> VfsResult<usize> {
        if offset >= v.size {
            return Ok(0);
        }
        let cs = self.chunk_size();
        let end = (offset + buf.len() as u64).min(v.size);
        self.fetch_missing(v, offset / cs..end.div_ceil(cs), true)?;
        if v.cap.is_some() {
            self.read_ahead(v, end.div_ceil(cs));
        }
        let sealed = self.sealed(v);
        // A read entering a chunk asks the disk for the chunks up to
        // `hinted_through` of it that the chunk before did not ask for.
        let (first, last) = (offset / cs, (end - 1) / cs);
        let entered = if offset.is_multiple_of(cs) { first } else { first + 1 };
        if entered <= last {
            let from = match entered {
                0 => 1,
                e => hinted_through(e - 1) + 1,
            };
            for index in from..=hinted_through(last).min(v.size.div_ceil(cs) - 1) {
                sealed.will_need(index);
            }
        }
        Ok(sealed.read_at(offset, buf)?)
    }

    /// A reader of `v`'s bytes on the grid (kept by the storage index of
    /// the encoded version holding them: its own, its pack's or its
    /// manifest's).
    pub(super) fn grid_reader(&self, v: &Version) -> VfsResult<Arc<FileReader>> {
        let (ino, num) = (v.ino, v.num);
        let cap: FileCap = v
            .cap
            .as_deref()
            .ok_or(GridError::NotStored { ino, num })?
            .parse()
            .map_err(|source| GridError::BadCap { ino, num, source })?;
        let index = cap.stored().storage_index();
        if let Some(r) = self.readers.lock().expect("readers").get(&index) {
            if *r.cap() == cap {
                return Ok(r.clone());
            }
            if let Some(member) = r.sharing(&cap) {
                return Ok(Arc::new(member));
            }
        }
        let reader = self
            .runtime
            .block_on(FileReader::open(self.grid.clone(), cap))
            .map_err(GridError::from)?;
        let reader = Arc::new(reader);
        let mut readers = self.readers.lock().expect("readers");
        if readers.len() > 64 {
            readers.clear();
        }
        readers.insert(index, reader.clone());
        Ok(reader)
    }

    /// Downloads, verifies and caches one chunk of a version.
    pub(super) fn fetch_chunk(&self, v: &Version, index: u64) -> VfsResult<()> {
        let reader = self.grid_reader(v)?;
        let segment = self
            .runtime
            .block_on(reader.read_chunk(index, self.chunk_size(), &self.recent_segments))
            .map_err(GridError::from)?;
        store_chunk(&self.cache, v, index, &segment)?;
        self.cache_growth
            .fetch_add(segment.bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn read_ahead(&self, v: &Version, from: u64) {
        let chunks = v.size.div_ceil(self.chunk_size());
        let sealed = self.sealed(v);
        let held = |i: u64| sealed.locate(i).is_ok_and(|l| l.held.is_some());
        let wanted: Vec<u64> = {
            let mut inflight = self.reading_ahead.lock().expect("read-ahead set");
            (from..(from + READ_AHEAD_SEGMENTS).min(chunks))
                .filter(|&i| !held(i) && inflight.insert((v.ino, v.num, i)))
                .collect()
        };
        if wanted.is_empty() {
            return;
        }
        // Each chunk leaves the set however its fetch ends (a panic, or
        // the runtime dropping the task at shutdown too): a reader waits
        // for chunks in the set.
        let guards: Vec<InFlight> = wanted
            .iter()
            .map(|&i| InFlight(self.reading_ahead.clone(), (v.ino, v.num, i)))
            .collect();
        let Ok(reader) = self.grid_reader(v) else {
            return;
        };
        // One task per chunk: the runtime's threads fetch, verify and
        // decode them side by side, on every core.
        for (index, guard) in wanted.into_iter().zip(guards) {
            let (cache, v, growth) = (self.cache.clone(), v.clone(), self.cache_growth.clone());
            let (reader, recent) = (reader.clone(), self.recent_segments.clone());
            let chunk_size = self.chunk_size();
            self.runtime.spawn(async move {
                let _in_flight = guard;
                match reader.read_chunk(index, chunk_size, &recent).await {
                    Ok(segment) => {
                        if store_chunk(&cache, &v, index, &segment).is_ok() {
                            growth.fetch_add(segment.bytes.len() as u64, Ordering::Relaxed);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "read-ahead failed"),
                }
            });
        }
    }
}

/// A chunk on its way in read-ahead: in `Vfs::reading_ahead` until dropped.
struct InFlight(Arc<Mutex<std::collections::HashSet<(Ino, i64, u64)>>>, (Ino, i64, u64));

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}
