//! Versions of a file and restoring an older one as the newest.

use super::*;

impl Vfs {
    /// Resolves a path inside the drive ("/a/b") to its node.
    pub fn resolve(&self, path: &str) -> VfsResult<Node> {
        Ok(self.lock().catalog.resolve(path)?)
    }

    pub fn versions(&self, path: &str) -> VfsResult<Vec<Version>> {
        let st = self.lock();
        let node = st.catalog.resolve(path)?;
        Ok(st.catalog.versions(node.ino)?)
    }

    /// Makes version `num`'s content the newest version. A committed old
    /// version is reused by capability, so nothing is uploaded again. The
    /// kernel is told to forget what it cached of the file.
    pub fn restore(&self, path: &str, num: i64) -> VfsResult<i64> {
        Ok(self.restore_version(path, num)?.1)
    }

    pub(super) fn restore_version(&self, path: &str, num: i64) -> VfsResult<(Ino, i64)> {
        self.writable()?;
        let (ino, copy) = {
            let mut st = self.lock();
            let ino = st.catalog.resolve(path)?.ino;
            (ino, self.copy_lock(&mut st, ino))
        };
        // Versions of a file are only added under its copy's lock. A copy
        // left by a last release still on its way is sealed first, so it
        // cannot land over the restored version afterwards.
        let mut guard = write_copy(&copy);
        let restored = self
            .seal(ino, &mut guard, "before a restore", false)
            .and_then(|()| self.restore_under(ino, num));
        drop(guard);
        drop(copy);
        // Once the new version is committed the kernel must forget the old
        // pages, even if letting go of the file then fails.
        if restored.is_ok() {
            if let Some(tell) = self.invalidate.get() {
                tell(&crate::sync::apply::Inval::Node(ino));
            }
        }
        self.let_go(ino)?;
        restored.map(|n| (ino, n))
    }

    fn restore_under(&self, ino: Ino, num: i64) -> VfsResult<i64> {
        let (old, new_num) = {
            let st = self.lock();
            if self.files().get(&ino).is_some_and(|f| f.writers > 0) {
                return Err(VfsError::Busy);
            }
            let old = st
                .catalog
                .versions(ino)?
                .into_iter()
                .find(|v| v.num == num)
                .ok_or(VfsError::NotFound)?;
            (old, st.catalog.next_version_num(ino)?)
        };
        let old_dir = version_dir(&self.cache, ino, num);
        let new_dir = version_dir(&self.cache, ino, new_num);
        // Share whatever chunks of the old version the cache holds; the
        // sums are copied (a fetch into either version writes its own).
        if old_dir.is_dir() {
            std::fs::create_dir_all(&new_dir)?;
            for entry in std::fs::read_dir(&old_dir)? {
                let entry = entry?;
                let (from, to) = (entry.path(), new_dir.join(entry.file_name()));
                if to.ends_with(crate::stage::sums::SUMS_FILE) {
                    std::fs::copy(from, to)?;
                } else {
                    std::fs::hard_link(from, to)?;
                }
            }
        }
        let in_cache = old_dir.is_dir()
            && matches!(self.chunks_to_fetch(&old, 0..old.size.div_ceil(self.chunk_size()), false), Ok(fetch) if fetch.is_empty());
        let mut st = self.lock();
        match old.state {
            VersionState::Committed => {
                let n = st.catalog.add_version(
                    ino,
                    old.size,
                    &old.sha256,
                    VersionState::Committed,
                    old.cap.as_deref(),
                    None,
                )?;
                Ok(n)
            }
            _ if in_cache => {
                let n = st
                    .catalog
                    .add_version(ino, old.size, "", VersionState::Staged, None, None)?;
                let mut p = Pending::new(old.size, Instant::now());
                p.flush = true;
                self.queue().insert((ino, n), p);
                self.upload_wake.notify_one();
                Ok(n)
            }
            _ => Err(GridError::NotStored { ino, num }.into()),
        }
    }
}
