//! Open files and the write path: handles, working copies over a file's
//! newest version, writes, fsync, and sealing at the last release.

use super::*;

impl Vfs {
    pub(super) fn add_handle(st: &mut State, ino: i64, write: bool) -> u64 {
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(
            fh,
            Handle {
                ino,
                write,
                closing: false,
            },
        );
        let file = st.files.entry(ino).or_default();
        file.handles += 1;
        if write {
            file.writers += 1;
        }
        fh
    }

    pub(super) fn new_working_copy(&self, ino: i64, base: Option<SealedVersion>) -> VfsResult<WorkingCopy> {
        let dir = self
            .cache
            .join("work")
            .join(format!("{ino}-{:016x}", rand::random::<u64>()));
        let work = WorkingCopy::create_with(dir, base, self.chunk_size(), |d| self.spares.make(d))?;
        if self.spares.claim_refill() {
            let spares = self.spares.clone();
            self.runtime.spawn_blocking(move || spares.refill());
        }
        Ok(work)
    }

    pub fn open(&self, ino: u64, write: bool, truncate: bool) -> VfsResult<u64> {
        let ino = ino as i64;
        if write {
            self.writable()?;
        }
        {
            let st = self.lock();
            let node = Self::node(&st, ino)?;
            if node.kind == Kind::Dir && write {
                return Err(VfsError::IsDir);
            }
        }
        if truncate {
            self.ensure_working(ino)?;
        }
        let mut st = self.lock();
        if truncate {
            let file = st.files.entry(ino).or_default();
            if let Some(work) = file.work.as_mut() {
                work.truncate(0)?;
                file.dirty = true;
            }
        }
        Ok(Self::add_handle(&mut st, ino, write))
    }

    /// Makes sure `ino` has a working copy, over its newest version. A base
    /// not fully in the cache is fetched first, outside the lock.
    pub(super) fn ensure_working(&self, ino: i64) -> VfsResult<()> {
        loop {
            let (latest, missing) = {
                let mut st = self.lock();
                if st.files.get(&ino).is_some_and(|f| f.work.is_some()) {
                    return Ok(());
                }
                let latest = st.catalog.latest(ino)?;
                let missing = match &latest {
                    Some(v) => self.chunks_to_fetch(v, None)?,
                    None => Vec::new(),
                };
                if missing.is_empty() {
                    let base = latest.map(|v| self.sealed(&v));
                    let work = self.new_working_copy(ino, base)?;
                    st.files.entry(ino).or_default().work = Some(work);
                    return Ok(());
                }
                (latest.expect("missing chunks imply a version"), missing)
            };
            for index in missing {
                self.fetch_chunk(&latest, index)?;
            }
        }
    }

    /// Applies a change to a file's working copy. With no writer holding
    /// the file open (truncate(2) by path), the change is sealed at once.
    pub(super) fn modify(
        &self,
        ino: i64,
        change: impl FnOnce(&mut WorkingCopy) -> std::io::Result<()>,
    ) -> VfsResult<()> {
        {
            let st = self.lock();
            let node = Self::node(&st, ino)?;
            if node.kind != Kind::File {
                return Err(if node.kind == Kind::Dir {
                    VfsError::IsDir
                } else {
                    VfsError::Invalid
                });
            }
        }
        self.ensure_working(ino)?;
        let mut st = self.lock();
        let file = st.files.get_mut(&ino).expect("ensured");
        change(file.work.as_mut().expect("ensured"))?;
        file.dirty = true;
        file.modified_ns = Some(crate::catalog::now_ns());
        if file.writers == 0 {
            self.seal(&mut st, ino, "change without an open writer")?;
        }
        Ok(())
    }

    /// Drops a file's set-user/group-ID bits before a write that must not
    /// keep them (the kernel says so when the writer lacks CAP_FSETID).
    pub fn drop_setid(&self, ino: u64) -> VfsResult<()> {
        let st = self.lock();
        let mut node = Self::node(&st, ino as i64)?;
        let mode = without_setid(node.mode);
        if mode != node.mode {
            node.mode = mode;
            node.ctime_ns = crate::catalog::now_ns();
            st.catalog.update_attrs(&node)?;
        }
        Ok(())
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> VfsResult<usize> {
        let ino = {
            let st = self.lock();
            let h = st.handles.get(&fh).ok_or(VfsError::BadHandle)?;
            if !h.write {
                return Err(VfsError::BadHandle);
            }
            h.ino
        };
        self.ensure_space(data.len() as u64)?;
        self.ensure_working(ino)?;
        let mut st = self.lock();
        let file = st.files.get_mut(&ino).expect("open file");
        file.work.as_mut().expect("ensured").write_at(offset, data)?;
        self.cache_growth.fetch_add(data.len() as u64, Ordering::Relaxed);
        file.dirty = true;
        file.modified_ns = Some(crate::catalog::now_ns());
        // The bytes are in staging now and survive a crash of the daemon:
        // so must the file's name.
        if st.catalog.uncommitted() {
            st.catalog.commit()?;
        }
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
    /// (names, attributes) become durable. Under the lock only the batch's
    /// commit and the list of what to sync; the syncing runs after.
    pub fn fsync(&self, fh: u64) -> VfsResult<()> {
        // One fsync at a time: a second one must not return while the
        // first still syncs what the second was also asked to.
        let _one = self.syncing.lock().expect("fsync lock");
        let (ino, pending, wal) = {
            let mut st = self.lock();
            let ino = st.handles.get(&fh).ok_or(VfsError::BadHandle)?.ino;
            st.catalog.commit()?;
            let pending = match st.files.get_mut(&ino).and_then(|f| f.work.as_mut()) {
                Some(work) => Some(work.take_sync()?),
                None => None,
            };
            (ino, pending, st.catalog.wal_path())
        };
        if let Some(pending) = pending {
            if let Err(e) = pending.run() {
                if let Some(work) = self.lock().files.get_mut(&ino).and_then(|f| f.work.as_mut()) {
                    work.give_back(pending);
                }
                return Err(e.into());
            }
        }
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
    /// It commits the catalog's batch: what a closed file needs to survive
    /// a crash (its name, its attributes) is then on disk.
    pub fn flush(&self, fh: u64) -> VfsResult<()> {
        let mut st = self.lock();
        if let Some(handle) = st.handles.get_mut(&fh) {
            if handle.write {
                handle.closing = true;
            }
        }
        st.catalog.commit()?;
        Ok(())
    }

    /// Commits the catalog's batch of attribute changes (group commit: run
    /// every [`COMMIT_INTERVAL`], and forced by every change of names,
    /// close, fsync, sealing and the first write after a change).
    pub fn commit_metadata(&self) -> VfsResult<()> {
        self.lock().catalog.commit()?;
        Ok(())
    }

    /// Makes everything staged so far survive a power loss: the batch is
    /// committed, then the staging disk synced (one syncfs). Sealing does
    /// not fsync; this runs every [`DISK_SYNC_INTERVAL`] instead, as a
    /// local file system's journal commit does.
    pub fn sync_staging_disk(&self) -> VfsResult<()> {
        self.commit_metadata()?;
        crate::sys::sync_filesystem(&self.options.home)?;
        Ok(())
    }

    /// Closes a handle. The last writer's release seals the file.
    pub fn release(&self, fh: u64) -> VfsResult<()> {
        let mut st = self.lock();
        let handle = st.handles.remove(&fh).ok_or(VfsError::BadHandle)?;
        let ino = handle.ino;
        let file = st.files.get_mut(&ino).expect("open file");
        file.handles -= 1;
        if handle.write {
            file.writers -= 1;
        }
        let (writers, handles) = (file.writers, file.handles);
        let orphan = st
            .catalog
            .node(ino)?
            .is_none_or(|n| n.parent == crate::catalog::ORPHAN_PARENT);
        if orphan {
            if handles == 0 {
                let work = st.files.remove(&ino).and_then(|f| f.work);
                st.catalog.forget_orphan(ino)?;
                let mut freed = ToFree::versions(&self.cache, &st.catalog, ino);
                if let Some(work) = work {
                    freed = freed.and(work.dir().to_owned());
                }
                drop(st);
                freed.free();
            }
            return Ok(());
        }
        if writers == 0 {
            self.seal(&mut st, ino, "last release")?;
        }
        if handles == 0 && st.files.get(&ino).is_some_and(|f| f.work.is_none()) {
            st.files.remove(&ino);
        }
        Ok(())
    }

    /// Seals a file's working copy as its next version, if it was written;
    /// otherwise drops it. The version is queued after the write-back delay.
    pub(super) fn seal(&self, st: &mut State, ino: i64, why: &str) -> VfsResult<()> {
        tracing::debug!(ino, why, "seal");
        let Some(file) = st.files.get_mut(&ino) else {
            return Ok(());
        };
        let Some(work) = file.work.take() else { return Ok(()) };
        let modified_ns = file.modified_ns.take();
        if !std::mem::take(&mut file.dirty) {
            work.discard()?;
            return Ok(());
        }
        if let Some(t) = modified_ns {
            // Recorded with the version, in one commit.
            if let Some(mut node) = st.catalog.node(ino)? {
                node.mtime_ns = t;
                node.ctime_ns = node.ctime_ns.max(t);
                st.catalog.update_attrs(&node)?;
            }
        }
        let (num, sealed) = match record_sealed(&self.cache, &mut st.catalog, ino, work) {
            Ok(recorded) => recorded,
            Err(failed) => {
                let (work, e) = *failed;
                // A full disk, say: keep the working copy as it was, so the
                // file reads the same and a later close seals it.
                let file = st.files.get_mut(&ino).expect("still open");
                file.work = Some(work);
                file.dirty = true;
                file.modified_ns = file.modified_ns.or(modified_ns);
                return Err(e.into());
            }
        };
        st.queue.insert((ino, num), Pending::new(sealed.size, Instant::now()));
        self.cache_growth.fetch_add(sealed.size, Ordering::Relaxed);
        tracing::debug!(ino, num, size = sealed.size, "sealed");
        // The scheduler sleeps until the first queued version is due, and
        // this one is due after all of those: wake it only if it is idle.
        if st.queue.len() == 1 {
            self.upload_wake.notify_one();
        }
        Ok(())
    }

    /// Seals every file still open for writing: used on unmount, so nothing
    /// written is left outside a version.
    pub fn seal_all(&self) -> VfsResult<()> {
        let mut st = self.lock();
        let inos: Vec<i64> = st.files.keys().copied().collect();
        for ino in inos {
            self.seal(&mut st, ino, "unmount")?;
        }
        st.catalog.sync_to_disk()?;
        Ok(())
    }
}
