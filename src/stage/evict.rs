//! Eviction of the staging cache: which clean chunks go once the cache is
//! over its bound. `scan` walks the cache; `plan` is the rule, pure.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A cached chunk that may be evicted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Candidate {
    pub modified: SystemTime,
    /// Hard links to the chunk: one shared with another version frees
    /// nothing until its last link goes.
    pub links: u64,
    pub bytes: u64,
    pub path: PathBuf,
}

/// Walks the version and working-copy directories under `cache`: the bytes
/// the cache uses (each shared chunk once), and the chunks of the version
/// directories `evictable` accepts. A version's `sums` file is no chunk: it
/// stays while its version does.
pub fn scan(cache: &Path, evictable: impl Fn(&Path) -> bool) -> std::io::Result<(u64, Vec<Candidate>)> {
    let mut seen = std::collections::HashSet::new();
    let mut used = 0u64;
    let mut candidates = Vec::new();
    for dir in [cache.join("versions"), cache.join("work")] {
        for version in std::fs::read_dir(&dir)? {
            let version = version?.path();
            let evictable = dir.ends_with("versions") && evictable(&version);
            let Ok(chunks) = std::fs::read_dir(&version) else {
                continue;
            };
            for chunk in chunks {
                let chunk = chunk?;
                let is_chunk = chunk.file_name().to_str().is_some_and(|n| n.parse::<u64>().is_ok());
                let facts = crate::sys::file_facts(&chunk.path(), &chunk.metadata()?);
                if seen.insert(facts.identity) {
                    used += facts.disk_bytes;
                }
                if evictable && is_chunk {
                    candidates.push(Candidate {
                        modified: facts.modified,
                        links: facts.links,
                        bytes: facts.disk_bytes,
                        path: chunk.path(),
                    });
                }
            }
        }
    }
    Ok((used, candidates))
}

/// The chunks to remove, least recently modified first, until what the
/// cache uses (`used`) is at most `max`, and the bytes that frees.
pub fn plan(mut candidates: Vec<Candidate>, used: u64, max: u64) -> (Vec<PathBuf>, u64) {
    candidates.sort();
    let mut freed = 0;
    let mut remove = Vec::new();
    for c in candidates {
        if used.saturating_sub(freed) <= max {
            break;
        }
        if c.links == 1 {
            freed += c.bytes;
        }
        remove.push(c.path);
    }
    (remove, freed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn chunk(age_s: u64, links: u64, bytes: u64, name: &str) -> Candidate {
        Candidate {
            modified: SystemTime::UNIX_EPOCH + Duration::from_secs(1000 - age_s),
            links,
            bytes,
            path: PathBuf::from(name),
        }
    }

    #[test]
    fn the_oldest_chunks_go_until_the_cache_is_under_its_bound() {
        let c = vec![
            chunk(10, 1, 100, "new"),
            chunk(30, 1, 100, "old"),
            chunk(20, 1, 100, "mid"),
        ];
        assert_eq!(plan(c.clone(), 300, 300), (vec![], 0));
        assert_eq!(plan(c.clone(), 300, 150), (vec!["old".into(), "mid".into()], 200));
        assert_eq!(plan(c, 300, 0), (vec!["old".into(), "mid".into(), "new".into()], 300));
    }

    #[test]
    fn a_shared_chunk_frees_nothing_and_eviction_goes_on_past_it() {
        let c = vec![chunk(30, 2, 100, "shared"), chunk(20, 1, 100, "own")];
        assert_eq!(plan(c, 200, 100), (vec!["shared".into(), "own".into()], 100));
    }
}
