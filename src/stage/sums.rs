//! A SHA-256 per chunk of a sealed version, so that damage to the local
//! cache which keeps a chunk's length (a flipped bit, a chunk overwritten
//! in place) is found before its bytes are served or uploaded.
//!
//! The sums live beside the chunks, in the version directory's file `sums`:
//! 32 bytes per chunk at `index × 32`, all zeros (or past the end) for a
//! chunk with no sum. Sealing writes every chunk's sum (from the bytes as
//! they were written, or the base's for a shared chunk); a fetched chunk's
//! sum is written before the chunk itself, so a chunk is never on disk
//! without its sum. A version staged or cached by a cairn that kept no sums
//! has no `sums` file: its chunks are checked by length only.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{mpsc, Arc, LazyLock, Mutex, Weak};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::sys::PositionalIo;

pub const SUMS_FILE: &str = "sums";
pub type Sum = [u8; 32];
const SUM_LEN: u64 = 32;

pub fn sum_of(bytes: &[u8]) -> Sum {
    Sha256::digest(bytes).into()
}

/// Feeds `n` zero bytes (a hole, or a chunk padded to its length).
pub fn hash_zeros(hasher: &mut Sha256, mut n: u64) {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while n > 0 {
        let take = n.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..take]);
        n -= take as u64;
    }
}

/// The sum recorded for chunk `index` of the version in `dir`, if any.
pub fn recorded(dir: &Path, index: u64) -> io::Result<Option<Sum>> {
    let file = match File::open(dir.join(SUMS_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut sum = [0u8; SUM_LEN as usize];
    match file.read_exact_at(&mut sum, index * SUM_LEN) {
        Ok(()) => Ok((sum != [0; 32]).then_some(sum)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// The sums recorded for the first `count` chunks of the version in `dir`.
pub fn read_all(dir: &Path, count: u64) -> io::Result<Vec<Option<Sum>>> {
    let file = match File::open(dir.join(SUMS_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![None; count as usize]),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, count * SUM_LEN), &mut bytes)?;
    Ok((0..count as usize)
        .map(|i| {
            let sum: Option<Sum> = bytes.get(i * 32..i * 32 + 32).map(|b| b.try_into().expect("32 bytes"));
            sum.filter(|s| *s != [0; 32])
        })
        .collect())
}

/// Records the sum of one chunk (a fetched one) in the version in `dir`.
pub fn record(dir: &Path, index: u64, sum: &Sum) -> io::Result<()> {
    let file = File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(SUMS_FILE))?;
    file.write_all_at(sum, index * SUM_LEN)
}

/// Writes the sums of a whole version (a sealed one) in `dir`.
pub fn write_all(dir: &Path, sums: &[Option<Sum>]) -> io::Result<()> {
    let bytes: Vec<u8> = sums.iter().flat_map(|s| s.unwrap_or([0; 32])).collect();
    std::fs::write(dir.join(SUMS_FILE), bytes)
}

/// The error for a chunk whose bytes do not match its sum.
pub fn mismatch(dir: &Path, index: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "chunk {index} of the sealed version {} does not match its SHA-256: the staging cache was damaged",
            dir.display()
        ),
    )
}

/// Checks `bytes`, read whole from chunk `index` of the version in `dir`,
/// against its recorded sum.
pub fn check_bytes(dir: &Path, index: u64, bytes: &[u8]) -> io::Result<()> {
    match recorded(dir, index)? {
        Some(sum) if sum != sum_of(bytes) => Err(mismatch(dir, index)),
        _ => Ok(()),
    }
}

/// Chunk files already checked by this process (identity, length, mtime):
/// a chunk is hashed on its first read, not on every one. Bounded: emptied
/// when full, which only costs a second check of each chunk.
static CHECKED: LazyLock<Mutex<HashSet<CheckedFile>>> = LazyLock::new(Default::default);
type CheckedFile = ((u64, u64), u64, SystemTime);
const CHECKED_MAX: usize = 1 << 16;

fn checked_key(path: &Path, meta: &std::fs::Metadata) -> CheckedFile {
    let facts = crate::sys::file_facts(path, meta);
    (facts.identity, meta.len(), facts.modified)
}

fn remember_checked(key: CheckedFile) {
    let mut checked = CHECKED.lock().expect("checked chunks");
    if checked.len() >= CHECKED_MAX {
        checked.clear();
    }
    checked.insert(key);
}

/// Checks the open chunk file `file` (chunk `index` of the version in
/// `dir`, at `path`) against its sum, once per process and file.
pub fn check_file(dir: &Path, index: u64, path: &Path, file: &File) -> io::Result<()> {
    let key = checked_key(path, &file.metadata()?);
    if CHECKED.lock().expect("checked chunks").contains(&key) {
        return Ok(());
    }
    let Some(sum) = recorded(dir, index)? else {
        return Ok(());
    };
    if hash_of(file)? != sum {
        return Err(mismatch(dir, index));
    }
    remember_checked(key);
    Ok(())
}

/// A chunk's sum being made on the hashing thread from its file, off the
/// path of the write that finished it (so a writer's next request does
/// not wait for SHA-256, and the hash runs on another core).
#[derive(Debug)]
pub struct Later(Mutex<mpsc::Receiver<io::Result<Sum>>>);

impl Later {
    /// The sum, once the hashing thread has made it.
    pub fn wait(&self) -> io::Result<Sum> {
        let rx = self.0.lock().expect("a later sum");
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("the hashing thread stopped")))
    }
}

/// A chunk to hash, where to send its sum, and whether anyone still wants
/// it (a sum dropped by a later write is not made: the queue only holds
/// live work, and the file is not held open for nothing).
type HashJob = (std::path::PathBuf, mpsc::Sender<io::Result<Sum>>, Weak<Later>);

static HASHER: LazyLock<mpsc::Sender<HashJob>> = LazyLock::new(|| {
    let (tx, rx) = mpsc::channel::<HashJob>();
    std::thread::Builder::new()
        .name("cairn-hash".into())
        .spawn(move || {
            for (path, reply, wanted) in rx {
                if wanted.strong_count() > 0 {
                    let _ = reply.send(hash_file(&path));
                }
            }
        })
        .expect("the hashing thread starts");
    tx
});

/// The SHA-256 of the file at `path`, as it is now.
pub fn hash_file(path: &Path) -> io::Result<Sum> {
    hash_of(&File::open(path)?)
}

/// The SHA-256 of the open `file`, read from where it stands to its end.
fn hash_of(file: &File) -> io::Result<Sum> {
    // One buffer per thread, kept: a fresh 256 KiB one per chunk was an
    // mmap, 64 page faults and an munmap each time (a read with the page
    // cache dropped hashes every chunk once).
    thread_local!(static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 256 << 10]));
    BUF.with_borrow_mut(|buf| {
        let mut hasher = Sha256::new();
        loop {
            match io::Read::read(&mut &*file, buf) {
                Ok(0) => return Ok(hasher.finalize().into()),
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    })
}

/// The sum of the file at `path`, made on the hashing thread: only valid
/// if nothing writes the file before [`Later::wait`] returns.
pub fn hash_later(path: std::path::PathBuf) -> Arc<Later> {
    let (tx, rx) = mpsc::channel();
    let later = Arc::new(Later(Mutex::new(rx)));
    if let Err(mpsc::SendError((path, reply, _))) = HASHER.send((path, tx, Arc::downgrade(&later))) {
        let _ = reply.send(hash_file(&path));
    }
    later
}

/// Notes the chunk file at `path`, just written by this process from bytes
/// it verified and summed, as checked: its first read then does not hash
/// it a second time (a cold read from the grid hashed every byte four
/// times, docs/BENCHMARKS.md).
pub fn written_checked(path: &Path) -> io::Result<()> {
    remember_checked(checked_key(path, &std::fs::metadata(path)?));
    Ok(())
}
