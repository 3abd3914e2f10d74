//! The platform-neutral file system core: namespace, open files, staging,
//! sealing, versions, and the upload queue. No FUSE here: the `fuse` adapter
//! (and later a WinFsp one) translate kernel requests into these calls and
//! map [`VfsError`] to their error codes in one place each.
//!
//! The rule everything follows: writes go to a working copy in the staging
//! cache; when the last writer of a file releases it, the working copy is
//! sealed as the next immutable version and queued for upload after the
//! write-back delay. Uploads only ever read sealed versions.
//!
//! Rooms: `namespace` (names and attributes), `files` (open files, the
//! write path, sealing), `read` (reads, fetches, read-ahead), `xattr`,
//! `restore` (versions of a file), `uploads` (the write-back queue),
//! `background` (publication, repair), `evict` (the
//! staging cache's bound). This module holds the types they share and the state.

mod background;
mod error;
mod evict;
mod files;
mod io_path;
mod namespace;
mod read;
mod restore;
mod sync;
mod uploads;
mod xattr;

pub use error::{ErrorKind, GridError, VfsError, VfsResult};
pub use io_path::IoPath;
pub use namespace::StatFs;
pub use sync::{SyncReport, META_CLONED};
pub use uploads::{QueueEntry, Status, Synced};

use namespace::ToFree;

use crate::sys::fs_space;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::Notify;

use crate::catalog::{Catalog, CatalogError, Ino, Kind, NewNode, Node, NodeFacts, Version, VersionState};
use crate::codec::{FileCap, Params, StorageIndex};
use crate::download::{FileReader, RecentSegments};
use crate::grid::Grid;
use crate::stage::chunks::{ChunkState, SealedVersion, WorkingCopy};
use crate::stage::recovery::{version_dir, version_dir_key};
use crate::stage::spare::SpareDirs;
use crate::upload::{self, pack};

/// Longest name a directory entry may have, as on ext4.
pub const NAME_MAX: usize = 255;
/// How often the staging disk is synced (survives a power loss).
pub const DISK_SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// Catalog meta key: the segment size the staging cache was made with.
const META_CACHE_SEGMENT_SIZE: &str = "cache_segment_size";
/// The extended-attribute namespace cairn answers itself.
pub const XATTR_PREFIX: &str = "user.cairn.";

/// Attributes of a node, as every platform adapter needs them.
#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub nlink: u32,
    pub rdev: u32,
}

/// A requested attribute change (setattr / truncate / chmod / utimens).
#[derive(Debug, Default, Clone)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
    /// The caller may not keep set-user/group-ID bits across a size change
    /// (Linux: it lacks CAP_FSETID): a resize drops them, as a write does.
    pub resize_drops_setid: bool,
}

/// The set-user-ID bit, and the set-group-ID bit if the group may execute
/// (otherwise it marks mandatory locking and stays), removed: what Linux
/// does to a file on chown, and on a write or truncate by an unprivileged
/// caller.
pub fn without_setid(mode: u32) -> u32 {
    let mut mode = mode & !0o4000;
    if mode & 0o010 != 0 {
        mode &= !0o2000;
    }
    mode
}

/// Who asks: owner of what gets created, and whether they may see a
/// file's capability.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone)]
pub struct VfsOptions {
    pub home: PathBuf,
    pub writeback_delay: Duration,
    pub read_only: bool,
    /// Bound on the cache's clean (committed) data; staged data is never
    /// evicted and may exceed it.
    pub cache_max_bytes: u64,
}

struct Handle {
    ino: Ino,
    write: bool,
    /// Flushed (closed once) but not yet released.
    closing: bool,
    /// The file's working-copy lock: reads and writes through a handle
    /// reach the copy without `state`.
    copy: CopyLock,
}

/// A file's working copy, behind a lock of its own: the copy's disk I/O
/// (writes and their copy-on-write, fsync's syncing, sealing's links) runs
/// under this lock and never under `state`. Taken before `state`, never
/// while holding it (docs/ARCHITECTURE.md has the whole order).
type CopyLock = Arc<RwLock<Option<WorkingCopy>>>;

fn write_copy(copy: &CopyLock) -> RwLockWriteGuard<'_, Option<WorkingCopy>> {
    copy.write().expect("working copy lock")
}

/// A file with open handles (or a change in progress), and its working
/// copy once written. An entry leaves [`Vfs::files`] only when nothing
/// counts it and nobody else holds its `copy`.
#[derive(Default)]
struct OpenFile {
    handles: usize,
    writers: usize,
    copy: CopyLock,
    /// What the rest of the core needs of the working copy without taking
    /// its lock: changed only by a holder of `copy`'s write lock.
    working: Option<Working>,
    /// Written or truncated since the working copy was made.
    dirty: bool,
    /// When the working copy was last written or truncated, unless an
    /// explicit utimens came after (so `cp -a` and rsync keep their times):
    /// the file's mtime while open, recorded at the seal. The kernel caches
    /// attributes, so sealing must not change them behind its back.
    modified_ns: Option<i64>,
}

impl OpenFile {
    /// Open, or in the hands of a call (a seal after the last release, a
    /// truncate, a restore): deleting it now leaves it an orphan, freed
    /// when the last of them lets go.
    fn in_use(&self) -> bool {
        self.handles > 0 || Arc::strong_count(&self.copy) > 1
    }
}

/// What an open file shows of its working copy in its attributes.
#[derive(Default, Clone, Copy)]
struct Shown {
    size: Option<u64>,
    modified_ns: Option<i64>,
}

impl Shown {
    fn of(file: &OpenFile) -> Shown {
        Shown {
            size: file.working.as_ref().map(|w| w.size),
            modified_ns: file.modified_ns,
        }
    }
}

/// `state`, held. Whatever a call changed in the catalog is committed when
/// it lets go (calls whose failure to commit must be reported commit
/// themselves first), so the readers of [`Vfs::read_catalog`] see every
/// change a call returned from.
struct StateGuard<'a>(MutexGuard<'a, State>);

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.0
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        if self.0.catalog.uncommitted() {
            if let Err(e) = self.0.catalog.commit() {
                tracing::error!(error = %e, "committing the catalog's changes");
            }
        }
    }
}

/// The open working copy as attributes and eviction see it.
struct Working {
    size: u64,
    /// The version it was made over, whose chunks eviction must keep.
    base: Option<PathBuf>,
}

impl Working {
    fn of(work: &WorkingCopy) -> Working {
        Working {
            size: work.size(),
            base: work.base_dir().map(Path::to_owned),
        }
    }
}

/// A sealed version waiting for, or in, upload.
struct Pending {
    sealed_at: Instant,
    /// After a failed attempt: not before this.
    retry_at: Option<Instant>,
    /// `cairn sync` asked for it: skip the write-back delay.
    flush: bool,
    attempts: u32,
    uploading: bool,
    sent: Arc<AtomicU64>,
    size: u64,
    last_error: Option<String>,
    /// The last attempt could not read the staged bytes.
    damaged: bool,
}

impl Pending {
    /// This entry as the upload rules see it.
    fn as_queued(&self, ino: Ino, num: i64) -> crate::upload::schedule::Queued {
        crate::upload::schedule::Queued {
            ino,
            num,
            size: self.size,
            sealed_at: self.sealed_at,
            retry_at: self.retry_at,
            flush: self.flush,
            uploading: self.uploading,
        }
    }

    fn new(size: u64, sealed_at: Instant) -> Pending {
        Pending {
            sealed_at,
            retry_at: None,
            flush: false,
            attempts: 0,
            uploading: false,
            sent: Arc::new(AtomicU64::new(0)),
            size,
            last_error: None,
            damaged: false,
        }
    }
}

/// Sealed versions waiting for, or in, upload, by (file, version).
type Queue = BTreeMap<(Ino, i64), Pending>;

/// Open files by inode: never held across I/O, taken after `state` or
/// alone (attributes read it for open files' sizes and times).
type Files = HashMap<Ino, OpenFile>;

/// The catalog's writer and what changes with it. Held across the
/// catalog's own statements and commits (a WAL append, which the kernel
/// may hold up behind writeback), never across chunk or grid I/O; reads of
/// the namespace go through [`Vfs::read_catalog`] and never wait for it.
struct State {
    catalog: Catalog,
    /// Names a file was renamed away from lately: (directory, name) to the
    /// node and when. A file that takes such a name soon after continues
    /// that node's history (how Word and vim save).
    vacated: HashMap<(Ino, String), (Ino, Instant)>,
}

/// What the platform adapter does when the kernel's caches went wrong.
type Invalidate = Box<dyn Fn(&crate::sync::apply::Inval) + Send + Sync>;

/// How long a vacated name remembers its file for a save-by-rename.
const SAVE_CHAIN_WINDOW: Duration = Duration::from_secs(60);

pub struct Vfs {
    state: Mutex<State>,
    files: Mutex<Files>,
    /// Read-only connections to the catalog, one per concurrent reader,
    /// kept for the next: see [`Vfs::read_catalog`].
    catalog_readers: Mutex<Vec<Catalog>>,
    /// The upload queue, apart from `state` so that the scheduler's passes
    /// over it leave the namespace alone: taken after `state`, or alone.
    queue: Mutex<Queue>,
    /// Open handles. Added and removed under `state` (which counts them
    /// per file); looked up without it.
    handles: DashMap<u64, Handle>,
    next_fh: AtomicU64,
    grid: Arc<Grid>,
    params: Params,
    happy: u16,
    cache: PathBuf,
    options: VfsOptions,
    /// Wakes the upload scheduler.
    upload_wake: Notify,
    /// Signalled whenever a version leaves the queue.
    queue_changed: Notify,
    readers: Mutex<HashMap<StorageIndex, Arc<FileReader>>>,
    /// Segments of packs just read, so the next small file in the same
    /// segment is not fetched again (8 segments: 8 MiB by default).
    recent_segments: Arc<RecentSegments>,
    /// Directories of `dir` servers, for statfs.
    server_dirs: Vec<PathBuf>,
    runtime: tokio::runtime::Handle,
    /// One namespace publication at a time.
    publishing: tokio::sync::Mutex<()>,
    /// Seals decided by a last release whose version is not queued yet:
    /// `cairn sync` waits for them as for the queue.
    sealing: AtomicUsize,
    /// One fsync at a time (taken before `state`).
    syncing: Mutex<()>,
    /// The catalog's second connection, which checkpoints its WAL beside
    /// the core (only the periodic disk sync takes it).
    checkpointer: Mutex<Catalog>,
    /// Whether the catalog's WAL's directory entry was synced.
    wal_dir_synced: std::sync::atomic::AtomicBool,
    /// Chunks (ino, version, index) being read ahead: every read asks for
    /// the next few, and must not fetch again what is already on its way.
    reading_ahead: Arc<Mutex<std::collections::HashSet<(Ino, i64, u64)>>>,
    /// The cache's size at the last eviction pass, and the bytes sealed or
    /// fetched since: while their sum is under the bound, a pass has
    /// nothing to do and skips walking the cache.
    cache_scanned: AtomicU64,
    cache_growth: Arc<AtomicU64>,
    /// Empty directories for new working copies.
    spares: Arc<SpareDirs>,
    /// Set by the platform adapter: see [`Vfs::on_invalidate`].
    invalidate: std::sync::OnceLock<Invalidate>,
    /// This machine among the drive's devices (`sync`).
    devices: sync::Devices,
    /// The data path in use (`cairn status`); a leaf lock.
    io_path: Mutex<IoPath>,
}

fn to_time(ns: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
}

fn to_ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

fn check_name(name: &str) -> VfsResult<()> {
    if name.len() > NAME_MAX {
        return Err(VfsError::NameTooLong);
    }
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(VfsError::Invalid);
    }
    Ok(())
}

impl Vfs {
    pub fn new(
        options: VfsOptions,
        config: &crate::config::Config,
        runtime: tokio::runtime::Handle,
    ) -> VfsResult<Arc<Vfs>> {
        let cache = options.home.join("cache");
        for d in ["work", "versions", "fetch"] {
            std::fs::create_dir_all(cache.join(d))?;
        }
        let mut catalog = Catalog::open(&options.home.join("catalog.db"))?;
        catalog.leave_checkpoints_to_others()?;
        let checkpointer = Catalog::open_checkpointer(&options.home.join("catalog.db"))?;
        // The cache's chunks are segments of this size: read with another,
        // every staged and cached file would be cut wrong.
        let segment = config.grid.segment_size.to_string();
        let made_with = catalog.meta_or_insert(META_CACHE_SEGMENT_SIZE, &segment)?;
        if made_with != segment {
            return Err(VfsError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "grid.segment_size is {segment} in config.toml, but this home's staging cache was made with \
                     {made_with}: put it back (a new segment size needs a new CAIRN_HOME)"
                ),
            )));
        }
        for ino in catalog.orphans()? {
            catalog.forget_orphan(ino)?;
            ToFree::versions(&cache, &catalog, ino).free();
        }
        crate::stage::recovery::recover(&cache, &mut catalog, config.params().segment_size as u64)?;
        let mut queue = BTreeMap::new();
        for v in catalog.staged()? {
            // Already waited out their delay before the last unmount.
            let mut p = Pending::new(v.size, Instant::now());
            p.flush = true;
            queue.insert((v.ino, v.num), p);
        }
        if !queue.is_empty() {
            tracing::info!(versions = queue.len(), "resuming uploads left from the last mount");
        }
        let spares = Arc::new(SpareDirs::new(cache.join("work")));
        let devices = sync::Devices::open(&catalog, config)?;
        Ok(Arc::new(Vfs {
            state: Mutex::new(State {
                catalog,
                vacated: HashMap::new(),
            }),
            files: Mutex::new(HashMap::new()),
            catalog_readers: Mutex::new(Vec::new()),
            queue: Mutex::new(queue),
            handles: DashMap::new(),
            next_fh: AtomicU64::new(1),
            grid: Arc::new(
                Grid::from_config(config, &options.home).map_err(|e| std::io::Error::other(format!("{e:#}")))?,
            ),
            params: config.params(),
            happy: config.grid.happy,
            cache,
            server_dirs: config.servers.iter().filter_map(|s| s.path.clone()).collect(),
            runtime,
            options,
            upload_wake: Notify::new(),
            queue_changed: Notify::new(),
            readers: Mutex::new(HashMap::new()),
            recent_segments: Arc::new(RecentSegments::new(8)),
            publishing: tokio::sync::Mutex::new(()),
            sealing: AtomicUsize::new(0),
            syncing: Mutex::new(()),
            checkpointer: Mutex::new(checkpointer),
            wal_dir_synced: Default::default(),
            reading_ahead: Arc::new(Mutex::new(std::collections::HashSet::new())),
            cache_scanned: AtomicU64::new(u64::MAX),
            cache_growth: Arc::new(AtomicU64::new(0)),
            invalidate: std::sync::OnceLock::new(),
            devices,
            spares,
            io_path: Mutex::new(IoPath::default()),
        }))
    }

    /// Runs blocking core work (the catalog, the staging disk) for async
    /// code on a blocking thread, so no tokio worker waits on `state` or a
    /// disk.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        job: impl FnOnce(&Vfs) -> VfsResult<T> + Send + 'static,
    ) -> VfsResult<T> {
        let vfs = self.clone();
        match tokio::task::spawn_blocking(move || job(&vfs)).await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e).into()),
        }
    }

    /// Runs `read` on a read-only connection to the catalog, without
    /// `state`: it sees every change a call has returned from, as each
    /// commits before letting go of `state` (see [`StateGuard`]).
    fn read_catalog<T>(&self, read: impl FnOnce(&Catalog) -> VfsResult<T>) -> VfsResult<T> {
        let taken = self.catalog_readers.lock().expect("catalog readers").pop();
        let reader = match taken {
            Some(reader) => reader,
            None => Catalog::open_reader(&self.options.home.join("catalog.db"))?,
        };
        let result = read(&reader);
        let mut readers = self.catalog_readers.lock().expect("catalog readers");
        // As many as ever read at once (the adapter's threads), not more.
        if readers.len() < 16 {
            readers.push(reader);
        }
        result
    }

    fn lock(&self) -> StateGuard<'_> {
        StateGuard(self.state.lock().expect("vfs state lock"))
    }

    fn files(&self) -> MutexGuard<'_, Files> {
        self.files.lock().expect("open files lock")
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().expect("upload queue lock")
    }

    fn chunk_size(&self) -> u64 {
        self.params.segment_size as u64
    }

    fn writable(&self) -> VfsResult<()> {
        if self.options.read_only {
            Err(VfsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// A node's attributes. The open files are read before the catalog's
    /// facts: a seal records its version before it lets the working copy's
    /// size go.
    fn attr_of(&self, catalog: &Catalog, node: &Node) -> VfsResult<Attr> {
        let open = self.files().get(&node.ino).map(Shown::of);
        Ok(Self::attr_with(open, node, &catalog.facts(node)?))
    }

    /// A node's attributes from the node, its catalog facts, and what its
    /// open working copy shows, if any.
    fn attr_with(open: Option<Shown>, node: &Node, facts: &NodeFacts) -> Attr {
        let open = open.unwrap_or_default();
        let size = match node.kind {
            Kind::Dir => 4096,
            Kind::Symlink => node.target.as_ref().map_or(0, |t| t.len() as u64),
            Kind::File => open.size.or(facts.latest_size).unwrap_or(0),
            Kind::Fifo | Kind::Socket | Kind::CharDevice | Kind::BlockDevice | Kind::Link => 0,
        };
        let rdev = match node.kind {
            Kind::CharDevice | Kind::BlockDevice => node.target.as_ref().and_then(|t| t.parse().ok()).unwrap_or(0),
            _ => 0,
        };
        Attr {
            ino: node.ino,
            kind: node.kind,
            size,
            perm: (node.mode & 0o7777) as u16,
            uid: node.uid,
            gid: node.gid,
            atime: to_time(node.atime_ns),
            mtime: to_time(open.modified_ns.unwrap_or(node.mtime_ns)),
            ctime: to_time(node.ctime_ns),
            nlink: match node.kind {
                Kind::Dir => 2 + facts.subdirs,
                // Unlinked while open: alive only through its handles.
                // Its first name, unless it was unlinked (open, or left
                // with hard links only), and its hard links.
                _ => u32::from(node.parent != crate::catalog::ORPHAN_PARENT) + facts.links,
            },
            rdev,
        }
    }

    fn node(catalog: &Catalog, ino: Ino) -> VfsResult<Node> {
        catalog.node(ino)?.ok_or(VfsError::NotFound)
    }

    fn dir(catalog: &Catalog, ino: Ino) -> VfsResult<Node> {
        let node = Self::node(catalog, ino)?;
        if node.kind != Kind::Dir {
            return Err(VfsError::NotDir);
        }
        Ok(node)
    }
}
