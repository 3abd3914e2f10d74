//! Empty directories made ahead of time. Every working copy needs a
//! directory, and ext4 takes several times longer to create a directory
//! than to rename one (here 165 µs against 21 µs): a `tar x` renames a
//! spare into place, an edit of a file writes the copy's state into one
//! first, and a background thread makes more.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Spares kept ready; a refill starts below half of it.
const TARGET: usize = 256;
/// Names of spares start with this; recovery removes any it finds.
pub const PREFIX: &str = "spare-";

pub struct SpareDirs {
    dir: PathBuf,
    ready: Mutex<Vec<PathBuf>>,
    refilling: AtomicBool,
    next: AtomicU64,
}

impl SpareDirs {
    /// Spares live in `dir`, beside what they become.
    pub fn new(dir: PathBuf) -> SpareDirs {
        SpareDirs {
            dir,
            ready: Mutex::new(Vec::new()),
            refilling: AtomicBool::new(false),
            next: AtomicU64::new(0),
        }
    }

    /// Makes the directory `to`, holding `files` (name, bytes) when it
    /// appears: a spare, the files written into it, renamed; or a new one.
    pub fn make(&self, to: &Path, files: &[(&str, &[u8])]) -> io::Result<()> {
        let spare = self.ready.lock().expect("spares").pop();
        let Some(spare) = spare else {
            return super::chunks::WorkingCopy::make_dir(to, files);
        };
        for (name, bytes) in files {
            std::fs::write(spare.join(name), bytes)?;
        }
        crate::sys::rename_retrying(&spare, to)
    }

    /// Whether a refill should start now (and it is then yours to run).
    pub fn claim_refill(&self) -> bool {
        self.ready.lock().expect("spares").len() < TARGET / 2 && !self.refilling.swap(true, Ordering::AcqRel)
    }

    /// Makes spares until [`TARGET`] are ready.
    pub fn refill(&self) {
        while self.ready.lock().expect("spares").len() < TARGET {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let path = self.dir.join(format!("{PREFIX}{}-{n}", std::process::id()));
            if let Err(e) = std::fs::create_dir(&path) {
                tracing::debug!(error = %e, "making a spare directory");
                break;
            }
            self.ready.lock().expect("spares").push(path);
        }
        self.refilling.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spares_become_the_directories_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let spares = SpareDirs::new(dir.path().to_owned());
        spares.make(&dir.path().join("before-any-spare"), &[]).unwrap();
        spares
            .make(&dir.path().join("with-a-file"), &[("state", b"x")])
            .unwrap();
        assert_eq!(std::fs::read(dir.path().join("with-a-file/state")).unwrap(), b"x");
        assert!(spares.claim_refill());
        assert!(!spares.claim_refill(), "one refill at a time");
        spares.refill();
        assert!(!spares.claim_refill(), "full");
        let count = || std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(count(), TARGET + 2);
        spares.make(&dir.path().join("made"), &[("state", b"y")]).unwrap();
        assert_eq!(std::fs::read(dir.path().join("made/state")).unwrap(), b"y");
        assert_eq!(count(), TARGET + 2, "a spare was renamed, not a new one made");
    }
}
