//! Eviction: clean (committed) chunks leave the cache once it is over its
//! bound, least recently modified first.

use super::*;

impl Vfs {
    /// Deletes cached chunks of versions the grid holds, least recently
    /// fetched or sealed first, until the cache is under its bound. Never
    /// touches staged versions or the base of an open working copy.
    /// Returns the bytes freed.
    pub fn evict(&self) -> VfsResult<u64> {
        let max = self.options.cache_max_bytes;
        let growth = self.cache_growth.swap(0, Ordering::Relaxed);
        if self.cache_scanned.load(Ordering::Relaxed).saturating_add(growth) <= max {
            self.cache_growth.fetch_add(growth, Ordering::Relaxed);
            return Ok(0);
        }
        let (states, protected) = {
            let st = self.lock();
            let protected: std::collections::HashSet<PathBuf> = st
                .files
                .values()
                .filter_map(|f| f.work.as_ref()?.base_dir().map(Path::to_owned))
                .collect();
            (st.catalog.version_states()?, protected)
        };
        let mut seen = std::collections::HashSet::new();
        let mut used = 0u64;
        let mut candidates = Vec::new();
        for dir in [self.cache.join("versions"), self.cache.join("work")] {
            for version in std::fs::read_dir(&dir)? {
                let version = version?.path();
                let evictable = dir.ends_with("versions")
                    && !protected.contains(&version)
                    && version_dir_key(&version)
                        .is_some_and(|k| states.get(&k).is_none_or(|s| *s != VersionState::Staged));
                let Ok(chunks) = std::fs::read_dir(&version) else {
                    continue;
                };
                for chunk in chunks {
                    let chunk = chunk?;
                    // Chunks only: a version's sums stay while it does.
                    let is_chunk = chunk.file_name().to_str().is_some_and(|n| n.parse::<u64>().is_ok());
                    let facts = crate::sys::file_facts(&chunk.path(), &chunk.metadata()?);
                    if seen.insert(facts.identity) {
                        used += facts.disk_bytes;
                    }
                    if evictable && is_chunk {
                        candidates.push((facts.modified, facts.links, facts.disk_bytes, chunk.path()));
                    }
                }
            }
        }
        let mut freed = 0;
        candidates.sort();
        for (_, nlink, bytes, path) in candidates {
            if used.saturating_sub(freed) <= max {
                break;
            }
            std::fs::remove_file(&path)?;
            // A chunk shared with another version frees nothing yet.
            if nlink == 1 {
                freed += bytes;
            }
        }
        if freed > 0 {
            tracing::info!(freed, used, max, "evicted clean chunks from the cache");
        }
        self.cache_scanned.store(used.saturating_sub(freed), Ordering::Relaxed);
        Ok(freed)
    }
}
