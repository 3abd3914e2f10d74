//! The platform-neutral file system core: namespace, open files, staging,
//! sealing, versions, and the upload queue. No FUSE here: the `fuse` adapter
//! (and later a WinFsp one) translate kernel requests into these calls and
//! map [`VfsError`] to their error codes in one place each.
//!
//! The rule everything follows: writes go to a working copy in the staging
//! cache; when the last writer of a file releases it, the working copy is
//! sealed as the next immutable version and queued for upload after the
//! write-back delay. Uploads only ever read sealed versions.

use crate::sys::fs_space;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::Notify;

use crate::catalog::{Catalog, CatalogError, Kind, NewNode, Node, NodeFacts, Version, VersionState};
use crate::codec::{FileCap, Params, StorageIndex};
use crate::download::{read_chunk, RecentSegments, VersionReader};
use crate::grid::Grid;
use crate::stage::chunks::{ChunkState, SealedVersion, WorkingCopy};
use crate::stage::spare::SpareDirs;
use crate::upload::{self, pack};

/// Longest name a directory entry may have, as on ext4.
pub const NAME_MAX: usize = 255;
/// Uploads running at once.
const UPLOAD_CONCURRENCY: usize = 2;
/// Segments fetched ahead of a sequential reader.
const READ_AHEAD_SEGMENTS: u64 = 4;
/// How long `cairn sync` waits for releases of files closed just before it.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Longest a metadata change waits in the catalog's batch before it is
/// committed (survives a crash of the daemon).
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// How long a pack that is not full waits for more small versions while
/// more are on their way (a `tar x` seals hundreds a second).
const PACK_LINGER: Duration = Duration::from_secs(1);
/// How often the staging disk is synced (survives a power loss).
pub const DISK_SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// Catalog meta key: the segment size the staging cache was made with.
const META_CACHE_SEGMENT_SIZE: &str = "cache_segment_size";
/// The extended-attribute namespace cairn answers itself.
pub const XATTR_PREFIX: &str = "user.cairn.";

#[derive(Debug, thiserror::Error)]
pub enum VfsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument")]
    Invalid,
    #[error("name too long")]
    NameTooLong,
    #[error("read-only file system")]
    ReadOnly,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("permission denied")]
    AccessDenied,
    #[error("no such attribute")]
    NoAttr,
    #[error("attribute namespace not supported")]
    NotSupported,
    #[error("file is busy")]
    Busy,
    #[error("bad file handle")]
    BadHandle,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Catalog(#[from] CatalogError),
    #[error("grid: {0}")]
    Grid(String),
}

pub type VfsResult<T> = Result<T, VfsError>;

/// Attributes of a node, as every platform adapter needs them.
#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: u64,
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
    ino: i64,
    write: bool,
    /// Flushed (closed once) but not yet released.
    closing: bool,
}

/// A file with open handles, and its working copy once written.
#[derive(Default)]
struct OpenFile {
    handles: usize,
    writers: usize,
    work: Option<WorkingCopy>,
    /// Written or truncated since the working copy was made.
    dirty: bool,
    /// When the working copy was last written or truncated, unless an
    /// explicit utimens came after (so `cp -a` and rsync keep their times):
    /// the file's mtime while open, recorded at the seal. The kernel caches
    /// attributes, so sealing must not change them behind its back.
    modified_ns: Option<i64>,
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

struct State {
    catalog: Catalog,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    files: HashMap<i64, OpenFile>,
    queue: BTreeMap<(i64, i64), Pending>,
    /// Names a file was renamed away from lately: (directory, name) to the
    /// node and when. A file that takes such a name soon after continues
    /// that node's history (how Word and vim save).
    vacated: HashMap<(i64, String), (i64, Instant)>,
}

/// How long a vacated name remembers its file for a save-by-rename.
const SAVE_CHAIN_WINDOW: Duration = Duration::from_secs(60);

pub struct Vfs {
    state: Mutex<State>,
    grid: Arc<Grid>,
    params: Params,
    happy: u16,
    cache: PathBuf,
    options: VfsOptions,
    /// Wakes the upload scheduler.
    upload_wake: Notify,
    /// Signalled whenever a version leaves the queue.
    queue_changed: Notify,
    readers: Mutex<HashMap<StorageIndex, Arc<VersionReader>>>,
    /// Segments of packs just read, so the next small file in the same
    /// segment is not fetched again (8 segments: 8 MiB by default).
    recent_segments: Arc<RecentSegments>,
    /// Directories of `dir` servers, for statfs.
    server_dirs: Vec<PathBuf>,
    runtime: tokio::runtime::Handle,
    /// One namespace publication at a time.
    publishing: tokio::sync::Mutex<()>,
    /// Chunks (ino, version, index) being read ahead: every read asks for
    /// the next few, and must not fetch again what is already on its way.
    reading_ahead: Arc<Mutex<std::collections::HashSet<(i64, i64, u64)>>>,
    /// The cache's size at the last eviction pass, and the bytes sealed or
    /// fetched since: while their sum is under the bound, a pass has
    /// nothing to do and skips walking the cache.
    cache_scanned: AtomicU64,
    cache_growth: Arc<AtomicU64>,
    /// Empty directories for new working copies.
    spares: Arc<SpareDirs>,
    /// Set by the platform adapter: see [`Vfs::on_content_changed`].
    content_changed: std::sync::OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
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

/// A version's directory in the staging cache.
fn version_dir(cache: &Path, ino: i64, num: i64) -> PathBuf {
    cache.join("versions").join(format!("{ino}.{num}"))
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
            purge_versions(&cache, &catalog, ino);
        }
        recover_staging(&cache, &mut catalog, config.params().segment_size as u64)?;
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
        Ok(Arc::new(Vfs {
            state: Mutex::new(State {
                catalog,
                handles: HashMap::new(),
                next_fh: 1,
                files: HashMap::new(),
                queue,
                vacated: HashMap::new(),
            }),
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
            reading_ahead: Arc::new(Mutex::new(std::collections::HashSet::new())),
            cache_scanned: AtomicU64::new(u64::MAX),
            cache_growth: Arc::new(AtomicU64::new(0)),
            content_changed: std::sync::OnceLock::new(),
            spares,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("vfs state lock")
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

    // ----- attributes -----

    fn attr_of(&self, st: &State, node: &Node) -> VfsResult<Attr> {
        Ok(Self::attr_with(st, node, &st.catalog.facts(node)?))
    }

    /// A node's attributes from the node, its catalog facts, and its open
    /// working copy if any.
    fn attr_with(st: &State, node: &Node, facts: &NodeFacts) -> Attr {
        let size = match node.kind {
            Kind::Dir => 4096,
            Kind::Symlink => node.target.as_ref().map_or(0, |t| t.len() as u64),
            Kind::File => match st.files.get(&node.ino).and_then(|f| f.work.as_ref()) {
                Some(work) => work.size(),
                None => facts.latest_size.unwrap_or(0),
            },
            Kind::Fifo | Kind::Socket | Kind::CharDevice | Kind::BlockDevice => 0,
        };
        let rdev = match node.kind {
            Kind::CharDevice | Kind::BlockDevice => node.target.as_ref().and_then(|t| t.parse().ok()).unwrap_or(0),
            _ => 0,
        };
        Attr {
            ino: node.ino as u64,
            kind: node.kind,
            size,
            perm: (node.mode & 0o7777) as u16,
            uid: node.uid,
            gid: node.gid,
            atime: to_time(node.atime_ns),
            mtime: to_time(
                st.files
                    .get(&node.ino)
                    .and_then(|f| f.modified_ns)
                    .unwrap_or(node.mtime_ns),
            ),
            ctime: to_time(node.ctime_ns),
            nlink: match node.kind {
                Kind::Dir => 2 + facts.subdirs,
                // Unlinked while open: alive only through its handles.
                _ if node.parent == crate::catalog::ORPHAN_PARENT => 0,
                _ => 1,
            },
            rdev,
        }
    }

    fn node(st: &State, ino: i64) -> VfsResult<Node> {
        st.catalog.node(ino)?.ok_or(VfsError::NotFound)
    }

    fn dir(st: &State, ino: i64) -> VfsResult<Node> {
        let node = Self::node(st, ino)?;
        if node.kind != Kind::Dir {
            return Err(VfsError::NotDir);
        }
        Ok(node)
    }

    pub fn lookup(&self, parent: u64, name: &str) -> VfsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(VfsError::NameTooLong);
        }
        let st = self.lock();
        Self::dir(&st, parent as i64)?;
        let node = st.catalog.child(parent as i64, name)?.ok_or(VfsError::NotFound)?;
        self.attr_of(&st, &node)
    }

    pub fn getattr(&self, ino: u64) -> VfsResult<Attr> {
        let st = self.lock();
        let node = Self::node(&st, ino as i64)?;
        self.attr_of(&st, &node)
    }

    pub fn setattr(&self, ino: u64, set: SetAttr) -> VfsResult<Attr> {
        self.writable()?;
        // Truncation to the current size changes nothing (and must not
        // count as a write: the kernel sends it after creating with O_TRUNC).
        let resize = set.size.filter(|size| self.getattr(ino).is_ok_and(|a| a.size != *size));
        let ino = ino as i64;
        if let Some(size) = resize {
            self.modify(ino, |work| work.truncate(size))?;
        }
        let mut st = self.lock();
        let mut node = Self::node(&st, ino)?;
        let now = crate::catalog::now_ns();
        if let Some(mode) = set.mode {
            node.mode = mode & 0o7777;
        } else if node.kind != Kind::Dir
            && (set.uid.is_some() || set.gid.is_some() || (resize.is_some() && set.resize_drops_setid))
        {
            node.mode = without_setid(node.mode);
        }
        if let Some(uid) = set.uid {
            node.uid = uid;
        }
        if let Some(gid) = set.gid {
            node.gid = gid;
        }
        if let Some(t) = set.atime {
            node.atime_ns = to_ns(t);
        }
        if let Some(t) = set.mtime {
            node.mtime_ns = to_ns(t);
            if let Some(file) = st.files.get_mut(&ino) {
                file.modified_ns = None;
            }
        } else if resize.is_some() {
            node.mtime_ns = now;
        }
        node.ctime_ns = now;
        st.catalog.update_attrs(&node)?;
        self.attr_of(&st, &node)
    }

    /// posix_fallocate: makes the file at least `offset + len` long.
    /// Other modes (punching holes, collapsing ranges) are not supported.
    pub fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> VfsResult<()> {
        if mode != 0 {
            return Err(VfsError::NotSupported);
        }
        let end = offset.checked_add(len).ok_or(VfsError::Invalid)?;
        if end > self.getattr(ino)?.size {
            self.setattr(
                ino,
                SetAttr {
                    size: Some(end),
                    ..Default::default()
                },
            )?;
        }
        Ok(())
    }

    // ----- namespace -----

    fn create_node(&self, parent: u64, name: &str, new: NewNode<'_>) -> VfsResult<(MutexGuard<'_, State>, Node)> {
        self.writable()?;
        check_name(name)?;
        let st = self.lock();
        Self::dir(&st, parent as i64)?;
        if st.catalog.child(parent as i64, name)?.is_some() {
            return Err(VfsError::Exists);
        }
        let node = st.catalog.create(parent as i64, name, &new)?;
        // A name that appeared survives a crash of the daemon once the call
        // returns (attribute changes are what the batch groups).
        st.catalog.commit()?;
        Ok((st, node))
    }

    pub fn mkdir(&self, parent: u64, name: &str, mode: u32, caller: Caller) -> VfsResult<Attr> {
        let (st, node) = self.create_node(
            parent,
            name,
            NewNode {
                kind: Kind::Dir,
                mode: mode & 0o7777,
                uid: caller.uid,
                gid: caller.gid,
                target: None,
            },
        )?;
        self.attr_of(&st, &node)
    }

    /// A fifo, socket or device node: a name with attributes, no content.
    pub fn mknod(&self, parent: u64, name: &str, kind: Kind, mode: u32, rdev: u32, caller: Caller) -> VfsResult<Attr> {
        let rdev = rdev.to_string();
        let device = matches!(kind, Kind::CharDevice | Kind::BlockDevice);
        let (st, node) = self.create_node(
            parent,
            name,
            NewNode {
                kind,
                mode: mode & 0o7777,
                uid: caller.uid,
                gid: caller.gid,
                target: device.then_some(rdev.as_str()),
            },
        )?;
        self.attr_of(&st, &node)
    }

    pub fn symlink(&self, parent: u64, name: &str, target: &str, caller: Caller) -> VfsResult<Attr> {
        let (st, node) = self.create_node(
            parent,
            name,
            NewNode {
                kind: Kind::Symlink,
                mode: 0o777,
                uid: caller.uid,
                gid: caller.gid,
                target: Some(target),
            },
        )?;
        self.attr_of(&st, &node)
    }

    pub fn readlink(&self, ino: u64) -> VfsResult<String> {
        let st = self.lock();
        let node = Self::node(&st, ino as i64)?;
        node.target.ok_or(VfsError::Invalid)
    }

    /// Creates and opens a regular file for writing. Its empty content
    /// counts as written, so even an empty new file becomes a version.
    pub fn create(&self, parent: u64, name: &str, mode: u32, caller: Caller) -> VfsResult<(Attr, u64)> {
        let (mut st, node) = self.create_node(
            parent,
            name,
            NewNode {
                kind: Kind::File,
                mode: mode & 0o7777,
                uid: caller.uid,
                gid: caller.gid,
                target: None,
            },
        )?;
        let work = self.new_working_copy(node.ino, None)?;
        let file = st.files.entry(node.ino).or_default();
        file.work = Some(work);
        file.dirty = true;
        let fh = Self::add_handle(&mut st, node.ino, true);
        Self::continue_history(&mut st, parent as i64, name, node.ino)?;
        let attr = self.attr_of(&st, &node)?;
        Ok((attr, fh))
    }

    /// A file takes the name (`dir`, `name`): if a file was renamed away
    /// from it within [`SAVE_CHAIN_WINDOW`], this node continues its history.
    fn continue_history(st: &mut State, dir: i64, name: &str, ino: i64) -> VfsResult<()> {
        let Some((previous, when)) = st.vacated.remove(&(dir, name.to_owned())) else {
            return Ok(());
        };
        if previous != ino && when.elapsed() < SAVE_CHAIN_WINDOW {
            let carried = st.catalog.adopt_history(previous, ino)?;
            tracing::debug!(ino, previous, carried, "history continues through a save by rename");
        }
        Ok(())
    }

    fn add_handle(st: &mut State, ino: i64, write: bool) -> u64 {
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

    fn new_working_copy(&self, ino: i64, base: Option<SealedVersion>) -> VfsResult<WorkingCopy> {
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

    pub fn unlink(&self, parent: u64, name: &str) -> VfsResult<()> {
        self.writable()?;
        let mut st = self.lock();
        let node = st.catalog.child(parent as i64, name)?.ok_or(VfsError::NotFound)?;
        if node.kind == Kind::Dir {
            return Err(VfsError::IsDir);
        }
        let open = st.files.get(&node.ino).is_some_and(|f| f.handles > 0);
        st.catalog.unlink(&node, open)?;
        st.catalog.commit()?;
        self.forget_content(&mut st, node.ino, open);
        Ok(())
    }

    /// A deleted file: forget its queued uploads (the catalog marked them
    /// dropped) and, unless it is still open, free its cached versions.
    fn forget_content(&self, st: &mut State, ino: i64, still_open: bool) {
        Self::drop_queued(st, ino);
        if !still_open {
            purge_versions(&self.cache, &st.catalog, ino);
        }
    }

    /// Forgets queued uploads of a deleted file, also those on their way:
    /// an upload whose entry is gone is not recorded when it ends (and
    /// fails sooner, once the version's chunks are freed).
    fn drop_queued(st: &mut State, ino: i64) {
        st.queue.retain(|(i, _), _| *i != ino);
    }

    pub fn rmdir(&self, parent: u64, name: &str) -> VfsResult<()> {
        self.writable()?;
        let mut st = self.lock();
        let node = st.catalog.child(parent as i64, name)?.ok_or(VfsError::NotFound)?;
        if node.kind != Kind::Dir {
            return Err(VfsError::NotDir);
        }
        if st.catalog.has_children(node.ino)? {
            return Err(VfsError::NotEmpty);
        }
        st.catalog.unlink(&node, false)?;
        st.catalog.commit()?;
        Ok(())
    }

    /// Renames, replacing an existing target as rename(2) does. Only the
    /// namespace changes: content and versions stay with the node, so a
    /// rename never re-uploads.
    pub fn rename(&self, parent: u64, name: &str, new_parent: u64, new_name: &str, no_replace: bool) -> VfsResult<()> {
        self.writable()?;
        check_name(new_name)?;
        let mut st = self.lock();
        let node = st.catalog.child(parent as i64, name)?.ok_or(VfsError::NotFound)?;
        Self::dir(&st, new_parent as i64)?;
        let target = st.catalog.child(new_parent as i64, new_name)?;
        if let Some(t) = &target {
            if t.ino == node.ino {
                return Ok(());
            }
            if no_replace {
                return Err(VfsError::Exists);
            }
            match (node.kind == Kind::Dir, t.kind == Kind::Dir) {
                (true, false) => return Err(VfsError::NotDir),
                (false, true) => return Err(VfsError::IsDir),
                (true, true) if st.catalog.has_children(t.ino)? => return Err(VfsError::NotEmpty),
                _ => {}
            }
        }
        let replaced = target.map(|t| {
            let open = st.files.get(&t.ino).is_some_and(|f| f.handles > 0);
            (t, open)
        });
        if node.kind == Kind::File {
            // Save by rename: the replaced file's history, or that of the
            // file that left this name lately, continues in this one.
            match &replaced {
                Some((t, _)) if t.kind == Kind::File => {
                    st.catalog.adopt_history(t.ino, node.ino)?;
                }
                Some(_) => {}
                None => Self::continue_history(&mut st, new_parent as i64, new_name, node.ino)?,
            }
            st.vacated.retain(|_, (_, when)| when.elapsed() < SAVE_CHAIN_WINDOW);
            st.vacated
                .insert((parent as i64, name.to_owned()), (node.ino, Instant::now()));
        }
        st.catalog.rename(
            &node,
            new_parent as i64,
            new_name,
            replaced.as_ref().map(|(t, open)| (t, *open)),
        )?;
        // A rename is how editors save: it is durable (against a crash of
        // the daemon) when it returns, with everything batched before it.
        st.catalog.commit()?;
        if let Some((t, open)) = replaced {
            self.forget_content(&mut st, t.ino, open);
        }
        Ok(())
    }

    /// Directory entries after `offset`, with the offset to resume after
    /// each. Offsets are derived from inode numbers, so they stay valid while
    /// entries are added or removed.
    pub fn readdir(&self, ino: u64, offset: u64) -> VfsResult<Vec<(u64, u64, Kind, String)>> {
        let st = self.lock();
        let dir = Self::dir(&st, ino as i64)?;
        let mut out = Vec::new();
        if offset < 1 {
            out.push((ino, 1, Kind::Dir, ".".to_string()));
        }
        if offset < 2 {
            out.push((dir.parent as u64, 2, Kind::Dir, "..".to_string()));
        }
        for child in st.catalog.children(ino as i64)? {
            let off = child.ino as u64 + 2;
            if off > offset {
                out.push((child.ino as u64, off, child.kind, child.name));
            }
        }
        Ok(out)
    }

    /// [`Vfs::readdir`] with each entry's attributes (READDIRPLUS: `ls -l`
    /// needs no lookup per entry).
    pub fn readdir_plus(&self, ino: u64, offset: u64) -> VfsResult<Vec<(u64, String, Attr)>> {
        let st = self.lock();
        let dir = Self::dir(&st, ino as i64)?;
        let mut out = Vec::new();
        if offset < 1 {
            out.push((1, ".".to_string(), self.attr_of(&st, &dir)?));
        }
        if offset < 2 {
            let parent = Self::node(&st, dir.parent)?;
            out.push((2, "..".to_string(), self.attr_of(&st, &parent)?));
        }
        // Offsets as in `readdir`; the children's attributes in one query.
        let after = offset.saturating_sub(2) as i64;
        for (child, facts) in st.catalog.children_with_facts(dir.ino, after)? {
            let attr = Self::attr_with(&st, &child, &facts);
            out.push((child.ino as u64 + 2, child.name, attr));
        }
        Ok(out)
    }

    // ----- open files -----

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
    fn ensure_working(&self, ino: i64) -> VfsResult<()> {
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

    fn sealed(&self, v: &Version) -> SealedVersion {
        SealedVersion::open(version_dir(&self.cache, v.ino, v.num), v.size, self.chunk_size())
    }

    /// The chunks of `v` among `range` (all of them: `None`) to fetch from
    /// the grid before they are read: absent ones (evicted), and damaged
    /// ones (of the wrong length; removed first). A version not yet on the
    /// grid has nowhere to fetch from, so a missing or damaged chunk of it
    /// is an error, never zeros.
    fn chunks_to_fetch(&self, v: &Version, range: Option<std::ops::Range<u64>>) -> VfsResult<Vec<u64>> {
        let sealed = self.sealed(v);
        let mut fetch = Vec::new();
        // The chunks about to be read are checked against their sums too;
        // a whole version (a base, a restore) by length only: reading every
        // chunk of a big file to append to it would cost the whole file.
        let deep = range.is_some();
        for index in range.unwrap_or(0..v.size.div_ceil(self.chunk_size())) {
            let state = sealed.chunk_state(index, deep);
            if state == ChunkState::Good {
                continue;
            }
            if v.cap.is_none() {
                // NotFound for a missing chunk: `read` retries, since the
                // version may have been superseded (and freed) meanwhile.
                let (what, kind) = match state {
                    ChunkState::Absent => ("missing", std::io::ErrorKind::NotFound),
                    _ => ("damaged", std::io::ErrorKind::InvalidData),
                };
                return Err(VfsError::Io(std::io::Error::new(
                    kind,
                    format!(
                        "version {} of file {}: staged chunk {index} is {what} and the version is not on the grid",
                        v.num, v.ino
                    ),
                )));
            }
            if state == ChunkState::Damaged {
                tracing::warn!(
                    ino = v.ino,
                    num = v.num,
                    index,
                    "a cached chunk was damaged; fetching it again"
                );
                let _ = std::fs::remove_file(sealed.chunk_path(index));
            }
            fetch.push(index);
        }
        Ok(fetch)
    }

    /// Applies a change to a file's working copy. With no writer holding
    /// the file open (truncate(2) by path), the change is sealed at once.
    fn modify(&self, ino: i64, change: impl FnOnce(&mut WorkingCopy) -> std::io::Result<()>) -> VfsResult<()> {
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
    fn ensure_space(&self, bytes: u64) -> VfsResult<()> {
        let (total, free) = fs_space(&self.cache)?;
        let reserve = (total / 50).clamp(4 << 20, 256 << 20);
        if free < reserve + bytes {
            return Err(crate::sys::disk_full().into());
        }
        Ok(())
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> VfsResult<Vec<u8>> {
        let ino = {
            let st = self.lock();
            st.handles.get(&fh).ok_or(VfsError::BadHandle)?.ino
        };
        let mut buf = vec![0u8; size as usize];
        // A version superseded while we read may vanish; one retry picks up
        // the newer one.
        for attempt in 0..2 {
            let version = {
                let st = self.lock();
                if let Some(work) = st.files.get(&ino).and_then(|f| f.work.as_ref()) {
                    let n = work.read_at(offset, &mut buf)?;
                    buf.truncate(n);
                    return Ok(buf);
                }
                match st.catalog.latest(ino)? {
                    Some(v) => v,
                    None => return Ok(Vec::new()),
                }
            };
            match self.read_version(&version, offset, &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(VfsError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound && attempt == 0 => continue,
                Err(e) => return Err(e),
            }
        }
        Err(VfsError::NotFound)
    }

    /// Reads from a sealed version, fetching from the grid the chunks the
    /// cache does not hold, and starting read-ahead of the next ones.
    fn read_version(&self, v: &Version, offset: u64, buf: &mut [u8]) -> VfsResult<usize> {
        if offset >= v.size {
            return Ok(0);
        }
        let cs = self.chunk_size();
        let end = (offset + buf.len() as u64).min(v.size);
        for index in self.chunks_to_fetch(v, Some(offset / cs..end.div_ceil(cs)))? {
            self.fetch_chunk(v, index)?;
        }
        if v.cap.is_some() {
            self.read_ahead(v, end.div_ceil(cs));
        }
        Ok(self.sealed(v).read_at(offset, buf)?)
    }

    /// A reader of the encoded version holding `v`'s bytes (its own, or
    /// its pack, shared by every file in the pack), with `v`'s capability.
    fn version_reader(&self, v: &Version) -> VfsResult<(Arc<VersionReader>, FileCap)> {
        let cap: FileCap = v
            .cap
            .as_deref()
            .ok_or_else(|| VfsError::Grid(format!("version {} is neither cached nor on the grid", v.num)))?
            .parse()
            .map_err(|e: crate::codec::CodecError| VfsError::Grid(e.to_string()))?;
        let index = cap.stored().storage_index();
        if let Some(r) = self.readers.lock().expect("readers").get(&index) {
            return Ok((r.clone(), cap));
        }
        let reader = self
            .runtime
            .block_on(VersionReader::open(self.grid.clone(), cap.stored().clone()))
            .map_err(|e| VfsError::Grid(e.to_string()))?;
        let reader = Arc::new(reader);
        let mut readers = self.readers.lock().expect("readers");
        if readers.len() > 64 {
            readers.clear();
        }
        readers.insert(index, reader.clone());
        Ok((reader, cap))
    }

    /// Downloads, verifies and caches one chunk of a version.
    fn fetch_chunk(&self, v: &Version, index: u64) -> VfsResult<()> {
        let (reader, cap) = self.version_reader(v)?;
        let segment = self
            .runtime
            .block_on(read_chunk(
                &reader,
                &cap,
                index,
                self.chunk_size(),
                &self.recent_segments,
            ))
            .map_err(|e| VfsError::Grid(e.to_string()))?;
        store_chunk(&self.cache, v, index, &segment)?;
        self.cache_growth.fetch_add(segment.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn read_ahead(&self, v: &Version, from: u64) {
        let chunks = v.size.div_ceil(self.chunk_size());
        let dir = version_dir(&self.cache, v.ino, v.num);
        let wanted: Vec<u64> = {
            let mut inflight = self.reading_ahead.lock().expect("read-ahead set");
            (from..(from + READ_AHEAD_SEGMENTS).min(chunks))
                .filter(|&i| !dir.join(i.to_string()).exists() && inflight.insert((v.ino, v.num, i)))
                .collect()
        };
        if wanted.is_empty() {
            return;
        }
        let inflight = self.reading_ahead.clone();
        let done = move |index: u64, v: &Version| {
            inflight.lock().expect("read-ahead set").remove(&(v.ino, v.num, index));
        };
        let Ok((reader, cap)) = self.version_reader(v) else {
            wanted.iter().for_each(|&i| done(i, v));
            return;
        };
        let (cache, v, growth) = (self.cache.clone(), v.clone(), self.cache_growth.clone());
        let recent = self.recent_segments.clone();
        let chunk_size = self.chunk_size();
        self.runtime.spawn(async move {
            let mut failed = false;
            for index in wanted {
                if !failed {
                    match read_chunk(&reader, &cap, index, chunk_size, &recent).await {
                        Ok(segment) => {
                            if store_chunk(&cache, &v, index, &segment).is_ok() {
                                growth.fetch_add(segment.len() as u64, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "read-ahead failed");
                            failed = true;
                        }
                    }
                }
                done(index, &v);
            }
        });
    }

    pub fn fsync(&self, fh: u64) -> VfsResult<()> {
        let mut st = self.lock();
        let ino = st.handles.get(&fh).ok_or(VfsError::BadHandle)?.ino;
        if let Some(work) = st.files.get_mut(&ino).and_then(|f| f.work.as_mut()) {
            work.fsync()?;
        }
        st.catalog.sync_to_disk()?;
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
                if let Some(work) = st.files.remove(&ino).and_then(|f| f.work) {
                    work.discard()?;
                }
                st.catalog.forget_orphan(ino)?;
                purge_versions(&self.cache, &st.catalog, ino);
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
    fn seal(&self, st: &mut State, ino: i64, why: &str) -> VfsResult<()> {
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
                return Err(e);
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

    // ----- extended attributes -----

    /// A file's read capability reads that file wherever its shares are:
    /// only its owner (and root) is given it, whoever else may read the
    /// file through the mount.
    fn may_see_cap(node: &Node, caller: Caller) -> bool {
        caller.uid == 0 || caller.uid == node.uid
    }

    pub fn getxattr(&self, ino: u64, name: &str, caller: Caller) -> VfsResult<Vec<u8>> {
        let st = self.lock();
        let node = Self::node(&st, ino as i64)?;
        if let Some(key) = name.strip_prefix(XATTR_PREFIX) {
            let info = self.file_info(&st, &node)?;
            let value = match key {
                "state" => Some(info.state.to_string()),
                "version" => info.version.map(|v| v.to_string()),
                "cap" if !Self::may_see_cap(&node, caller) => return Err(VfsError::AccessDenied),
                "cap" => info.cap,
                "sha256" => info.sha256,
                _ => None,
            };
            return value.map(String::into_bytes).ok_or(VfsError::NoAttr);
        }
        // Only user.* is stored (setxattr refuses the rest). Saying so,
        // rather than "no such attribute", lets `ls -l` stop asking for
        // security.selinux and ACLs of every file: it remembers an
        // unsupported answer per file system.
        if !name.starts_with("user.") {
            return Err(VfsError::NotSupported);
        }
        st.catalog.xattr(node.ino, name)?.ok_or(VfsError::NoAttr)
    }

    pub fn listxattr(&self, ino: u64, caller: Caller) -> VfsResult<Vec<String>> {
        let st = self.lock();
        let node = Self::node(&st, ino as i64)?;
        let mut names = st.catalog.xattr_names(node.ino)?;
        if node.kind == Kind::File {
            let info = self.file_info(&st, &node)?;
            names.push(format!("{XATTR_PREFIX}state"));
            if info.version.is_some() {
                names.push(format!("{XATTR_PREFIX}version"));
            }
            if info.cap.is_some() {
                if Self::may_see_cap(&node, caller) {
                    names.push(format!("{XATTR_PREFIX}cap"));
                }
                names.push(format!("{XATTR_PREFIX}sha256"));
            }
        }
        Ok(names)
    }

    pub fn setxattr(&self, ino: u64, name: &str, value: &[u8]) -> VfsResult<()> {
        self.writable()?;
        if name.starts_with(XATTR_PREFIX) {
            return Err(VfsError::NotPermitted);
        }
        if !name.starts_with("user.") {
            return Err(VfsError::NotSupported);
        }
        let st = self.lock();
        Self::node(&st, ino as i64)?;
        st.catalog.set_xattr(ino as i64, name, value)?;
        Ok(())
    }

    pub fn removexattr(&self, ino: u64, name: &str) -> VfsResult<()> {
        self.writable()?;
        if name.starts_with(XATTR_PREFIX) {
            return Err(VfsError::NotPermitted);
        }
        let st = self.lock();
        if st.catalog.remove_xattr(ino as i64, name)? {
            Ok(())
        } else {
            Err(VfsError::NoAttr)
        }
    }

    fn file_info(&self, st: &State, node: &Node) -> VfsResult<FileInfo> {
        let open_dirty = st.files.get(&node.ino).is_some_and(|f| f.work.is_some() && f.dirty);
        let latest = st.catalog.latest(node.ino)?;
        let committed = st.catalog.latest_committed(node.ino)?;
        let uploading = st.queue.iter().any(|((i, _), p)| *i == node.ino && p.uploading);
        let state = if open_dirty {
            "writing"
        } else if uploading {
            "uploading"
        } else {
            match &latest {
                None => "empty",
                Some(v) if v.state == VersionState::Committed => "committed",
                Some(_) => "staged",
            }
        };
        Ok(FileInfo {
            state,
            version: latest.map(|v| v.num),
            cap: committed.as_ref().and_then(|v| v.cap.clone()),
            sha256: committed.map(|v| v.sha256),
        })
    }

    pub fn statfs(&self) -> VfsResult<StatFs> {
        let st = self.lock();
        let files = st.catalog.count_nodes()?;
        drop(st);
        // Capacity in file bytes: each version puts 1/k of its size on each
        // of n servers, so a disk holding c servers fills at c/k bytes per
        // file byte. The first disk to fill bounds the grid.
        let mut disks: HashMap<u64, (u64, u64, u64)> = HashMap::new();
        for dir in self.server_dirs.iter().chain(std::iter::once(&self.cache)) {
            if let (Ok(meta), Ok((total, free))) = (std::fs::metadata(dir), fs_space(dir)) {
                let count = if dir == &self.cache { 0 } else { 1 };
                disks.entry(crate::sys::device_of(&meta)).or_insert((total, free, 0)).2 += count;
            }
        }
        let k = self.params.needed as u64;
        let (total_bytes, free_bytes) = disks
            .values()
            .filter(|(_, _, count)| *count > 0)
            .map(|(total, free, count)| (total * k / count, free * k / count))
            .fold((u64::MAX, u64::MAX), |(t, f), (t2, f2)| (t.min(t2), f.min(f2)));
        Ok(StatFs {
            total_bytes: if total_bytes == u64::MAX { 0 } else { total_bytes },
            free_bytes: if free_bytes == u64::MAX { 0 } else { free_bytes },
            files,
        })
    }
}

struct FileInfo {
    state: &'static str,
    version: Option<i64>,
    cap: Option<String>,
    sha256: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub files: u64,
}

/// Whether reading a sealed version failed because its staged bytes are
/// gone or cut short (its upload can never succeed), rather than for a
/// passing reason.
fn is_damage(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData)
}

/// A file's queued versions, oldest first (by version number, whatever
/// its sign).
fn queued(st: &State, ino: i64) -> impl Iterator<Item = (i64, &Pending)> {
    st.queue
        .range((ino, i64::MIN)..=(ino, i64::MAX))
        .map(|((_, num), p)| (*num, p))
}

/// Removes every cached version of a deleted file (the catalog keeps their
/// rows, so it knows which).
fn purge_versions(cache: &Path, catalog: &Catalog, ino: i64) {
    let nums = match catalog.version_nums(ino) {
        Ok(nums) => nums,
        Err(e) => {
            tracing::warn!(ino, error = %e, "listing versions to free");
            return;
        }
    };
    for num in nums {
        match std::fs::remove_dir_all(version_dir(cache, ino, num)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(ino, num, error = %e, "freeing a cached version");
            }
            _ => {}
        }
    }
}

/// Writes a verified chunk into a version's cache directory atomically.
fn store_chunk(cache: &Path, v: &Version, index: u64, bytes: &[u8]) -> std::io::Result<()> {
    let dir = version_dir(cache, v.ino, v.num);
    std::fs::create_dir_all(&dir)?;
    let tmp = cache
        .join("fetch")
        .join(format!("{}.{}.{index}.{:016x}", v.ino, v.num, rand::random::<u64>()));
    std::fs::write(&tmp, bytes)?;
    // The sum first: a chunk is never in the cache without it.
    crate::stage::sums::record(&dir, index, &crate::stage::sums::sum_of(bytes))?;
    let dest = dir.join(index.to_string());
    match std::fs::rename(&tmp, &dest) {
        // Another fetch stored the same verified chunk first, and a reader
        // holds it open: Windows refuses to replace an open file. The bytes
        // are identical (a version never changes), so keep the one there.
        Err(_) if dest.exists() => std::fs::remove_file(&tmp),
        other => other,
    }
}

/// Seals a working copy as the file's next version and records it (state
/// staged). The committed catalog row is the commit point (see
/// [`WorkingCopy::seal`]); a crash on either side of it is resolved by
/// `recover_staging`. On failure the working copy comes back unchanged.
fn record_sealed(
    cache: &Path,
    catalog: &mut Catalog,
    ino: i64,
    work: WorkingCopy,
) -> Result<(i64, SealedVersion), Box<(WorkingCopy, VfsError)>> {
    let num = match catalog.next_version_num(ino) {
        Ok(num) => num,
        Err(e) => return Err(Box::new((work, e.into()))),
    };
    let origin = work.dir().file_name().map(|n| n.to_string_lossy().into_owned());
    let sealed = work.seal(version_dir(cache, ino, num), |size| -> VfsResult<()> {
        catalog.add_version(ino, size, "", VersionState::Staged, None, origin.as_deref())?;
        catalog.commit()?;
        Ok(())
    })?;
    Ok((num, sealed))
}

/// (ino, version number) of a `cache/versions/INO.NUM` directory.
fn version_dir_key(path: &Path) -> Option<(i64, i64)> {
    let (ino, num) = path.file_name()?.to_str()?.split_once('.')?;
    Some((ino.parse().ok()?, num.parse().ok()?))
}

// ----- crash recovery -----

/// Puts the staging cache back in order after a crash (kill -9, power loss):
/// - a version directory without a catalog row was being sealed when the
///   crash came: its working copy is still whole, so it goes;
/// - a working copy whose version row exists was sealed already: it goes;
/// - any other working copy belonged to a file open for writing: every byte
///   that reached it is kept, and it is sealed as the file's next version.
fn recover_staging(cache: &Path, catalog: &mut Catalog, chunk_size: u64) -> VfsResult<()> {
    let known = catalog.version_states()?;
    for entry in std::fs::read_dir(cache.join("versions"))? {
        let path = entry?.path();
        if version_dir_key(&path).is_none_or(|k| !known.contains_key(&k)) {
            tracing::info!(path = %path.display(), "removing a version left half-sealed by a crash");
            std::fs::remove_dir_all(&path)?;
        }
    }
    for entry in std::fs::read_dir(cache.join("work"))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ino = name.split_once('-').and_then(|(i, _)| i.parse::<i64>().ok());
        let live = match ino {
            Some(ino) => catalog
                .node(ino)?
                .is_some_and(|n| n.parent != crate::catalog::ORPHAN_PARENT),
            None => false,
        };
        if let Some((ino, num)) = catalog.sealed_from(&name)? {
            // Sealed and recorded; if the crash came before the copy moved
            // into place, it moves now.
            let dir = version_dir(cache, ino, num);
            if dir.exists() {
                std::fs::remove_dir_all(&path)?;
            } else {
                WorkingCopy::finish_seal(&path, &dir)?;
            }
            continue;
        }
        // A copy over a base killed before it was ready was never written.
        if !live || name.ends_with(crate::stage::chunks::UNFINISHED_SUFFIX) {
            std::fs::remove_dir_all(&path)?;
            continue;
        }
        let ino = ino.expect("live implies a parsed inode");
        let work = match WorkingCopy::recover(path.clone(), chunk_size) {
            Ok(work) => work,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                // An unreadable state file (cut short by a power loss before
                // states were synced): keep the bytes aside and go on.
                let aside = cache.join("quarantine").join(&name);
                std::fs::create_dir_all(cache.join("quarantine"))?;
                std::fs::rename(&path, &aside)?;
                tracing::error!(
                    path = %catalog.path_of(ino)?,
                    kept = %aside.display(),
                    error = %e,
                    "a working copy's state is unreadable: its chunk files are kept aside, the file keeps its last sealed version"
                );
                continue;
            }
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("recovering {}: {e}", path.display())).into()),
        };
        let (num, sealed) = record_sealed(cache, catalog, ino, work).map_err(|failed| failed.1)?;
        tracing::warn!(
            path = %catalog.path_of(ino)?,
            size = sealed.size,
            version = num,
            "a file open for writing at a crash was recovered as a new version"
        );
    }
    Ok(())
}

// ----- cache eviction -----

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

// ----- the upload queue -----

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
}

struct ProgressCounter(Arc<AtomicU64>);

impl upload::Progress for ProgressCounter {
    fn advance(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Vfs {
    pub fn status(&self) -> VfsResult<Status> {
        let st = self.lock();
        let mut queue = Vec::new();
        let now = Instant::now();
        for ((ino, num), p) in &st.queue {
            let state = if p.uploading {
                "uploading"
            } else if self.ino_ready_at(&st, *ino, now).is_none_or(|t| t > now) {
                "waiting"
            } else {
                "queued"
            };
            queue.push(QueueEntry {
                path: st.catalog.path_of(*ino)?,
                version: *num,
                size: p.size,
                state: state.into(),
                sent: p.sent.load(Ordering::Relaxed),
                attempts: p.attempts,
                last_error: p.last_error.clone(),
            });
        }
        let mut open_for_write = Vec::new();
        for (ino, f) in &st.files {
            if f.writers > 0 {
                open_for_write.push(st.catalog.path_of(*ino)?);
            }
        }
        let budget = &self.grid.budget;
        Ok(Status {
            queue,
            open_for_write,
            upload_memory_bytes: budget.memory_in_use(),
            upload_memory_limit: budget.memory_limit(),
            spill_bytes: budget.spill_in_use(),
        })
    }

    /// Skips the write-back delay for everything queued and waits until
    /// every sealed version is committed (or superseded, or its file gone).
    pub async fn sync(&self) -> VfsResult<usize> {
        // The kernel releases a closed file (which seals it) asynchronously,
        // so versions may still arrive while we wait: every round marks the
        // whole queue, and waits for handles closed just before `sync`.
        let grace_until = Instant::now() + CLOSE_GRACE;
        let mut seen = std::collections::BTreeSet::new();
        loop {
            let notified = self.queue_changed.notified();
            {
                let mut st = self.lock();
                for (key, p) in st.queue.iter_mut() {
                    p.flush = true;
                    seen.insert(*key);
                }
                let closing = Instant::now() < grace_until && st.handles.values().any(|h| h.closing);
                if let Some(((ino, num), p)) = st.queue.iter().find(|(_, p)| p.damaged) {
                    let path = st.catalog.path_of(*ino).unwrap_or_else(|_| format!("file {ino}"));
                    return Err(VfsError::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{path}: version {num} cannot be uploaded: {}",
                            p.last_error.as_deref().unwrap_or("its staged bytes cannot be read")
                        ),
                    )));
                }
                if st.queue.is_empty() && !closing {
                    st.catalog.commit()?;
                    return Ok(seen.len());
                }
            }
            self.upload_wake.notify_one();
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
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
            match self.next_upload() {
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

    /// When the newest pending version of `ino` may start uploading: once
    /// the file has been quiet for the write-back delay (so a burst of saves
    /// uploads once), or once its oldest pending version has waited five
    /// delays (so a file saved continuously still reaches the grid), and
    /// never while another version of it is uploading. `None`: not now.
    fn ino_ready_at(&self, st: &State, ino: i64, now: Instant) -> Option<Instant> {
        let pending: Vec<&Pending> = queued(st, ino).map(|(_, p)| p).collect();
        if pending.iter().any(|p| p.uploading) {
            return None;
        }
        let (oldest, newest) = (pending.first()?, pending.last()?);
        let delay = self.options.writeback_delay;
        let mut at = (newest.sealed_at + delay).min(oldest.sealed_at + delay * 5);
        if pending.iter().any(|p| p.flush) {
            at = at.min(now);
        }
        Some(newest.retry_at.map_or(at, |r| r.max(at)))
    }

    /// The next upload: a version too big to pack, or a pack of ready
    /// small versions. A pack that is not full lingers up to
    /// [`PACK_LINGER`] for more, while more versions are on their way and no
    /// `cairn sync` waits. Otherwise: when to ask again (`None`: when woken).
    fn next_upload(&self) -> VfsResult<Next> {
        let mut st = self.lock();
        let now = Instant::now();
        let inos: std::collections::BTreeSet<i64> = st.queue.keys().map(|(ino, _)| *ino).collect();
        let (mut pack, mut pack_bytes) = (Vec::new(), 0);
        let (mut next_ready, mut oldest_member, mut flush) = (None::<Instant>, now, false);
        for ino in inos {
            let ready_since = match self.ino_ready_at(&st, ino, now) {
                None => continue,
                Some(t) if t > now => {
                    next_ready = Some(next_ready.map_or(t, |n| n.min(t)));
                    continue;
                }
                Some(t) => t,
            };
            let nums: Vec<i64> = queued(&st, ino).map(|(num, _)| num).collect();
            let (newest, older) = nums.split_last().expect("ready implies pending");
            for num in older {
                // Superseded before its upload started: never uploaded.
                st.queue.remove(&(ino, *num));
                st.catalog.set_version_state(ino, *num, VersionState::Superseded)?;
                let _ = std::fs::remove_dir_all(version_dir(&self.cache, ino, *num));
                tracing::debug!(ino, num, "superseded before upload");
            }
            if !older.is_empty() {
                self.queue_changed.notify_waiters();
            }
            let num = *newest;
            let p = &st.queue[&(ino, num)];
            let small = p.size <= pack::MEMBER_MAX;
            if !small && !pack.is_empty() {
                continue; // next time, after this pack
            }
            let queued = QueuedVersion {
                ino,
                num,
                version: SealedVersion::open(version_dir(&self.cache, ino, num), p.size, self.chunk_size()),
                sent: p.sent.clone(),
            };
            if !small {
                return Ok(Next::Job(Self::take(&mut st, UploadJob::Whole(queued))));
            }
            pack_bytes += p.size;
            flush |= p.flush;
            oldest_member = oldest_member.min(ready_since);
            pack.push(queued);
            if pack_bytes >= pack::TARGET_BYTES || pack.len() >= pack::MAX_MEMBERS {
                flush = true; // full
                break;
            }
        }
        if pack.is_empty() {
            return Ok(Next::At(next_ready));
        }
        let linger_until = oldest_member + PACK_LINGER;
        if flush || next_ready.is_none() || linger_until <= now {
            return Ok(Next::Job(Self::take(&mut st, UploadJob::Pack(pack))));
        }
        Ok(Next::At(Some(next_ready.map_or(linger_until, |t| t.min(linger_until)))))
    }

    /// Marks a job's versions as uploading.
    fn take(st: &mut State, job: UploadJob) -> UploadJob {
        let members = match &job {
            UploadJob::Whole(one) => std::slice::from_ref(one),
            UploadJob::Pack(many) => many.as_slice(),
        };
        for m in members {
            let p = st.queue.get_mut(&(m.ino, m.num)).expect("queued");
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
    async fn upload_key(&self, ino: i64, num: i64) -> VfsResult<crate::codec::Key> {
        let key: crate::codec::Key = rand::random();
        let previous = {
            let st = self.lock();
            let previous = st
                .catalog
                .new_upload_key(ino, num, &data_encoding::HEXLOWER.encode(&key))?;
            st.catalog.commit()?;
            previous
        };
        let previous = previous.and_then(|k| data_encoding::HEXLOWER.decode(k.as_bytes()).ok());
        if let Some(old) = previous.and_then(|k| crate::codec::Key::try_from(k).ok()) {
            let si = crate::codec::storage_index_for(&old);
            if let Err(failures) = crate::gc::delete_shares(&self.grid, si).await {
                tracing::debug!(ino, num, ?failures, "an earlier attempt's shares stay on some servers");
            }
        }
        Ok(key)
    }

    async fn upload_one(&self, job: UploadJob) {
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
    async fn upload_pack(&self, members: Vec<QueuedVersion>) {
        let sources: Vec<SealedVersion> = members.iter().map(|m| m.version.clone()).collect();
        let assembled = tokio::task::spawn_blocking(move || {
            pack::assemble(sources.iter().map(|v| (v.reader(), v.size, rand::random())))
        })
        .await;
        let packed = match assembled {
            Ok(packed) => packed,
            Err(e) => {
                let mut st = self.lock();
                for m in &members {
                    Self::upload_failed(&mut st, m, &format!("reading versions to pack: {e}"), false);
                }
                return;
            }
        };
        let mut going = Vec::new();
        {
            let mut st = self.lock();
            for (m, at) in members.into_iter().zip(packed.members) {
                match at {
                    Ok(at) => going.push((m, at)),
                    Err(e) => {
                        let damaged = is_damage(&e);
                        Self::upload_failed(&mut st, &m, &format!("reading the sealed version: {e}"), damaged)
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
        let result = upload::upload(
            &self.grid,
            self.params,
            self.happy,
            source,
            rand::random(),
            Arc::new(()),
        )
        .await;
        let mut st = self.lock();
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                for (m, _) in &going {
                    Self::upload_failed(&mut st, m, &e.to_string(), false);
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
                (m, cap, at.sha256)
            })
            .collect();
        Self::record_committed(&mut st, &done, degraded);
        tracing::info!(files = going.len(), shares = report.placed.len(), "committed a pack");
    }

    /// Versions are on the grid: recorded (committed at once: nothing else
    /// knows their keys), and off the queue. If the record cannot be written
    /// (a full disk), they stay queued and are uploaded again later, under
    /// new keys.
    fn record_committed(st: &mut State, done: &[(&QueuedVersion, FileCap, crate::codec::Hash)], degraded: bool) {
        // Versions of files deleted during their upload were dropped.
        let done: Vec<_> = done
            .iter()
            .filter(|(job, _, _)| st.queue.contains_key(&(job.ino, job.num)))
            .collect();
        let record = || -> Result<(), CatalogError> {
            for (job, cap, sha256) in &done {
                let sha = data_encoding::HEXLOWER.encode(sha256);
                st.catalog.commit_version(job.ino, job.num, &cap.to_string(), &sha)?;
                // Happiness held without every server: repaired later.
                if degraded {
                    st.catalog.set_degraded(job.ino, job.num, true)?;
                }
            }
            st.catalog.commit().map(drop)
        };
        match record() {
            Ok(()) => {
                for (job, _, _) in &done {
                    st.queue.remove(&(job.ino, job.num));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "recording committed versions");
                for (job, _, _) in &done {
                    Self::upload_failed(st, job, &format!("recording the committed version: {e}"), false);
                }
            }
        }
    }

    /// An upload attempt failed: the version waits, backing off, to retry.
    /// `damaged`: its staged bytes cannot be read; `cairn sync` says so
    /// rather than wait for it.
    fn upload_failed(st: &mut State, job: &QueuedVersion, error: &str, damaged: bool) {
        if let Some(p) = st.queue.get_mut(&(job.ino, job.num)) {
            p.attempts += 1;
            p.uploading = false;
            p.damaged = damaged;
            let backoff = Duration::from_secs(1 << p.attempts.min(6));
            p.retry_at = Some(Instant::now() + backoff);
            p.last_error = Some(error.to_owned());
            tracing::warn!(
                ino = job.ino,
                num = job.num,
                error,
                ?backoff,
                "upload failed; will retry"
            );
        }
    }

    async fn upload_whole(&self, job: QueuedVersion) {
        // A retry after recording failed: a later group commit may have
        // recorded the earlier attempt after all, and its shares (which the
        // new attempt would delete) are then the version's.
        {
            let mut st = self.lock();
            let committed = st
                .catalog
                .versions(job.ino)
                .map(|vs| vs.iter().any(|v| v.num == job.num && v.cap.is_some()));
            if let Ok(true) = committed {
                st.queue.remove(&(job.ino, job.num));
                return;
            }
        }
        let key = match self.upload_key(job.ino, job.num).await {
            Ok(key) => key,
            Err(e) => {
                let mut st = self.lock();
                return Self::upload_failed(&mut st, &job, &format!("recording the upload key: {e}"), false);
            }
        };
        let source = upload::Source {
            reader: Box::new(job.version.reader()),
            size: job.version.size,
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
        let mut st = self.lock();
        match result {
            Ok(report) => {
                let degraded = report.placed.len() < self.params.total as usize;
                let cap = FileCap::Whole(report.cap);
                Self::record_committed(&mut st, &[(&job, cap, report.plaintext_sha256)], degraded);
                tracing::info!(ino = job.ino, num = job.num, shares = report.placed.len(), "committed");
            }
            Err(e) => {
                let damaged = matches!(&e, upload::UploadError::Source(io) if is_damage(io));
                Self::upload_failed(&mut st, &job, &e.to_string(), damaged)
            }
        }
    }

    /// Repairs committed versions that were uploaded without every server,
    /// once those servers answer again. Returns how many became healthy.
    /// Publishes the namespace to the grid if it changed since the last
    /// publication; returns its sequence number if it did.
    pub async fn publish_namespace(&self) -> VfsResult<Option<u64>> {
        let _one = self.publishing.lock().await;
        let grid_err = |e: crate::namespace::NamespaceError| VfsError::Grid(e.to_string());
        let Some(pending) = crate::namespace::prepare(&self.lock().catalog).map_err(grid_err)? else {
            return Ok(None);
        };
        let published = crate::namespace::upload(&self.grid, self.params, self.happy, pending)
            .await
            .map_err(grid_err)?;
        crate::namespace::record(&self.lock().catalog, &published).map_err(grid_err)?;
        tracing::info!(
            seq = published.namespace.seq,
            bytes = published.bytes,
            "published the namespace"
        );
        Ok(Some(published.namespace.seq))
    }

    pub async fn repair_degraded(&self) -> VfsResult<usize> {
        let degraded = self.lock().catalog.degraded_versions()?;
        let mut healed = 0;
        // Files in one pack share its shares: repair it once.
        let mut repaired: HashMap<StorageIndex, bool> = HashMap::new();
        for v in degraded {
            let Some(cap) = v.cap.as_deref().and_then(|c| c.parse::<FileCap>().ok()) else {
                continue;
            };
            let stored = cap.stored().clone();
            if let Some(&healthy) = repaired.get(&stored.storage_index()) {
                if healthy {
                    self.lock().catalog.set_degraded(v.ino, v.num, false)?;
                    healed += 1;
                }
                continue;
            }
            let result = crate::repair::repair(self.grid.clone(), stored.clone()).await;
            repaired.insert(stored.storage_index(), matches!(&result, Ok(r) if r.healthy));
            match result {
                Ok(report) if report.healthy => {
                    self.lock().catalog.set_degraded(v.ino, v.num, false)?;
                    tracing::info!(ino = v.ino, num = v.num, placed = ?report.placed, "repaired");
                    healed += 1;
                }
                Ok(report) => tracing::debug!(ino = v.ino, num = v.num, failures = ?report.failures, "repair: not yet"),
                Err(e) => tracing::warn!(ino = v.ino, num = v.num, error = %e, "repair failed"),
            }
        }
        Ok(healed)
    }

    // ----- versions, for the control socket -----

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
        let (ino, restored) = self.restore_version(path, num)?;
        if let Some(invalidate) = self.content_changed.get() {
            invalidate(ino as u64);
        }
        Ok(restored)
    }

    /// Registers what to call when a file's content changes other than by
    /// a write through the mount (the adapter invalidates kernel caches).
    pub fn on_content_changed(&self, invalidate: impl Fn(u64) + Send + Sync + 'static) {
        let _ = self.content_changed.set(Box::new(invalidate));
    }

    fn restore_version(&self, path: &str, num: i64) -> VfsResult<(i64, i64)> {
        self.writable()?;
        let mut st = self.lock();
        let node = st.catalog.resolve(path)?;
        if st.files.get(&node.ino).is_some_and(|f| f.writers > 0) {
            return Err(VfsError::Busy);
        }
        let old = st
            .catalog
            .versions(node.ino)?
            .into_iter()
            .find(|v| v.num == num)
            .ok_or(VfsError::NotFound)?;
        let new_num = st.catalog.next_version_num(node.ino)?;
        let old_dir = version_dir(&self.cache, node.ino, num);
        let new_dir = version_dir(&self.cache, node.ino, new_num);
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
        match old.state {
            VersionState::Committed => {
                let n = st.catalog.add_version(
                    node.ino,
                    old.size,
                    &old.sha256,
                    VersionState::Committed,
                    old.cap.as_deref(),
                    None,
                )?;
                Ok((node.ino, n))
            }
            _ if old_dir.is_dir() && matches!(self.chunks_to_fetch(&old, None), Ok(fetch) if fetch.is_empty()) => {
                let n = st
                    .catalog
                    .add_version(node.ino, old.size, "", VersionState::Staged, None, None)?;
                let mut p = Pending::new(old.size, Instant::now());
                p.flush = true;
                st.queue.insert((node.ino, n), p);
                self.upload_wake.notify_one();
                Ok((node.ino, n))
            }
            _ => Err(VfsError::Grid(format!(
                "version {num} was never uploaded and is no longer in the cache"
            ))),
        }
    }
}

/// A sealed version taken off the queue for upload.
struct QueuedVersion {
    ino: i64,
    num: i64,
    version: SealedVersion,
    sent: Arc<AtomicU64>,
}

enum UploadJob {
    Whole(QueuedVersion),
    Pack(Vec<QueuedVersion>),
}

/// What the upload scheduler does next.
enum Next {
    Job(UploadJob),
    /// Nothing to start yet: ask again then (`None`: when woken).
    At(Option<Instant>),
}
