//! Eviction: clean (committed) chunks leave the cache once it is over its
//! bound (`stage::evict` has the walk and the rule); this runs it with
//! what only the core knows, the staged versions and open files' bases.

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
        let (states, mut protected) = {
            let st = self.lock();
            let protected: std::collections::HashSet<PathBuf> = self
                .files()
                .values()
                .filter_map(|f| f.working.as_ref()?.base.clone())
                .collect();
            (st.catalog.version_states()?, protected)
        };
        // What those bases and staged versions read through their layers
        // is spared too (it would be fetched back, but from the grid).
        let staged = states.iter().filter(|(_, s)| **s == VersionState::Staged);
        let readers: Vec<PathBuf> = protected
            .iter()
            .cloned()
            .chain(staged.map(|(&(ino, num), _)| version_dir(&self.cache, ino, num)))
            .collect();
        for dir in readers {
            let layer = SealedVersion::open(dir, u64::MAX, self.chunk_size()).layer();
            if let Ok(Some(layer)) = layer {
                protected.extend(layer.from.iter().map(|s| s.dir.clone()));
            }
        }
        let (used, candidates) = crate::stage::evict::scan(&self.cache, |version| {
            !protected.contains(version)
                // A directory without a row is being sealed or restored.
                // A superseded one still holding chunks a newer one reads
                // (kept when settling failed) is the only copy of them.
                && version_dir_key(version).is_some_and(|k| {
                    states
                        .get(&k)
                        .is_some_and(|s| matches!(s, VersionState::Committed | VersionState::Collected))
                })
        })?;
        let (remove, freed) = crate::stage::evict::plan(candidates, used, max);
        for path in remove {
            std::fs::remove_file(&path)?;
        }
        if freed > 0 {
            tracing::info!(freed, used, max, "evicted clean chunks from the cache");
        }
        self.cache_scanned.store(used.saturating_sub(freed), Ordering::Relaxed);
        Ok(freed)
    }
}
