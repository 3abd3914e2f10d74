//! Extended attributes: the `user.cairn.*` facts of a file, and the
//! user's own attributes.

use super::*;

pub(super) struct FileInfo {
    state: &'static str,
    version: Option<i64>,
    cap: Option<String>,
    sha256: Option<String>,
}

impl Vfs {
    /// A file's read capability reads that file wherever its shares are:
    /// only its owner (and root) is given it, whoever else may read the
    /// file through the mount.
    pub(super) fn may_see_cap(node: &Node, caller: Caller) -> bool {
        caller.uid == 0 || caller.uid == node.uid
    }

    pub fn getxattr(&self, ino: Ino, name: &str, caller: Caller) -> VfsResult<Vec<u8>> {
        // Only user.* is stored (setxattr refuses the rest). Saying so,
        // rather than "no such attribute", lets `ls -l` stop asking for
        // security.selinux and ACLs of every file: it remembers an
        // unsupported answer per file system. Answered without taking a
        // catalog connection: the kernel asks for security.capability
        // before every write.
        if !name.starts_with("user.") {
            return Err(VfsError::NotSupported);
        }
        self.read_catalog(|catalog| self.getxattr_in(catalog, ino, name, caller))
    }

    fn getxattr_in(&self, catalog: &Catalog, ino: Ino, name: &str, caller: Caller) -> VfsResult<Vec<u8>> {
        let node = Self::node(catalog, ino)?;
        if let Some(key) = name.strip_prefix(XATTR_PREFIX) {
            let info = self.file_info(catalog, &node)?;
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
        catalog.xattr(node.ino, name)?.ok_or(VfsError::NoAttr)
    }

    pub fn listxattr(&self, ino: Ino, caller: Caller) -> VfsResult<Vec<String>> {
        self.read_catalog(|catalog| self.listxattr_in(catalog, ino, caller))
    }

    fn listxattr_in(&self, catalog: &Catalog, ino: Ino, caller: Caller) -> VfsResult<Vec<String>> {
        let node = Self::node(catalog, ino)?;
        let mut names = catalog.xattr_names(node.ino)?;
        if node.kind == Kind::File {
            let info = self.file_info(catalog, &node)?;
            names.push(format!("{XATTR_PREFIX}state"));
            if info.version.is_some() {
                names.push(format!("{XATTR_PREFIX}version"));
            }
            if info.cap.is_some() && Self::may_see_cap(&node, caller) {
                names.push(format!("{XATTR_PREFIX}cap"));
            }
            if info.sha256.is_some() {
                names.push(format!("{XATTR_PREFIX}sha256"));
            }
        }
        Ok(names)
    }

    pub fn setxattr(&self, ino: Ino, name: &str, value: &[u8]) -> VfsResult<()> {
        self.writable()?;
        if name.starts_with(XATTR_PREFIX) {
            return Err(VfsError::NotPermitted);
        }
        if !name.starts_with("user.") {
            return Err(VfsError::NotSupported);
        }
        let st = self.lock();
        Self::node(&st.catalog, ino)?;
        st.catalog.set_xattr(ino, name, value)?;
        st.catalog.commit()?;
        Ok(())
    }

    pub fn removexattr(&self, ino: Ino, name: &str) -> VfsResult<()> {
        self.writable()?;
        if name.starts_with(XATTR_PREFIX) {
            return Err(VfsError::NotPermitted);
        }
        let st = self.lock();
        if st.catalog.remove_xattr(ino, name)? {
            st.catalog.commit()?;
            Ok(())
        } else {
            Err(VfsError::NoAttr)
        }
    }

    /// What `user.cairn.*` says of a file. The open file is read before
    /// the catalog, as in `attr_of`.
    pub(super) fn file_info(&self, catalog: &Catalog, node: &Node) -> VfsResult<FileInfo> {
        let open_dirty = self
            .files()
            .get(&node.ino)
            .is_some_and(|f| f.working.is_some() && f.dirty);
        let latest = catalog.latest(node.ino)?;
        let committed = catalog.latest_committed(node.ino)?;
        let uploading = super::uploads::queued(&self.queue(), node.ino).any(|(_, p)| p.uploading);
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
            // A version made without every byte at hand has none.
            sha256: committed.map(|v| v.sha256).filter(|sha| !sha.is_empty()),
        })
    }
}
