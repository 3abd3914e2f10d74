//! The POSIX namespace: lookups, attributes, creating, linking and
//! removing names, renames, directory listings, statfs.

use super::*;
use crate::catalog::linked_node;

#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub files: u64,
}

/// Cache directories of a deleted file (or of superseded versions), listed
/// under the core's lock and removed after it is dropped: removing a big
/// file's chunks takes long, and nothing can reach them any more (inode and
/// version numbers are never reused).
#[must_use = "the directories are removed by `free`, once the lock is dropped"]
#[derive(Default)]
pub(super) struct ToFree(Vec<PathBuf>);

impl ToFree {
    /// Every cached version of the deleted file `ino` (the catalog keeps
    /// their rows, so it knows which).
    pub(super) fn versions(cache: &Path, catalog: &Catalog, ino: Ino) -> ToFree {
        match catalog.version_nums(ino) {
            Ok(nums) => ToFree(nums.into_iter().map(|num| version_dir(cache, ino, num)).collect()),
            Err(e) => {
                tracing::warn!(ino, error = %e, "listing versions to free");
                ToFree::default()
            }
        }
    }

    pub(super) fn and(mut self, dir: PathBuf) -> ToFree {
        self.0.push(dir);
        self
    }

    pub(super) fn free(self) {
        for dir in self.0 {
            // Windows refuses to delete a file another handle has open:
            // a seal linking a chunk of this version at that moment (seen
            // under wine in tests/vfs_model) lets go within milliseconds.
            let tries = if cfg!(windows) { 20 } else { 1 };
            for attempt in 1..=tries {
                match std::fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        if attempt == tries {
                            tracing::warn!(dir = %dir.display(), error = %e, "freeing cached chunks");
                        } else {
                            std::thread::sleep(std::time::Duration::from_millis(25));
                        }
                    }
                    _ => break,
                }
            }
        }
    }
}

impl Vfs {
    pub fn lookup(&self, parent: Ino, name: &str) -> VfsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(VfsError::NameTooLong);
        }
        self.read_catalog(|catalog| {
            Self::dir(catalog, parent)?;
            let node = catalog.child(parent, name)?.ok_or(VfsError::NotFound)?;
            self.attr_of(catalog, &node)
        })
    }

    pub fn getattr(&self, ino: Ino) -> VfsResult<Attr> {
        self.read_catalog(|catalog| self.attr_of(catalog, &Self::node(catalog, ino)?))
    }

    pub fn setattr(&self, ino: Ino, set: SetAttr) -> VfsResult<Attr> {
        self.writable()?;
        // Truncation to the current size changes nothing (and must not
        // count as a write: the kernel sends it after creating with O_TRUNC).
        let resize = set.size.filter(|size| self.getattr(ino).is_ok_and(|a| a.size != *size));
        if let Some(size) = resize {
            self.modify(ino, size > 0, |work| work.truncate(size))?;
        }
        let st = self.lock();
        let mut node = Self::node(&st.catalog, ino)?;
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
        } else if resize.is_some() {
            node.mtime_ns = now;
        }
        node.ctime_ns = now;
        st.catalog.update_attrs(&node)?;
        st.catalog.commit()?;
        // An explicit mtime outlasts the writes before it (once committed:
        // attributes read the open file's time first).
        if set.mtime.is_some() {
            if let Some(file) = self.files().get_mut(&ino) {
                file.modified_ns = None;
            }
        }
        self.attr_of(&st.catalog, &node)
    }

    /// posix_fallocate: makes the file at least `offset + len` long.
    /// Other modes (punching holes, collapsing ranges) are not supported.
    pub fn fallocate(&self, ino: Ino, offset: u64, len: u64, mode: i32) -> VfsResult<()> {
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

    pub(super) fn create_node(&self, parent: Ino, name: &str, new: NewNode<'_>) -> VfsResult<(StateGuard<'_>, Node)> {
        self.writable()?;
        check_name(name)?;
        let st = self.lock();
        Self::dir(&st.catalog, parent)?;
        if st.catalog.name_row(parent, name)?.is_some() {
            return Err(VfsError::Exists);
        }
        let node = st.catalog.create(parent, name, &new)?;
        // A name that appeared survives a crash of the daemon once the call
        // returns (and readers see it).
        st.catalog.commit()?;
        Ok((st, node))
    }

    pub fn mkdir(&self, parent: Ino, name: &str, mode: u32, caller: Caller) -> VfsResult<Attr> {
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
        self.attr_of(&st.catalog, &node)
    }

    /// A fifo, socket or device node: a name with attributes, no content.
    pub fn mknod(&self, parent: Ino, name: &str, kind: Kind, mode: u32, rdev: u32, caller: Caller) -> VfsResult<Attr> {
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
        self.attr_of(&st.catalog, &node)
    }

    pub fn symlink(&self, parent: Ino, name: &str, target: &str, caller: Caller) -> VfsResult<Attr> {
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
        self.attr_of(&st.catalog, &node)
    }

    pub fn readlink(&self, ino: Ino) -> VfsResult<String> {
        let st = self.lock();
        let node = Self::node(&st.catalog, ino)?;
        node.target.ok_or(VfsError::Invalid)
    }

    /// Creates and opens a regular file for writing. Its empty content
    /// counts as written, so even an empty new file becomes a version.
    pub fn create(&self, parent: Ino, name: &str, mode: u32, caller: Caller) -> VfsResult<(Attr, u64)> {
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
        Self::continue_history(&mut st, parent, name, node.ino)?;
        let attr = self.attr_of(&st.catalog, &node)?;
        // The new file's copy lock is nobody else's yet; holding it while
        // the working copy's directory is made outside `state` keeps any
        // other opener's writes waiting for it.
        let copy = self.copy_lock(&mut st, node.ino);
        // (Busy only if the catalog reused the number of a file some call
        // still holds.)
        let Ok(mut guard) = copy.try_write() else {
            return Err(VfsError::Busy);
        };
        if let Some(file) = self.files().get_mut(&node.ino) {
            file.dirty = true;
            file.working = Some(Working { size: 0, base: None });
        }
        drop(st);
        let made = self.new_working_copy(node.ino, None);
        let mut st = self.lock();
        let made = made.map(|work| *guard = Some(work));
        if made.is_err() {
            if let Some(file) = self.files().get_mut(&node.ino) {
                (file.working, file.dirty) = (None, false);
            }
        }
        let fh = made.map(|()| self.add_handle(&mut st, node.ino, true));
        drop(guard);
        drop(copy);
        let freed = self.forget_if_idle(&mut st, node.ino)?;
        drop(st);
        freed.free();
        Ok((attr, fh?))
    }

    /// A file takes the name (`dir`, `name`): if a file was renamed away
    /// from it within [`SAVE_CHAIN_WINDOW`], this node continues its history.
    pub(super) fn continue_history(st: &mut State, dir: Ino, name: &str, ino: Ino) -> VfsResult<()> {
        let Some((previous, when)) = st.vacated.remove(&(dir, name.to_owned())) else {
            return Ok(());
        };
        if previous != ino && when.elapsed() < SAVE_CHAIN_WINDOW {
            let carried = st.catalog.adopt_history(previous, ino)?;
            tracing::debug!(ino, previous, carried, "history continues through a save by rename");
        }
        Ok(())
    }

    /// link(2): a further name for a node that is not a directory.
    pub fn link(&self, ino: Ino, parent: Ino, name: &str) -> VfsResult<Attr> {
        self.writable()?;
        check_name(name)?;
        let st = self.lock();
        let node = Self::node(&st.catalog, ino)?;
        if matches!(node.kind, Kind::Dir | Kind::Link) {
            return Err(VfsError::NotPermitted);
        }
        // Unlinked and still open: it has no name to add to (as on ext4).
        if !st.catalog.is_live(ino)? {
            return Err(VfsError::NotFound);
        }
        Self::dir(&st.catalog, parent)?;
        if st.catalog.name_row(parent, name)?.is_some() {
            return Err(VfsError::Exists);
        }
        st.catalog.link(ino, parent, name)?;
        st.catalog.commit()?;
        self.attr_of(&st.catalog, &Self::node(&st.catalog, ino)?)
    }

    pub fn unlink(&self, parent: Ino, name: &str) -> VfsResult<()> {
        self.writable()?;
        let mut st = self.lock();
        let row = st.catalog.name_row(parent, name)?.ok_or(VfsError::NotFound)?;
        if row.kind == Kind::Dir {
            return Err(VfsError::IsDir);
        }
        let ino = linked_node(&row).unwrap_or(row.ino);
        let open = self.files().get(&ino).is_some_and(OpenFile::in_use);
        let gone = st.catalog.unlink(&row, open)?;
        st.catalog.commit()?;
        if gone {
            let freed = self.forget_content(&mut st, ino, open);
            drop(st);
            freed.free();
        }
        Ok(())
    }

    /// A deleted file: forget its queued uploads (the catalog marked them
    /// dropped) and, unless it is still open, its cached versions, to free.
    pub(super) fn forget_content(&self, st: &mut State, ino: Ino, still_open: bool) -> ToFree {
        self.drop_queued(ino);
        if still_open {
            return ToFree::default();
        }
        ToFree::versions(&self.cache, &st.catalog, ino)
    }

    /// Forgets queued uploads of a deleted file, also those on their way:
    /// an upload whose entry is gone is not recorded when it ends (and
    /// fails sooner, once the version's chunks are freed).
    pub(super) fn drop_queued(&self, ino: Ino) {
        self.queue().retain(|(i, _), _| *i != ino);
    }

    pub fn rmdir(&self, parent: Ino, name: &str) -> VfsResult<()> {
        self.writable()?;
        let mut st = self.lock();
        let node = st.catalog.child(parent, name)?.ok_or(VfsError::NotFound)?;
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
    pub fn rename(&self, parent: Ino, name: &str, new_parent: Ino, new_name: &str, no_replace: bool) -> VfsResult<()> {
        self.writable()?;
        check_name(new_name)?;
        let mut st = self.lock();
        // The name rows move; the nodes they lead to decide the rules.
        let row = st.catalog.name_row(parent, name)?.ok_or(VfsError::NotFound)?;
        let node = st.catalog.child(parent, name)?.ok_or(VfsError::NotFound)?;
        Self::dir(&st.catalog, new_parent)?;
        let target = match st.catalog.name_row(new_parent, new_name)? {
            Some(t) => Some((st.catalog.child(new_parent, new_name)?.ok_or(VfsError::NotFound)?, t)),
            None => None,
        };
        if let Some((t, _)) = &target {
            // Two names of one node (or one name): nothing changes, as
            // rename(2) says.
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
        let replaced = target.map(|(t, t_row)| {
            let open = self.files().get(&t.ino).is_some_and(OpenFile::in_use);
            (t, t_row, open)
        });
        if node.kind == Kind::File {
            // Save by rename: the replaced file's history, or that of the
            // file that left this name lately, continues in this one (a
            // replaced file with further names keeps its own too).
            match &replaced {
                Some((t, ..)) if t.kind == Kind::File => {
                    st.catalog.adopt_history(t.ino, node.ino)?;
                }
                Some(_) => {}
                None => Self::continue_history(&mut st, new_parent, new_name, node.ino)?,
            }
            st.vacated.retain(|_, (_, when)| when.elapsed() < SAVE_CHAIN_WINDOW);
            st.vacated.insert((parent, name.to_owned()), (node.ino, Instant::now()));
        }
        let gone = st.catalog.rename(
            &row,
            new_parent,
            new_name,
            replaced.as_ref().map(|(_, t_row, open)| (t_row, *open)),
        )?;
        // A rename is how editors save: it is durable (against a crash of
        // the daemon) when it returns, with everything batched before it.
        st.catalog.commit()?;
        if let Some((t, _, open)) = replaced.filter(|_| gone) {
            let freed = self.forget_content(&mut st, t.ino, open);
            drop(st);
            freed.free();
        }
        Ok(())
    }

    /// Directory entries after `offset`, with the offset to resume after
    /// each. Offsets are derived from inode numbers, so they stay valid while
    /// entries are added or removed.
    pub fn readdir(&self, ino: Ino, offset: u64) -> VfsResult<Vec<(Ino, u64, Kind, String)>> {
        self.read_catalog(|catalog| Self::entries(catalog, ino, offset))
    }

    fn entries(catalog: &Catalog, ino: Ino, offset: u64) -> VfsResult<Vec<(u64, u64, Kind, String)>> {
        let dir = Self::dir(catalog, ino)?;
        let mut out = Vec::new();
        if offset < 1 {
            out.push((ino, 1, Kind::Dir, ".".to_string()));
        }
        if offset < 2 {
            out.push((dir.parent, 2, Kind::Dir, "..".to_string()));
        }
        // Offsets follow the name rows: two names of one node are two entries.
        for (row, name, node) in catalog.children(ino)? {
            let off = row + 2;
            if off > offset {
                out.push((node.ino, off, node.kind, name));
            }
        }
        Ok(out)
    }

    /// [`Vfs::readdir`] with each entry's attributes (READDIRPLUS: `ls -l`
    /// needs no lookup per entry).
    pub fn readdir_plus(&self, ino: Ino, offset: u64) -> VfsResult<Vec<(u64, String, Attr)>> {
        self.read_catalog(|catalog| {
            let dir = Self::dir(catalog, ino)?;
            let mut out = Vec::new();
            if offset < 1 {
                out.push((1, ".".to_string(), self.attr_of(catalog, &dir)?));
            }
            if offset < 2 {
                let parent = Self::node(catalog, dir.parent)?;
                out.push((2, "..".to_string(), self.attr_of(catalog, &parent)?));
            }
            // Offsets as in `readdir`; the children's attributes in one
            // query, the open files' read before it (see `attr_of`).
            let open: HashMap<Ino, Shown> = self.files().iter().map(|(&i, f)| (i, Shown::of(f))).collect();
            let after = offset.saturating_sub(2);
            for (row, name, node, facts) in catalog.children_with_facts(dir.ino, after)? {
                let attr = Self::attr_with(open.get(&node.ino).copied(), &node, &facts);
                out.push((row + 2, name, attr));
            }
            Ok(out)
        })
    }

    pub fn statfs(&self) -> VfsResult<StatFs> {
        let files = self.read_catalog(|catalog| Ok(catalog.count_nodes()?))?;
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
