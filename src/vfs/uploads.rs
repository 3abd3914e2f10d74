//! The write-back upload queue: which sealed version goes next, whole or
//! packed, retries, and recording what the grid holds.

use super::*;
use crate::codec::Capability;
use crate::manifest::{self, Manifest};
use crate::upload::schedule::Queued;

/// Uploads running at once.
pub(super) const UPLOAD_CONCURRENCY: usize = 2;
/// How long `cairn sync` waits for releases of files closed just before it.
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Whether reading a sealed version failed because its staged bytes are
/// gone or cut short (its upload can never succeed), rather than for a
/// passing reason.
pub(super) fn is_damage(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData)
}

/// A file's queued versions, oldest first (by version number, whatever
/// its sign).
pub(super) fn queued(queue: &Queue, ino: Ino) -> impl Iterator<Item = (i64, &Pending)> {
    queue
        .range((ino, i64::MIN)..=(ino, i64::MAX))
        .map(|((_, num), p)| (*num, p))
}

/// How far `sync` got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// Every version closed before it is committed: how many there were.
    Done(usize),
    /// Its time was up first: versions not yet committed, and the last
    /// reason an upload of one failed (none if they are merely under way).
    Waiting {
        versions: usize,
        last_error: Option<String>,
    },
}

/// One entry of `cairn status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct QueueEntry {
    pub path: String,
    pub version: i64,
    pub size: u64,
    pub state: String,
    pub sent: u64,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    pub queue: Vec<QueueEntry>,
    pub open_for_write: Vec<String>,
    /// Share blocks held in memory by uploads now, and the budget.
    pub upload_memory_bytes: u64,
    pub upload_memory_limit: u64,
    /// Share blocks spilled to disk for servers that fell behind.
    pub spill_bytes: u64,
    /// The data path in use.
    #[serde(default)]
    pub io_path: super::IoPath,
}

pub(super) struct ProgressCounter(Arc<AtomicU64>);

impl upload::Progress for ProgressCounter {
    fn advance(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// A sealed version taken off the queue for upload.
pub(super) struct QueuedVersion {
    ino: Ino,
    num: i64,
    version: SealedVersion,
    sent: Arc<AtomicU64>,
}

impl QueuedVersion {
    fn key(&self) -> (Ino, i64) {
        (self.ino, self.num)
    }
}

pub(super) enum UploadJob {
    Whole(QueuedVersion),
    Pack(Vec<QueuedVersion>),
}

/// What the upload scheduler does next.
pub(super) enum Next {
    Job(UploadJob),
    /// Nothing to start yet: ask again then (`None`: when woken).
    At(Option<Instant>),
}

impl Vfs {
    pub fn status(&self) -> VfsResult<Status> {
        // A file just closed is released (and sealed) after close(2)
        // returns: wait for that, as `sync` does, so it shows as queued.
        let grace_until = Instant::now() + CLOSE_GRACE;
        while Instant::now() < grace_until
            && (self.sealing.load(Ordering::SeqCst) > 0 || self.handles.iter().any(|h| h.closing))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        // The queue and the open files are read under their locks; their
        // paths (a walk up the tree per entry, and the queue may hold
        // 100,000 files) through a reader, with no lock held.
        let now = Instant::now();
        let entries: Vec<(Ino, QueueEntry)> = {
            let pending = self.queue();
            pending
                .iter()
                .map(|((ino, num), p)| {
                    let state = if p.uploading {
                        "uploading"
                    } else if self.ino_ready_at(&pending, *ino, now).is_none_or(|t| t > now) {
                        "waiting"
                    } else {
                        "queued"
                    };
                    let entry = QueueEntry {
                        path: String::new(),
                        version: *num,
                        size: p.size,
                        state: state.into(),
                        sent: p.sent.load(Ordering::Relaxed),
                        attempts: p.attempts,
                        last_error: p.last_error.clone(),
                    };
                    (*ino, entry)
                })
                .collect()
        };
        let writing: Vec<Ino> = self
            .files()
            .iter()
            .filter(|(_, f)| f.writers > 0)
            .map(|(ino, _)| *ino)
            .collect();
        let (queue, open_for_write) = self.read_catalog(|reader| {
            let mut queue = Vec::with_capacity(entries.len());
            for (ino, mut entry) in entries {
                entry.path = reader.path_of(ino)?;
                queue.push(entry);
            }
            let open_for_write = writing
                .into_iter()
                .map(|ino| reader.path_of(ino))
                .collect::<Result<_, _>>()?;
            Ok((queue, open_for_write))
        })?;
        let budget = &self.grid.budget;
        Ok(Status {
            queue,
            open_for_write,
            upload_memory_bytes: budget.memory_in_use(),
            upload_memory_limit: budget.memory_limit(),
            spill_bytes: budget.spill_in_use(),
            io_path: self.io_path(),
        })
    }

    /// Skips the write-back delay for everything queued and waits until
    /// every sealed version is committed (or superseded, or its file gone),
    /// or until `deadline`: then says what still waits, and why.
    pub async fn sync(self: &Arc<Self>, deadline: Option<Instant>) -> VfsResult<Synced> {
        // The kernel releases a closed file (which seals it) asynchronously,
        // so versions may still arrive while we wait: every round marks the
        // whole queue, and waits for handles closed just before `sync`.
        let grace_until = Instant::now() + CLOSE_GRACE;
        let mut seen = std::collections::BTreeSet::new();
        loop {
            let notified = self.queue_changed.notified();
            let (round, back) = self
                .blocking(move |vfs| {
                    let round = vfs.sync_round(grace_until, &mut seen);
                    Ok((round, seen))
                })
                .await?;
            seen = back;
            if let Some(synced) = round? {
                return Ok(Synced::Done(synced));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let queue = self.queue();
                // The version retried most: its error is the one that
                // keeps happening, so the one a user can act on.
                let last_error = queue
                    .values()
                    .filter(|p| p.last_error.is_some())
                    .max_by_key(|p| p.attempts)
                    .and_then(|p| p.last_error.clone());
                return Ok(Synced::Waiting {
                    versions: queue.len(),
                    last_error,
                });
            }
            self.upload_wake.notify_one();
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }

    /// One round of `sync`: marks the queue to skip the delay (noting what
    /// it held in `seen`); the number of versions seen once nothing is left.
    fn sync_round(
        &self,
        grace_until: Instant,
        seen: &mut std::collections::BTreeSet<(Ino, i64)>,
    ) -> VfsResult<Option<usize>> {
        // The pass over the whole queue (100,000 small files, say) holds
        // only the queue; `state` only for the final check.
        let (damaged, empty) = {
            let mut queue = self.queue();
            for (key, p) in queue.iter_mut() {
                p.flush = true;
                seen.insert(*key);
            }
            let damaged = queue
                .iter()
                .find(|(_, p)| p.damaged)
                .map(|(&(ino, num), p)| (ino, num, p.last_error.clone()));
            (damaged, queue.is_empty())
        };
        if let Some((ino, num, error)) = damaged {
            let path = self
                .lock()
                .catalog
                .path_of(ino)
                .unwrap_or_else(|_| format!("file {ino}"));
            return Err(VfsError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{path}: version {num} cannot be uploaded: {}",
                    error.as_deref().unwrap_or("its staged bytes cannot be read")
                ),
            )));
        }
        if !empty {
            return Ok(None);
        }
        // A last release removes its handle and counts its seal under
        // `state`, and its version is queued before the count drops: so
        // under `state` nothing closed can slip between the three checks.
        let st = self.lock();
        let closing = Instant::now() < grace_until && self.handles.iter().any(|h| h.closing);
        if self.queue().is_empty() && self.sealing.load(Ordering::SeqCst) == 0 && !closing {
            st.catalog.commit()?;
            return Ok(Some(seen.len()));
        }
        Ok(None)
    }

    /// Runs the upload scheduler forever: picks ready versions, skips the
    /// superseded, uploads with bounded concurrency, retries with backoff.
    /// First it clears what crashed uploads left on the servers.
    pub async fn run_uploads(self: Arc<Self>) {
        self.grid.clean_abandoned().await;
        let slots = Arc::new(tokio::sync::Semaphore::new(UPLOAD_CONCURRENCY));
        loop {
            let wake = self.upload_wake.notified();
            let permit = slots.clone().acquire_owned().await.expect("semaphore");
            match self.blocking(|vfs| vfs.next_upload()).await {
                Ok(Next::Job(job)) => {
                    let vfs = self.clone();
                    tokio::spawn(async move {
                        vfs.upload_one(job).await;
                        drop(permit);
                        vfs.upload_wake.notify_one();
                    });
                }
                Ok(Next::At(next)) => {
                    drop(permit);
                    let sleep = next.map_or(Duration::from_secs(3600), |t| {
                        t.saturating_duration_since(Instant::now())
                    });
                    let _ = tokio::time::timeout(sleep.max(Duration::from_millis(10)), wake).await;
                }
                Err(e) => {
                    drop(permit);
                    tracing::error!(error = %e, "upload scheduler");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// When the newest queued version of `ino` may start uploading
    /// (`upload::schedule::ready_at`). `None`: not now.
    pub(super) fn ino_ready_at(&self, queue: &Queue, ino: Ino, now: Instant) -> Option<Instant> {
        let versions: Vec<Queued> = queued(queue, ino).map(|(num, p)| p.as_queued(ino, num)).collect();
        crate::upload::schedule::ready_at(&versions, self.options.writeback_delay, now)
    }

    /// The next upload, as `upload::schedule` decides from the queue.
    /// Versions it finds superseded leave the queue (their cached chunks
    /// are freed after the lock is dropped).
    pub(super) fn next_upload(&self) -> VfsResult<Next> {
        use crate::upload::schedule::{self, Job};
        let (next, superseded) = {
            let mut queue = self.queue();
            let all: Vec<Queued> = queue.iter().map(|(&(ino, num), p)| p.as_queued(ino, num)).collect();
            let decision = schedule::next(&all, self.options.writeback_delay, Instant::now());
            for key in &decision.superseded {
                queue.remove(key);
            }
            let queued = |queue: &Queue, (ino, num): (Ino, i64)| {
                let p = &queue[&(ino, num)];
                QueuedVersion {
                    ino,
                    num,
                    version: SealedVersion::open(version_dir(&self.cache, ino, num), p.size, self.chunk_size()),
                    sent: p.sent.clone(),
                }
            };
            let next = match decision.job {
                Some(Job::Whole(ino, num)) => {
                    let job = UploadJob::Whole(queued(&queue, (ino, num)));
                    Next::Job(Self::take(&mut queue, job))
                }
                Some(Job::Pack(members)) => {
                    let job = UploadJob::Pack(members.into_iter().map(|m| queued(&queue, m)).collect());
                    Next::Job(Self::take(&mut queue, job))
                }
                None => Next::At(decision.ask_at),
            };
            (next, decision.superseded)
        };
        if superseded.is_empty() {
            return Ok(next);
        }
        self.queue_changed.notify_waiters();
        // Superseded before their upload started: never uploaded. A newer
        // version may read chunks through one (its layer): each version of
        // the file is settled first, and a directory is kept (its row says
        // superseded) if that fails.
        let mut freed = ToFree::default();
        let mut marked = Vec::new();
        let recorded = {
            let st = self.lock();
            superseded.iter().try_for_each(|&(ino, num)| {
                st.catalog.set_version_state(ino, num, VersionState::Superseded)?;
                marked.push((ino, num));
                tracing::debug!(ino, num, "superseded before upload");
                Ok::<_, CatalogError>(())
            })
        };
        for &(ino, num) in &marked {
            match self.settle_beside_seals(ino) {
                Ok(()) => freed = std::mem::take(&mut freed).and(version_dir(&self.cache, ino, num)),
                Err(e) => {
                    tracing::warn!(ino, num, error = %e, "settling the versions of a file; its superseded version stays cached")
                }
            }
        }
        freed.free();
        recorded?;
        Ok(next)
    }

    /// [`Vfs::settle_file`] under the file's copy lock, before a version of
    /// it is freed: a seal takes an unchanged chunk from where its base
    /// takes it, which may be that version, so one in flight finishes (and
    /// is settled here) first, and one after reads its base settled. The
    /// upload loop waits meanwhile for a seal of the file in flight.
    fn settle_beside_seals(&self, ino: Ino) -> VfsResult<()> {
        let copy = {
            let mut st = self.lock();
            match Self::orphaned(&st, ino)? {
                true => None,
                false => Some(self.copy_lock(&mut st, ino)),
            }
        };
        let guard = copy.as_ref().map(write_copy);
        let settled = self.settle_file(ino);
        drop(guard);
        drop(copy);
        self.let_go(ino)?;
        settled
    }

    /// Settles every cached version of `ino`, oldest first, so that none
    /// reads through another that is about to go.
    fn settle_file(&self, ino: Ino) -> VfsResult<()> {
        let versions = self.read_catalog(|catalog| Ok(catalog.versions(ino)?))?;
        let on_grid: std::collections::HashSet<PathBuf> = versions
            .iter()
            .filter(|v| v.state == VersionState::Committed)
            .map(|v| version_dir(&self.cache, v.ino, v.num))
            .collect();
        for v in &versions {
            self.sealed(v).settle(&|dir| on_grid.contains(dir))?;
        }
        Ok(())
    }

    /// A sealed version settled and with every chunk in the cache (a pack
    /// member, read whole).
    fn make_whole(&self, v: &Version) -> VfsResult<()> {
        self.settle_file(v.ino)?;
        self.fetch_missing(v, 0..v.size.div_ceil(self.chunk_size()), false)
    }

    /// Marks a job's versions as uploading.
    pub(super) fn take(queue: &mut Queue, job: UploadJob) -> UploadJob {
        let members = match &job {
            UploadJob::Whole(one) => std::slice::from_ref(one),
            UploadJob::Pack(many) => many.as_slice(),
        };
        for m in members {
            let p = queue.get_mut(&(m.ino, m.num)).expect("queued");
            p.uploading = true;
            p.sent.store(0, Ordering::Relaxed);
        }
        job
    }

    /// A fresh key for every upload attempt of a version: a retry may read
    /// other bytes than the attempt before it (a damaged cache), and a key
    /// must never encrypt two plaintexts. The key is recorded (committed)
    /// before any share is written under it, and the shares an earlier
    /// attempt left under its own key are deleted first, so a retry does not
    /// orphan them.
    pub(super) async fn upload_key(self: &Arc<Self>, ino: Ino, num: i64) -> VfsResult<crate::codec::Key> {
        let key: crate::codec::Key = rand::random();
        let previous = self
            .blocking(move |vfs| {
                let st = vfs.lock();
                let previous = st
                    .catalog
                    .new_upload_key(ino, num, &data_encoding::HEXLOWER.encode(&key))?;
                st.catalog.commit()?;
                Ok(previous)
            })
            .await?;
        let previous = previous.and_then(|k| data_encoding::HEXLOWER.decode(k.as_bytes()).ok());
        if let Some(old) = previous.and_then(|k| crate::codec::Key::try_from(k).ok()) {
            let si = crate::codec::storage_index_for(&old);
            if let Err(failures) = crate::gc::delete_shares(&self.grid, si).await {
                tracing::debug!(ino, num, ?failures, "an earlier attempt's shares stay on some servers");
            }
        }
        Ok(key)
    }

    pub(super) async fn upload_one(self: &Arc<Self>, job: UploadJob) {
        match job {
            UploadJob::Whole(queued) => self.upload_whole(queued).await,
            UploadJob::Pack(members) => self.upload_pack(members).await,
        }
        self.queue_changed.notify_waiters();
    }

    /// Uploads small versions as one pack: read whole (each at most
    /// [`pack::MEMBER_MAX`]), each encrypted under its own key, encoded
    /// once, and each recorded with its range and key. A version that cannot
    /// be read is left out (and fails); a failed pack puts every member back
    /// for a retry, in a new pack under new keys (its partial shares are
    /// cleaned at the next mount).
    /// Uploads `source` as a new version of its own, under a fresh key (a
    /// pack, a checkpoint).
    pub(super) async fn upload_source(
        &self,
        source: upload::Source,
    ) -> Result<upload::UploadReport, upload::UploadError> {
        upload::upload(
            &self.grid,
            self.params,
            self.happy,
            source,
            rand::random(),
            Arc::new(()),
        )
        .await
    }

    pub(super) async fn upload_pack(self: &Arc<Self>, members: Vec<QueuedVersion>) {
        let sources: Vec<SealedVersion> = members.iter().map(|m| m.version.clone()).collect();
        // A member edited while not in the cache reads chunks through
        // others: all of them are fetched first (a member is small). One
        // that cannot be fails below, when it is read.
        let dirs: Vec<PathBuf> = sources.iter().map(|v| v.dir.clone()).collect();
        let _ = self
            .blocking(move |vfs| {
                for dir in dirs {
                    let whole = vfs
                        .version_at(&dir)
                        .and_then(|v| v.map_or(Ok(()), |v| vfs.make_whole(&v)));
                    if let Err(e) = whole {
                        tracing::debug!(dir = %dir.display(), error = %e, "a pack member is not all in the cache");
                    }
                }
                Ok(())
            })
            .await;
        let assembled = tokio::task::spawn_blocking(move || {
            pack::assemble(sources.iter().map(|v| (v.reader(), v.size, rand::random())))
        })
        .await;
        let packed = match assembled {
            Ok(packed) => packed,
            Err(e) => {
                let mut queue = self.queue();
                for m in &members {
                    Self::upload_failed(&mut queue, m.key(), &format!("reading versions to pack: {e}"), false);
                }
                return;
            }
        };
        let mut going = Vec::new();
        {
            let mut queue = self.queue();
            for (m, at) in members.into_iter().zip(packed.members) {
                match at {
                    Ok(at) => going.push((m, at)),
                    Err(e) => {
                        let damaged = is_damage(&e);
                        Self::upload_failed(
                            &mut queue,
                            m.key(),
                            &format!("reading the sealed version: {e}"),
                            damaged,
                        )
                    }
                }
            }
        }
        if going.is_empty() {
            return;
        }
        let source = upload::Source {
            size: packed.bytes.len() as u64,
            reader: Box::new(std::io::Cursor::new(packed.bytes)),
        };
        let result = self.upload_source(source).await;
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                let mut queue = self.queue();
                for (m, _) in &going {
                    Self::upload_failed(&mut queue, m.key(), &e.to_string(), false);
                }
                return;
            }
        };
        let degraded = report.placed.len() < self.params.total as usize;
        let done: Vec<_> = going
            .iter()
            .map(|(m, at)| {
                let cap = FileCap::Packed {
                    pack: report.cap.clone(),
                    offset: at.offset,
                    len: at.len,
                    member_key: Some(at.key),
                };
                (m.key(), cap, Some(at.sha256))
            })
            .collect();
        if self.record_committed(done, degraded).await {
            tracing::info!(files = going.len(), shares = report.placed.len(), "committed a pack");
        }
    }

    /// Versions are on the grid: recorded (committed at once: nothing else
    /// knows their keys), and off the queue. If the record cannot be written
    /// (a full disk), they stay queued and are uploaded again later, under
    /// new keys. Returns whether they were recorded.
    pub(super) async fn record_committed(
        self: &Arc<Self>,
        done: Vec<((Ino, i64), FileCap, Option<crate::codec::Hash>)>,
        degraded: bool,
    ) -> bool {
        let recorded = self
            .blocking(move |vfs| Ok(vfs.record_committed_now(&done, degraded)))
            .await;
        recorded.unwrap_or_else(|e| {
            tracing::error!(error = %e, "recording committed versions");
            false
        })
    }

    fn record_committed_now(&self, done: &[((Ino, i64), FileCap, Option<crate::codec::Hash>)], degraded: bool) -> bool {
        // What is recorded is written out before the lock is taken; a
        // version made without every byte at hand has no whole SHA-256.
        let done: Vec<((Ino, i64), String, String)> = done
            .iter()
            .map(|(key, cap, sha256)| {
                let hex = sha256.map(|h| data_encoding::HEXLOWER.encode(&h)).unwrap_or_default();
                (*key, cap.to_string(), hex)
            })
            .collect();
        // `state` is held to the end, so no file is deleted meanwhile; the
        // queue only while it is read or changed, never across the commit.
        let st = self.lock();
        // Versions of files deleted during their upload were dropped.
        let done: Vec<_> = {
            let queue = self.queue();
            done.iter().filter(|(key, _, _)| queue.contains_key(key)).collect()
        };
        let record = || -> Result<(), CatalogError> {
            for ((ino, num), cap, sha) in &done {
                st.catalog.commit_version(*ino, *num, cap, sha)?;
                // Happiness held without every server: repaired later.
                if degraded {
                    st.catalog.set_degraded(*ino, *num, true)?;
                }
            }
            st.catalog.commit().map(drop)
        };
        let recorded = record();
        let mut queue = self.queue();
        match recorded {
            Ok(()) => {
                for (key, _, _) in &done {
                    queue.remove(key);
                }
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "recording committed versions");
                for (key, _, _) in &done {
                    Self::upload_failed(
                        &mut queue,
                        *key,
                        &format!("recording the committed version: {e}"),
                        false,
                    );
                }
                false
            }
        }
    }

    /// An upload attempt failed: the version waits, backing off, to retry.
    /// `damaged`: its staged bytes cannot be read; `cairn sync` says so
    /// rather than wait for it.
    pub(super) fn upload_failed(queue: &mut Queue, (ino, num): (Ino, i64), error: &str, damaged: bool) {
        if let Some(p) = queue.get_mut(&(ino, num)) {
            p.attempts += 1;
            p.uploading = false;
            p.damaged = damaged;
            let backoff = Duration::from_secs(1 << p.attempts.min(6));
            p.retry_at = Some(Instant::now() + backoff);
            p.last_error = Some(error.to_owned());
            tracing::warn!(ino, num, error, ?backoff, "upload failed; will retry");
        }
    }

    pub(super) async fn upload_whole(self: &Arc<Self>, job: QueuedVersion) {
        // A retry after recording failed: if SQLite kept the failed batch
        // open, a later call's commit may have recorded the earlier attempt
        // after all, and its shares (which the new attempt would delete)
        // are then the version's.
        let (ino, num) = job.key();
        let committed = self
            .blocking(move |vfs| {
                Ok(vfs
                    .lock()
                    .catalog
                    .versions(ino)?
                    .iter()
                    .any(|v| v.num == num && v.cap.is_some()))
            })
            .await;
        if let Ok(true) = committed {
            tracing::debug!(ino, num, "recorded after all; not uploaded again");
            self.queue().remove(&(job.ino, job.num));
            return;
        }
        let key = match self.upload_key(job.ino, job.num).await {
            Ok(key) => key,
            Err(e) => {
                return Self::upload_failed(
                    &mut self.queue(),
                    job.key(),
                    &format!("recording the upload key: {e}"),
                    false,
                );
            }
        };
        let base = self.delta_base(&job).await;
        let segment = self.params.segment_size;
        let base_sums = base
            .as_ref()
            .map(|(num, m, _)| (version_dir(&self.cache, ino, *num), m.clone()));
        let version = job.version.clone();
        let summed = self
            .blocking(move |vfs| vfs.segment_sums(ino, num, &version, base_sums))
            .await;
        let (sums, sha256) = match summed {
            Ok(summed) => summed,
            Err(VfsError::Io(e)) => {
                let damaged = is_damage(&e);
                let why = format!("reading the sealed version: {e}");
                return Self::upload_failed(&mut self.queue(), job.key(), &why, damaged);
            }
            Err(e) => return Self::upload_failed(&mut self.queue(), job.key(), &e.to_string(), false),
        };
        let size = job.version.size;
        let base = base.as_ref().map(|(_, m, own)| (m, own));
        let plan = manifest::plan(size, segment, &sums, base.map(|(m, _)| m));
        // Segments it sends that the cache lacks (an edit of a file not in
        // the cache) are fetched first.
        let fresh = plan.fresh.clone();
        let fetched = self
            .blocking(move |vfs| {
                let Some(v) = vfs.version_at(&version_dir(&vfs.cache, ino, num))? else {
                    return Err(VfsError::NotFound);
                };
                vfs.fetch_missing(&v, fresh, false)
            })
            .await;
        if let Err(e) = fetched {
            let damaged = matches!(&e, VfsError::Io(io) if is_damage(io));
            let why = format!("fetching the segments it sends: {e}");
            return Self::upload_failed(&mut self.queue(), job.key(), &why, damaged);
        }
        let manifest = manifest::build(size, segment, sha256, &sums, &plan, base).to_bytes();
        let ranges: Vec<(u64, u64)> = plan
            .fresh
            .iter()
            .map(|&j| (j * segment as u64, (size - j * segment as u64).min(segment as u64)))
            .collect();
        let manifest_at: u64 = ranges.iter().map(|(_, len)| len).sum();
        let expect = plan
            .fresh
            .iter()
            .zip(&ranges)
            .map(|(&j, &(_, len))| (len, sums[j as usize]))
            .collect();
        let fresh = Checked {
            inner: job.version.ranges(ranges),
            expect,
            hasher: sha2::Sha256::default(),
            got: 0,
        };
        let source = upload::Source {
            size: manifest_at + manifest.len() as u64,
            reader: Box::new(std::io::Read::chain(fresh, std::io::Cursor::new(manifest))),
        };
        let result = upload::upload(
            &self.grid,
            self.params,
            self.happy,
            source,
            key,
            Arc::new(ProgressCounter(job.sent.clone())),
        )
        .await;
        match result {
            Ok(report) => {
                let degraded = report.placed.len() < self.params.total as usize;
                let cap = FileCap::Mapped {
                    size,
                    manifest_at,
                    own: report.cap,
                };
                if self.record_committed(vec![(job.key(), cap, sha256)], degraded).await {
                    tracing::info!(
                        ino = job.ino,
                        num = job.num,
                        segments = plan.fresh.len(),
                        of = sums.len(),
                        shares = report.placed.len(),
                        "committed"
                    );
                }
            }
            Err(e) => {
                let damaged = matches!(&e, upload::UploadError::Source(io) if is_damage(io));
                Self::upload_failed(&mut self.queue(), job.key(), &e.to_string(), damaged)
            }
        }
    }

    /// The SHA-256 of every segment of `version` (version `num` of `ino`),
    /// and of the whole when the cache holds every byte. It is settled
    /// first (see [`SealedVersion::settle`]). Segments held are read,
    /// checked against the cache's sums; one the cache lacks (the file was
    /// edited while not in the cache) has its sum from the sums the version
    /// took from its base, or from the manifest of `base` (the delta base:
    /// its directory and manifest) when it was written there, or else is
    /// fetched.
    fn segment_sums(
        &self,
        ino: Ino,
        num: i64,
        version: &SealedVersion,
        base: Option<(PathBuf, Manifest)>,
    ) -> VfsResult<(Vec<manifest::Hash>, Option<manifest::Hash>)> {
        use sha2::Digest;
        use std::io::Read;
        self.settle_file(ino)?;
        let segment = version.chunk_size;
        let count = version.size.div_ceil(segment);
        let recorded = crate::stage::sums::read_all(&version.dir, count)?;
        let mut known = std::collections::HashMap::new();
        let mut fetch = Vec::new();
        for index in 0..count {
            let found = version.locate(index)?;
            if found.held.is_some() {
                continue;
            }
            // Its own chunk, gone: the cache was damaged.
            if found.chain.len() == 1 {
                return Err(VfsError::Io(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "chunk {index} of the sealed version {} is missing",
                        version.dir.display()
                    ),
                )));
            }
            // Every version on its way holds the same bytes there.
            let from_base = base.as_ref().and_then(|(dir, m)| {
                let entry = m.segments.get(index as usize)?;
                let on_way = found.chain.iter().any(|v| v.dir == *dir);
                // Same segments: a base uploaded with another segment size
                // (another machine's) numbers other byte ranges.
                (on_way && m.segment_size as u64 == segment && m.segment_len(index) == version.chunk_len(index))
                    .then_some(entry.sha256)
            });
            match (recorded[index as usize], from_base) {
                (Some(sum), _) => drop(known.insert(index, sum)),
                // Kept, so a version sealed over this one knows it too.
                (None, Some(sum)) => {
                    crate::stage::sums::record(&version.dir, index, &sum)?;
                    known.insert(index, sum);
                }
                (None, None) => fetch.push(index),
            }
        }
        if !fetch.is_empty() {
            let v = self.version_at(&version.dir)?.ok_or(VfsError::NotFound)?;
            debug_assert_eq!((v.ino, v.num), (ino, num));
            self.fetch_missing(&v, fetch, false)?;
        }
        let mut whole = sha2::Sha256::new();
        let mut sums = Vec::with_capacity(count as usize);
        let mut buf = vec![0; segment as usize];
        for index in 0..count {
            if let Some(sum) = known.get(&index) {
                sums.push(*sum);
                continue;
            }
            let piece = &mut buf[..version.chunk_len(index) as usize];
            version
                .ranges(vec![(index * segment, piece.len() as u64)])
                .read_exact(piece)?;
            whole.update(&piece[..]);
            sums.push(sha2::Sha256::digest(&piece[..]).into());
        }
        Ok((sums, known.is_empty().then(|| whole.finalize().into())))
    }

    /// The version a new upload of `job`'s file takes unchanged segments
    /// from, with its manifest: the file's newest committed version, if it
    /// is mapped. gc keeps a live file's newest version whatever its age,
    /// and every object any retained version uses; an older one (the file
    /// went through packed versions since) may be thinned away meanwhile,
    /// so then every segment is sent, as it is when the manifest cannot be
    /// read now.
    async fn delta_base(self: &Arc<Self>, job: &QueuedVersion) -> Option<(i64, Manifest, Capability)> {
        let (ino, num) = job.key();
        let (base_num, base) = self
            .blocking(move |vfs| {
                let versions = vfs.lock().catalog.versions(ino)?;
                Ok(versions
                    .into_iter()
                    .rfind(|v| v.num < num && v.state == VersionState::Committed)
                    .and_then(|v| Some((v.num, v.cap?.parse::<FileCap>().ok()?)))
                    .filter(|(_, cap)| matches!(cap, FileCap::Mapped { .. })))
            })
            .await
            .ok()??;
        match FileReader::open(self.grid.clone(), base.clone()).await {
            Ok(reader) => Some((base_num, reader.manifest()?.clone(), base.stored().clone())),
            Err(e) => {
                tracing::debug!(ino, num, error = %e, "the previous version's manifest is not readable: sending every segment");
                None
            }
        }
    }
}

/// The segments an upload sends, as it reads them, each checked against
/// the hash its manifest records (taken by an earlier read): a chunk
/// changed in the cache between the two reads fails the upload rather
/// than commit a version its manifest contradicts.
struct Checked {
    inner: crate::stage::chunks::SealedReader,
    /// (length, SHA-256) of each segment still to read, in order.
    expect: std::collections::VecDeque<(u64, manifest::Hash)>,
    hasher: sha2::Sha256,
    got: u64,
}

impl std::io::Read for Checked {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.read(buf)?;
        let mut data = &buf[..n];
        while !data.is_empty() {
            let Some(&(len, sum)) = self.expect.front() else {
                return Err(std::io::Error::other("the sealed version holds more than its segments"));
            };
            let take = ((len - self.got) as usize).min(data.len());
            self.hasher.update(&data[..take]);
            (self.got, data) = (self.got + take as u64, &data[take..]);
            if self.got == len {
                if <[u8; 32]>::from(std::mem::take(&mut self.hasher).finalize()) != sum {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "a segment of the sealed version changed while it was uploaded: the staging cache was damaged",
                    ));
                }
                self.expect.pop_front();
                self.got = 0;
            }
        }
        Ok(n)
    }
}
