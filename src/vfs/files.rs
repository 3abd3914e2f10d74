//! Open files and the write path: handles, working copies over a file's
//! newest version, writes, fsync, and sealing at the last release.

use super::*;

/// A seal between the release that decided it and its version's entry in
/// the queue, counted in [`Vfs::sealing`] while it lives.
struct Sealing<'a>(&'a AtomicUsize);

impl<'a> Sealing<'a> {
    fn start(count: &'a AtomicUsize) -> Sealing<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Sealing(count)
    }
}

impl Drop for Sealing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Vfs {
    /// A new handle of `ino`, counted in its entry. Callers hold `state`,
    /// so an unlink or rename (which ask whether the file is in use) sees
    /// the handle or comes before it.
    pub(super) fn add_handle(&self, _st: &mut State, ino: Ino, write: bool) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mut files = self.files();
        let file = files.entry(ino).or_default();
        file.handles += 1;
        if write {
            file.writers += 1;
        }
        let copy = file.copy.clone();
        self.handles.insert(
            fh,
            Handle {
                ino,
                write,
                closing: false,
                copy,
            },
        );
        fh
    }

    /// The file and working-copy lock of a handle, without `state`.
    pub(super) fn handle(&self, fh: u64, write: bool) -> VfsResult<(Ino, CopyLock)> {
        let h = self.handles.get(&fh).ok_or(VfsError::BadHandle)?;
        if write && !h.write {
            return Err(VfsError::BadHandle);
        }
        Ok((h.ino, h.copy.clone()))
    }

    pub(super) fn new_working_copy(&self, ino: Ino, base: Option<SealedVersion>) -> VfsResult<WorkingCopy> {
        let dir = self
            .cache
            .join("work")
            .join(format!("{ino}-{:016x}", rand::random::<u64>()));
        let work = WorkingCopy::create_with(dir, base, self.chunk_size(), |d, files| self.spares.make(d, files))?;
        if self.spares.claim_refill() {
            let spares = self.spares.clone();
            self.runtime.spawn_blocking(move || spares.refill());
        }
        Ok(work)
    }

    /// The working-copy lock of `ino`, to take after `state` is dropped.
    /// Holding it keeps the file's entry in the table. Under `state`, as
    /// [`Vfs::add_handle`]: [`Vfs::forget_if_idle`] relies on both.
    pub(super) fn copy_lock(&self, _st: &mut State, ino: Ino) -> CopyLock {
        self.files().entry(ino).or_default().copy.clone()
    }

    /// Drops the entry of a file nothing uses any more: no handle, and
    /// nobody but the table holds its copy lock. A file unlinked while
    /// open goes with it, content and all (returned, to free after the
    /// lock): whoever lets it go last, a release or a seal in flight.
    pub(super) fn forget_if_idle(&self, st: &mut State, ino: Ino) -> VfsResult<ToFree> {
        let idle = match self.files().get(&ino) {
            None => return Ok(ToFree::default()),
            Some(file) if file.in_use() => return Ok(ToFree::default()),
            Some(file) => file.working.is_none(),
        };
        // Nothing can take the entry meanwhile: that needs `state`.
        if !Self::orphaned(st, ino)? {
            if idle {
                self.files().remove(&ino);
            }
            return Ok(ToFree::default());
        }
        let file = self.files().remove(&ino).expect("looked up");
        // Nobody else holds the lock: this never waits.
        let work = file.copy.try_write().ok().and_then(|mut copy| copy.take());
        st.catalog.forget_orphan(ino)?;
        self.drop_queued(ino);
        let mut freed = ToFree::versions(&self.cache, &st.catalog, ino);
        if let Some(work) = work {
            freed = freed.and(work.dir().to_owned());
        }
        Ok(freed)
    }

    /// Lets go of `ino` after a call that held its copy lock (dropped
    /// before this): see [`Vfs::forget_if_idle`].
    pub(super) fn let_go(&self, ino: Ino) -> VfsResult<()> {
        let freed = self.forget_if_idle(&mut self.lock(), ino)?;
        freed.free();
        Ok(())
    }

    /// Whether `ino` was unlinked (it lives on only through its handles,
    /// not through hard links).
    pub(super) fn orphaned(st: &State, ino: Ino) -> VfsResult<bool> {
        Ok(!st.catalog.is_live(ino)?)
    }

    /// A file's entry, which a holder of its copy lock always finds.
    fn entry(files: &mut Files, ino: Ino) -> VfsResult<&mut OpenFile> {
        files.get_mut(&ino).ok_or(VfsError::NotFound)
    }

    /// Records a change of the working copy (held in `work`, under its
    /// lock): dirty, modified now, its size. Returns the file's writers.
    fn changed(&self, ino: Ino, work: &WorkingCopy) -> VfsResult<usize> {
        let mut files = self.files();
        let file = Self::entry(&mut files, ino)?;
        file.dirty = true;
        file.modified_ns = Some(crate::catalog::now_ns());
        if let Some(shown) = file.working.as_mut() {
            shown.size = work.size();
        }
        Ok(file.writers)
    }

    pub fn open(&self, ino: Ino, write: bool, truncate: bool) -> VfsResult<u64> {
        if write {
            self.writable()?;
        }
        let copy = {
            let mut st = self.lock();
            let node = Self::node(&st.catalog, ino)?;
            if node.kind == Kind::Dir && write {
                return Err(VfsError::IsDir);
            }
            if !truncate {
                return Ok(self.add_handle(&mut st, ino, write));
            }
            self.copy_lock(&mut st, ino)
        };
        let mut guard = write_copy(&copy);
        let truncated = self.ensure_working(ino, &mut guard, false).and_then(|()| {
            let work = guard.as_mut().expect("ensured");
            work.truncate(0)?;
            Ok(work)
        });
        let mut st = self.lock();
        let result = truncated.and_then(|work| {
            self.changed(ino, work)?;
            // Counted before the copy's lock is let go: a release of the
            // file's last other writer must not seal it truncated.
            Ok(self.add_handle(&mut st, ino, write))
        });
        drop(st);
        drop(guard);
        drop(copy);
        self.let_go(ino)?;
        result
    }

    /// Makes sure `ino` has a working copy, over its newest version, in
    /// `copy` (the held lock). O(1): the base's chunks are fetched when the
    /// copy first reads or changes them, not before (`fetch_base`). Without
    /// `keep_base` (the caller is about to truncate to zero) a new copy
    /// starts empty: `> file` needs none of the old bytes.
    pub(super) fn ensure_working(&self, ino: Ino, copy: &mut Option<WorkingCopy>, keep_base: bool) -> VfsResult<()> {
        if copy.is_some() {
            return Ok(());
        }
        let latest = match keep_base {
            true => self.lock().catalog.latest(ino)?,
            false => None,
        };
        let work = self.new_working_copy(ino, latest.as_ref().map(|v| self.sealed(v)))?;
        // Eviction spares the base from now on.
        if let Some(file) = self.files().get_mut(&ino) {
            file.working = Some(Working::of(&work));
        }
        *copy = Some(work);
        Ok(())
    }

    /// Applies a change to a file's working copy. With no writer holding
    /// the file open (truncate(2) by path), the change is sealed at once.
    pub(super) fn modify(
        &self,
        ino: Ino,
        keep_base: bool,
        change: impl FnOnce(&mut WorkingCopy) -> std::io::Result<()>,
    ) -> VfsResult<()> {
        let copy = {
            let mut st = self.lock();
            let node = Self::node(&st.catalog, ino)?;
            if node.kind != Kind::File {
                return Err(if node.kind == Kind::Dir {
                    VfsError::IsDir
                } else {
                    VfsError::Invalid
                });
            }
            self.copy_lock(&mut st, ino)
        };
        let mut guard = write_copy(&copy);
        let result = self.ensure_working(ino, &mut guard, keep_base).and_then(|()| {
            let work = guard.as_mut().expect("ensured");
            change(work)?;
            // What its seal will read, fetched now (see `write`); if the
            // grid cannot serve it now, the seal says so.
            if let Err(e) = work
                .seal_needs()
                .map_err(VfsError::from)
                .and_then(|n| self.fetch_base(work, n))
            {
                tracing::warn!(ino, error = %e, "fetching what a seal will read");
            }
            if self.changed(ino, work)? == 0 {
                self.seal(ino, &mut guard, "change without an open writer", false)?;
            }
            Ok(())
        });
        drop(guard);
        drop(copy);
        self.let_go(ino)?;
        result
    }

    /// Drops a file's set-user/group-ID bits before a write that must not
    /// keep them (the kernel says so when the writer lacks CAP_FSETID).
    pub fn drop_setid(&self, ino: Ino) -> VfsResult<()> {
        let st = self.lock();
        let mut node = Self::node(&st.catalog, ino)?;
        let mode = without_setid(node.mode);
        if mode != node.mode {
            node.mode = mode;
            node.ctime_ns = crate::catalog::now_ns();
            st.catalog.update_attrs(&node)?;
            st.catalog.commit()?;
        }
        Ok(())
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> VfsResult<usize> {
        let (ino, copy) = self.handle(fh, true)?;
        self.ensure_space(data.len() as u64)?;
        let mut guard = write_copy(&copy);
        self.ensure_working(ino, &mut guard, true)?;
        let work = guard.as_mut().expect("ensured");
        // Besides what the write copies on write: a write past the base's
        // short last chunk makes the seal read that chunk's valid part,
        // fetched while the grid is at hand, so that recovery after a crash
        // (which has no grid) can seal the copy.
        let mut needs = work.missing_base(offset, data.len() as u64)?;
        needs.extend(work.cut_chunk_needed()?);
        needs.sort_unstable();
        needs.dedup();
        self.fetch_base(work, needs)?;
        work.write_at(offset, data)?;
        self.cache_growth.fetch_add(data.len() as u64, Ordering::Relaxed);
        // No `state`: the file's name was committed when it was made.
        self.changed(ino, work)?;
        Ok(data.len())
    }

    /// Data writes stop with ENOSPC while a reserve is still free on the
    /// cache's disk (2% of it, 4 to 256 MiB), so deleting files, sealing and
    /// the catalog keep working on a full disk and space can be freed.
    pub(super) fn ensure_space(&self, bytes: u64) -> VfsResult<()> {
        let (total, free) = fs_space(&self.cache)?;
        let reserve = (total / 50).clamp(4 << 20, 256 << 20);
        if free < reserve + bytes {
            return Err(crate::sys::disk_full().into());
        }
        Ok(())
    }

    /// fsync(2): the file's bytes written so far and every catalog commit
    /// (names, attributes) become durable. Under the lock only the WAL's
    /// name (and a commit that failed before); the syncing runs after.
    pub fn fsync(&self, fh: u64) -> VfsResult<()> {
        // One fsync at a time: a second one must not return while the
        // first still syncs what the second was also asked to.
        let _one = self.syncing.lock().expect("fsync lock");
        let (_, copy) = self.handle(fh, false)?;
        let wal = {
            // Only a commit that failed earlier can be waiting: it must
            // succeed now, or fsync fails.
            let st = self.lock();
            st.catalog.commit()?;
            st.catalog.wal_path()
        };
        // The files to sync are opened under the copy's lock; the syncing
        // runs after it is let go, so writes go on meanwhile.
        let pending = write_copy(&copy).as_mut().map(|work| work.take_sync()).transpose()?;
        if let Some(pending) = pending {
            if let Err(e) = pending.run() {
                if let Some(work) = write_copy(&copy).as_mut() {
                    work.give_back(pending);
                }
                return Err(e.into());
            }
        }
        self.sync_catalog(wal)
    }

    /// Makes every catalog commit so far durable: its WAL `wal` synced
    /// without `state` (or, with no WAL, a full sync under it).
    pub(super) fn sync_catalog(&self, wal: Option<PathBuf>) -> VfsResult<()> {
        let Some(wal) = wal else {
            return Ok(self.lock().catalog.sync_to_disk()?);
        };
        match crate::sys::sync_file(&wal) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        }
        // The WAL's own name, once: SQLite syncs it only at a checkpoint.
        if !self.wal_dir_synced.swap(true, Ordering::Relaxed) {
            if let Err(e) = wal.parent().map_or(Ok(()), crate::sys::sync_dir) {
                self.wal_dir_synced.store(false, Ordering::Relaxed);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// A close(2) of a descriptor. This does not seal: a flush also comes
    /// whenever any process holding a copy of the descriptor closes it (a
    /// fork+exec anywhere in a multithreaded writer closes inherited
    /// descriptors), so it says nothing about the writer being done. The
    /// handle is marked closing, so `cairn sync` can wait for its release.
    /// What a closed file needs to survive a crash of the daemon (its name,
    /// its attributes) was committed by the calls that changed it.
    pub fn flush(&self, fh: u64) -> VfsResult<()> {
        if let Some(mut handle) = self.handles.get_mut(&fh) {
            if handle.write {
                handle.closing = true;
            }
        }
        Ok(())
    }

    /// Makes everything staged so far survive a power loss: the staging
    /// disk is synced (one syncfs). Sealing does not fsync; this runs every
    /// [`DISK_SYNC_INTERVAL`] instead, as a local file system's journal
    /// commit does. A commit that failed (a full disk) is tried again here.
    pub fn sync_staging_disk(&self) -> VfsResult<()> {
        self.lock().catalog.commit()?;
        // The catalog's WAL is copied into its database here, off the
        // core's lock (the daemon's connection never checkpoints).
        if let Err(e) = self.checkpointer.lock().expect("checkpointer lock").checkpoint() {
            tracing::debug!(error = %e, "catalog checkpoint; trying again at the next sync");
        }
        crate::sys::sync_filesystem(&self.options.home)?;
        Ok(())
    }

    /// Closes a handle. The last writer's release seals the file.
    pub fn release(&self, fh: u64) -> VfsResult<()> {
        let (ino, copy, counted) = {
            let mut st = self.lock();
            // Its copy lock goes at once: `forget_if_idle` counts holders.
            let (ino, write) = match self.handles.remove(&fh) {
                Some((_, handle)) => (handle.ino, handle.write),
                None => return Err(VfsError::BadHandle),
            };
            let writers = {
                let mut files = self.files();
                let file = Self::entry(&mut files, ino)?;
                file.handles -= 1;
                if write {
                    file.writers -= 1;
                }
                file.writers
            };
            if Self::orphaned(&st, ino)? {
                // Its content goes with its last handle, or with whoever
                // still holds its copy lock (a seal in flight) when done.
                let freed = self.forget_if_idle(&mut st, ino)?;
                drop(st);
                freed.free();
                return Ok(());
            }
            if writers > 0 {
                return Ok(());
            }
            // Counted under the lock that removed the handle, so `cairn
            // sync` never sees neither the handle nor the version.
            (ino, self.copy_lock(&mut st, ino), Sealing::start(&self.sealing))
        };
        let sealed = self.seal(ino, &mut write_copy(&copy), "last release", false);
        drop(counted);
        drop(copy);
        self.let_go(ino)?;
        sealed
    }

    /// Seals a file's working copy (in `copy`, whose lock the caller holds)
    /// as its next version, if it was written; otherwise drops it. Unless
    /// `even_if_open`, a file a writer opened meanwhile is left to that
    /// writer's release. The chunks are linked under the copy's lock only;
    /// `state` is taken for the version's number and for its record. The
    /// version is queued after the write-back delay.
    pub(super) fn seal(
        &self,
        ino: Ino,
        copy: &mut Option<WorkingCopy>,
        why: &str,
        even_if_open: bool,
    ) -> VfsResult<()> {
        tracing::debug!(ino, why, "seal");
        if copy.is_none() {
            return Ok(());
        }
        let num = {
            let st = self.lock();
            let dirty = match self.files().get(&ino) {
                None => return Ok(()),
                Some(file) if file.writers > 0 && !even_if_open => return Ok(()),
                Some(file) => file.dirty,
            };
            // Unlinked: not a version; its last holder frees the copy.
            if Self::orphaned(&st, ino)? {
                return Ok(());
            }
            if !dirty {
                if let Some(file) = self.files().get_mut(&ino) {
                    (file.working, file.modified_ns) = (None, None);
                }
                drop(st);
                copy.take().expect("checked").discard()?;
                return Ok(());
            }
            st.catalog.next_version_num(ino)?
        };
        if let Some(work) = copy.as_ref() {
            self.fetch_base(work, work.seal_needs()?)?;
        }
        let work = copy.take().expect("checked");
        let origin = work.dir().file_name().map(|n| n.to_string_lossy().into_owned());
        let sealed = work.seal(version_dir(&self.cache, ino, num), |size| -> VfsResult<()> {
            let mut st = self.lock();
            // Unlinked while the chunks were linked: not a version.
            if Self::orphaned(&st, ino)? {
                return Err(VfsError::NotFound);
            }
            let modified_ns = Self::entry(&mut self.files(), ino)?.modified_ns;
            if let Some(t) = modified_ns {
                // Recorded with the version, in one commit.
                if let Some(mut node) = st.catalog.node(ino)? {
                    node.mtime_ns = t;
                    node.ctime_ns = node.ctime_ns.max(t);
                    st.catalog.update_attrs(&node)?;
                }
            }
            // Versions of a file are only added under its copy's lock.
            let recorded = st
                .catalog
                .add_version(ino, size, "", VersionState::Staged, None, origin.as_deref())?;
            if recorded != num {
                return Err(std::io::Error::other(format!("file {ino}: version {recorded} recorded as {num}")).into());
            }
            // Committed before the working copy's size and time go, as
            // attributes read them first.
            st.catalog.commit()?;
            let mut files = self.files();
            let file = Self::entry(&mut files, ino)?;
            (file.working, file.dirty, file.modified_ns) = (None, false, None);
            Ok(())
        });
        match sealed {
            Ok(sealed) => {
                // Queued once its directory is in place (a copy sealed in
                // place is renamed after its record).
                let mut queue = self.queue();
                queue.insert((ino, num), Pending::new(sealed.size, Instant::now()));
                // The scheduler sleeps until the first queued version is
                // due, and this one is due after all of those: wake it only
                // if idle.
                if queue.len() == 1 {
                    self.upload_wake.notify_one();
                }
                drop(queue);
                self.cache_growth.fetch_add(sealed.size, Ordering::Relaxed);
                tracing::debug!(ino, num, size = sealed.size, "sealed");
                Ok(())
            }
            Err(failed) => {
                // A full disk, say: keep the working copy as it was, so the
                // file reads the same and a later close seals it.
                let (work, e) = *failed;
                let st = self.lock();
                if let Some(file) = self.files().get_mut(&ino) {
                    file.working = Some(Working::of(&work));
                    file.dirty = true;
                }
                *copy = Some(work);
                // Unlinked meanwhile: nothing to seal (freed by its last
                // holder), so nothing failed.
                if Self::orphaned(&st, ino).unwrap_or(false) {
                    return Ok(());
                }
                Err(e)
            }
        }
    }

    /// Seals every file still open for writing: used on unmount, so nothing
    /// written is left outside a version.
    pub fn seal_all(&self) -> VfsResult<()> {
        let copies: Vec<(Ino, CopyLock)> = self.files().iter().map(|(&ino, f)| (ino, f.copy.clone())).collect();
        for (ino, copy) in copies {
            self.seal(ino, &mut write_copy(&copy), "unmount", true)?;
        }
        self.lock().catalog.sync_to_disk()?;
        Ok(())
    }
}
