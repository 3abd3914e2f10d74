//! The thin Windows layer: WinFsp callbacks decode their arguments, call
//! the [`Vfs`] core under the rules of the sibling modules, and encode the
//! results. Nothing here decides semantics; see `handles`, `names`,
//! `attributes`, `status` and `volume`.

use std::sync::{Arc, Mutex};

use winfsp_wrs::{
    CleanupFlags, CreateFileInfo, CreateOptions, DirInfo, FileAccessRights, FileAttributes, FileContextKind,
    FileContextMode, FileInfo, FileSystem, FileSystemInterface, PSecurityDescriptor, Params, SecurityDescriptor,
    U16CStr, U16CString, U16String, VolumeInfo, VolumeParams, WriteMode, NTSTATUS,
};

use super::attributes::{self, Stored};
use super::handles::{AfterCleanup, Need, OpenNodes};
use super::names::{self, Match};
use super::status::{code, ntstatus};
use super::time::{requested, to_filetime};
use super::volume::VolumeSpec;
use crate::catalog::{Kind, ROOT_INO};
use crate::vfs::{Attr, Caller, SetAttr, Vfs, VfsError};

type Status<T> = Result<T, NTSTATUS>;

fn st(e: VfsError) -> NTSTATUS {
    ntstatus(&e)
}

/// One open of a file or directory.
pub struct OpenHandle {
    ino: u64,
    is_dir: bool,
    write: bool,
    /// A core handle opened after this handle's Cleanup (paging I/O of a
    /// mapped file): released, and so sealed if written, at Close.
    late: Mutex<Option<u64>>,
    cleaned: std::sync::atomic::AtomicBool,
}

/// WinFsp's per-open file context. The volume-wide Flush passes no context
/// at all, so a null pointer is a valid, empty context here.
pub struct Ctx(Option<Arc<OpenHandle>>);

impl FileContextKind for Ctx {
    const MODE: FileContextMode = FileContextMode::Descriptor;

    unsafe fn write(self, out: *mut winfsp_wrs_sys::PVOID) {
        let raw = self.0.map_or(std::ptr::null(), Arc::into_raw);
        out.write(raw.cast_mut().cast());
    }

    unsafe fn access(raw: winfsp_wrs_sys::PVOID) -> Self {
        if raw.is_null() {
            return Ctx(None);
        }
        Arc::increment_strong_count(raw as *const OpenHandle);
        Ctx(Some(Arc::from_raw(raw as *const OpenHandle)))
    }

    unsafe fn access_for_close(raw: winfsp_wrs_sys::PVOID) -> Self {
        Ctx((!raw.is_null()).then(|| Arc::from_raw(raw as *const OpenHandle)))
    }
}

impl Ctx {
    fn get(&self) -> Status<&Arc<OpenHandle>> {
        self.0.as_ref().ok_or(code::INVALID_HANDLE)
    }
}

pub struct CairnWinFs {
    vfs: Arc<Vfs>,
    nodes: Mutex<OpenNodes>,
    security: SecurityDescriptor,
    label: String,
    /// The staging directory: every write lands there first.
    staging: std::path::PathBuf,
}

impl CairnWinFs {
    pub fn new(vfs: Arc<Vfs>, label: &str, staging: std::path::PathBuf) -> Result<Self, String> {
        let sddl = format!("O:{0}G:{0}D:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;FA;;;{0})", owner_sid());
        let security = SecurityDescriptor::from_wstr(&U16CString::from_str(&sddl).map_err(|e| e.to_string())?)?;
        Ok(CairnWinFs {
            vfs,
            nodes: Mutex::new(OpenNodes::default()),
            security,
            label: label.into(),
            staging,
        })
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, OpenNodes> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The core name a Windows component means in directory `parent`:
    /// exact spelling first, then the case-insensitive rule.
    fn child_name(&self, parent: u64, shown: &str) -> Status<Option<String>> {
        let exact = names::from_windows(shown).map_err(|_| code::OBJECT_NAME_INVALID)?;
        match self.vfs.lookup(parent, &exact) {
            Ok(_) => return Ok(Some(exact)),
            Err(VfsError::NotFound) => {}
            Err(e) => return Err(st(e)),
        }
        let entries = self.vfs.readdir(parent, 2).map_err(st)?;
        Ok(
            match names::pick(shown, entries.iter().map(|(_, _, _, n)| n.as_str())) {
                Match::Found(name) => Some(name.to_owned()),
                Match::Ambiguous | Match::Missing => None,
            },
        )
    }

    /// Resolves a WinFsp path to its node.
    fn resolve(&self, path: &U16CStr) -> Status<Attr> {
        self.resolve_text(&text(path)?)
    }

    fn resolve_text(&self, path: &str) -> Status<Attr> {
        let mut parts = names::components(path).peekable();
        let mut attr = self.vfs.getattr(ROOT_INO).map_err(st)?;
        while let Some(part) = parts.next() {
            let missing = if parts.peek().is_some() {
                code::OBJECT_PATH_NOT_FOUND
            } else {
                code::OBJECT_NAME_NOT_FOUND
            };
            if attr.kind != Kind::Dir {
                return Err(code::OBJECT_PATH_NOT_FOUND);
            }
            let name = self.child_name(attr.ino, part)?.ok_or(missing)?;
            attr = self.vfs.lookup(attr.ino, &name).map_err(st)?;
        }
        Ok(attr)
    }

    /// The parent directory of a path and its last component, as shown.
    fn split(&self, path: &U16CStr) -> Status<(Attr, String)> {
        let path = text(path)?;
        let (dir, last) = path.rsplit_once('\\').ok_or(code::OBJECT_NAME_INVALID)?;
        let parent = self.resolve_text(dir).map_err(|e| {
            if e == code::OBJECT_NAME_NOT_FOUND {
                code::OBJECT_PATH_NOT_FOUND
            } else {
                e
            }
        })?;
        if parent.kind != Kind::Dir {
            return Err(code::OBJECT_PATH_NOT_FOUND);
        }
        Ok((parent, last.to_owned()))
    }

    fn stored(&self, ino: u64) -> Stored {
        Stored::decode(self.vfs.getxattr(ino, attributes::XATTR, daemon_user()).ok().as_deref())
    }

    fn info(&self, attr: &Attr) -> FileInfo {
        let stored = self.stored(attr.ino);
        let mut info = FileInfo::default();
        info.set_file_attributes(FileAttributes(attributes::shown(attr.kind, attr.perm, stored)))
            .set_file_size(attr.size)
            .set_allocation_size(attr.size.div_ceil(4096) * 4096)
            .set_creation_time(attributes::creation(stored, attr.ctime))
            .set_last_access_time(to_filetime(attr.atime))
            .set_last_write_time(to_filetime(attr.mtime))
            .set_change_time(to_filetime(attr.ctime))
            .set_index_number(attr.ino);
        info
    }

    fn info_of(&self, ino: u64) -> Status<FileInfo> {
        Ok(self.info(&self.vfs.getattr(ino).map_err(st)?))
    }

    /// Opens a handle on a node: counts it and shares the node's core
    /// handle. `created` is the core handle `create` already holds.
    fn attach(&self, attr: &Attr, write: bool, created: Option<u64>) -> Status<Ctx> {
        let is_dir = attr.kind == Kind::Dir;
        if !is_dir {
            match (self.nodes().open(attr.ino, write), created) {
                (Need::Shared(_), None) => {}
                // The node already has a core handle: one is enough.
                (Need::Shared(_), Some(extra)) => {
                    let _ = self.vfs.release(extra);
                }
                (Need::Open { write }, created) => {
                    let fh = match created.map_or_else(|| self.vfs.open(attr.ino, write, false), Ok) {
                        Ok(fh) => fh,
                        Err(e) => {
                            if let Some(fh) = self.nodes().abandon(attr.ino) {
                                let _ = self.vfs.release(fh);
                            }
                            return Err(st(e));
                        }
                    };
                    if let Some(old) = self.nodes().attach(attr.ino, fh, write) {
                        let _ = self.vfs.release(old);
                    }
                }
            }
        }
        Ok(Ctx(Some(Arc::new(OpenHandle {
            ino: attr.ino,
            is_dir,
            write,
            late: Mutex::new(None),
            cleaned: false.into(),
        }))))
    }

    /// The core handle for I/O on `h`: the node's shared one, or after
    /// Cleanup a late one of its own.
    fn io_fh(&self, h: &OpenHandle, write: bool) -> Status<u64> {
        if !h.cleaned.load(std::sync::atomic::Ordering::SeqCst) {
            if let Some(fh) = self.nodes().fh(h.ino) {
                return Ok(fh);
            }
        }
        let mut late = h.late.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fh) = *late {
            return Ok(fh);
        }
        let fh = self.vfs.open(h.ino, write || h.write, false).map_err(st)?;
        *late = Some(fh);
        Ok(fh)
    }

    fn apply_attributes(&self, ino: u64, requested_attrs: u32) -> Status<()> {
        let attr = self.vfs.getattr(ino).map_err(st)?;
        let stored = self.stored(ino);
        let (perm, new) = attributes::apply(requested_attrs, attr.kind, attr.perm, stored);
        if let Some(perm) = perm {
            self.vfs
                .setattr(
                    ino,
                    SetAttr {
                        mode: Some(perm.into()),
                        ..Default::default()
                    },
                )
                .map_err(st)?;
        }
        if new != stored {
            self.vfs.setxattr(ino, attributes::XATTR, &new.encode()).map_err(st)?;
        }
        Ok(())
    }
}

impl FileSystemInterface for CairnWinFs {
    type FileContext = Ctx;

    const GET_VOLUME_INFO_DEFINED: bool = true;
    const GET_SECURITY_BY_NAME_DEFINED: bool = true;
    const CREATE_DEFINED: bool = true;
    const OPEN_DEFINED: bool = true;
    const OVERWRITE_DEFINED: bool = true;
    const CLEANUP_DEFINED: bool = true;
    const CLOSE_DEFINED: bool = true;
    const READ_DEFINED: bool = true;
    const WRITE_DEFINED: bool = true;
    const FLUSH_DEFINED: bool = true;
    const GET_FILE_INFO_DEFINED: bool = true;
    const SET_BASIC_INFO_DEFINED: bool = true;
    const SET_FILE_SIZE_DEFINED: bool = true;
    const CAN_DELETE_DEFINED: bool = true;
    const RENAME_DEFINED: bool = true;
    const GET_SECURITY_DEFINED: bool = true;
    const READ_DIRECTORY_DEFINED: bool = true;
    const GET_DIR_INFO_BY_NAME_DEFINED: bool = true;

    fn get_volume_info(&self) -> Status<VolumeInfo> {
        let fs = self.vfs.statfs().map_err(st)?;
        let staging_free = crate::sys::fs_space(&self.staging).map_or(0, |(_, free)| free);
        let (total, free) = super::volume::sizes(fs.total_bytes, fs.free_bytes, staging_free);
        VolumeInfo::new(total, free, &U16String::from_str(&self.label)).map_err(|_| code::INVALID_PARAMETER)
    }

    fn get_security_by_name(
        &self,
        file_name: &U16CStr,
        _find_reparse_point: impl Fn() -> Option<FileAttributes>,
    ) -> Status<(FileAttributes, PSecurityDescriptor, bool)> {
        let attr = self.resolve(file_name)?;
        let shown = attributes::shown(attr.kind, attr.perm, self.stored(attr.ino));
        Ok((FileAttributes(shown), self.security.as_ptr(), false))
    }

    fn create(
        &self,
        file_name: &U16CStr,
        info: CreateFileInfo,
        _security_descriptor: SecurityDescriptor,
    ) -> Status<(Ctx, FileInfo)> {
        let (parent, shown) = self.split(file_name)?;
        if self.child_name(parent.ino, &shown)?.is_some() {
            return Err(code::OBJECT_NAME_COLLISION);
        }
        let name = names::from_windows(&shown).map_err(|_| code::OBJECT_NAME_INVALID)?;
        let caller = daemon_user();
        let (attr, fh) = if info.create_options.is(CreateOptions::FILE_DIRECTORY_FILE) {
            (self.vfs.mkdir(parent.ino, &name, 0o755, caller).map_err(st)?, None)
        } else {
            let (attr, fh) = self.vfs.create(parent.ino, &name, 0o644, caller).map_err(st)?;
            (attr, Some(fh))
        };
        let stored = Stored {
            attributes: 0,
            creation: to_filetime(std::time::SystemTime::now()),
        };
        self.vfs
            .setxattr(attr.ino, attributes::XATTR, &stored.encode())
            .map_err(st)?;
        self.apply_attributes(attr.ino, info.file_attributes.0)?;
        let ctx = self.attach(&attr, fh.is_some(), fh)?;
        Ok((ctx, self.info_of(attr.ino)?))
    }

    fn open(&self, file_name: &U16CStr, _options: CreateOptions, access: FileAccessRights) -> Status<(Ctx, FileInfo)> {
        let attr = self.resolve(file_name)?;
        let write = attr.kind != Kind::Dir
            && (access.is(FileAccessRights::FILE_WRITE_DATA) || access.is(FileAccessRights::FILE_APPEND_DATA));
        let ctx = self.attach(&attr, write, None)?;
        Ok((ctx, self.info(&attr)))
    }

    fn overwrite(&self, ctx: Ctx, attrs: FileAttributes, replace: bool, _allocation: u64) -> Status<FileInfo> {
        let h = ctx.get()?;
        self.vfs
            .setattr(
                h.ino,
                SetAttr {
                    size: Some(0),
                    ..Default::default()
                },
            )
            .map_err(st)?;
        self.nodes().wrote(h.ino);
        let wanted = if replace {
            attrs.0
        } else {
            attrs.0 | self.stored(h.ino).attributes
        };
        self.apply_attributes(h.ino, wanted)?;
        self.info_of(h.ino)
    }

    fn cleanup(&self, ctx: Ctx, file_name: Option<&U16CStr>, flags: CleanupFlags) {
        let Ok(h) = ctx.get() else { return };
        h.cleaned.store(true, std::sync::atomic::Ordering::SeqCst);
        let delete = flags.is(CleanupFlags::DELETE);
        let after = if h.is_dir {
            if delete {
                AfterCleanup::Delete { fh: None }
            } else {
                AfterCleanup::Keep
            }
        } else {
            self.nodes().cleanup(h.ino, delete)
        };
        match after {
            AfterCleanup::Keep => {}
            AfterCleanup::Release { fh, written } => {
                if written && flags.is(CleanupFlags::SET_ARCHIVE_BIT) {
                    let mut stored = self.stored(h.ino);
                    stored.attributes |= attributes::ARCHIVE;
                    let _ = self.vfs.setxattr(h.ino, attributes::XATTR, &stored.encode());
                }
                // Releasing the last core handle seals what was written.
                if let Some(fh) = fh {
                    if let Err(e) = self.vfs.release(fh) {
                        tracing::error!(ino = h.ino, error = %e, "sealing on the last Cleanup");
                    }
                }
            }
            AfterCleanup::Delete { fh } => {
                if let Some(Ok((parent, shown))) = file_name.map(|n| self.split(n)) {
                    if let Ok(Some(name)) = self.child_name(parent.ino, &shown) {
                        let removed = if h.is_dir {
                            self.vfs.rmdir(parent.ino, &name)
                        } else {
                            self.vfs.unlink(parent.ino, &name)
                        };
                        if let Err(e) = removed {
                            tracing::warn!(error = %e, "delete on Cleanup");
                        }
                    }
                }
                // Unlinked first, so the core discards instead of sealing.
                if let Some(fh) = fh {
                    let _ = self.vfs.release(fh);
                }
            }
        }
    }

    fn close(&self, ctx: Ctx) {
        let Ok(h) = ctx.get() else { return };
        if let Some(fh) = h.late.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = self.vfs.release(fh);
        }
    }

    fn read(&self, ctx: Ctx, buffer: &mut [u8], offset: u64) -> Status<usize> {
        let h = ctx.get()?;
        let fh = self.io_fh(h, false)?;
        let n = self.vfs.read(fh, offset, buffer).map_err(st)?;
        if n == 0 && !buffer.is_empty() {
            return Err(code::END_OF_FILE);
        }
        Ok(n)
    }

    fn write(&self, ctx: Ctx, buffer: &[u8], mode: WriteMode) -> Status<(usize, FileInfo)> {
        let h = ctx.get()?;
        let fh = self.io_fh(h, true)?;
        let size = self.vfs.getattr(h.ino).map_err(st)?.size;
        let (offset, data) = match mode {
            WriteMode::Normal { offset } => (offset, buffer),
            WriteMode::WriteToEOF => (size, buffer),
            // Paging I/O never extends the file.
            WriteMode::ConstrainedIO { offset } => {
                if offset >= size {
                    return Ok((0, self.info_of(h.ino)?));
                }
                (offset, &buffer[..buffer.len().min((size - offset) as usize)])
            }
        };
        let n = Vfs::write(&self.vfs, fh, offset, data).map_err(st)?;
        self.nodes().wrote(h.ino);
        Ok((n, self.info_of(h.ino)?))
    }

    fn flush(&self, ctx: Ctx) -> Status<FileInfo> {
        // A volume flush (no context): every write already reached staging.
        let Ok(h) = ctx.get() else {
            return Ok(FileInfo::default());
        };
        if !h.is_dir {
            self.vfs.fsync(self.io_fh(h, false)?).map_err(st)?;
        }
        self.info_of(h.ino)
    }

    fn get_file_info(&self, ctx: Ctx) -> Status<FileInfo> {
        self.info_of(ctx.get()?.ino)
    }

    fn set_basic_info(
        &self,
        ctx: Ctx,
        attrs: FileAttributes,
        creation: u64,
        access: u64,
        write: u64,
        _change: u64,
    ) -> Status<FileInfo> {
        let h = ctx.get()?;
        self.apply_attributes(h.ino, attrs.0)?;
        if requested(access).is_some() || requested(write).is_some() {
            self.vfs
                .setattr(
                    h.ino,
                    SetAttr {
                        atime: requested(access),
                        mtime: requested(write),
                        ..Default::default()
                    },
                )
                .map_err(st)?;
        }
        if creation != 0 {
            let stored = Stored {
                creation,
                ..self.stored(h.ino)
            };
            self.vfs
                .setxattr(h.ino, attributes::XATTR, &stored.encode())
                .map_err(st)?;
        }
        self.info_of(h.ino)
    }

    fn set_file_size(&self, ctx: Ctx, new_size: u64, set_allocation_size: bool) -> Status<FileInfo> {
        let h = ctx.get()?;
        let size = self.vfs.getattr(h.ino).map_err(st)?.size;
        // Allocation is derived from the size; only a smaller allocation
        // than the size cuts the file.
        if !set_allocation_size || new_size < size {
            self.vfs
                .setattr(
                    h.ino,
                    SetAttr {
                        size: Some(new_size),
                        ..Default::default()
                    },
                )
                .map_err(st)?;
            self.nodes().wrote(h.ino);
        }
        self.info_of(h.ino)
    }

    fn can_delete(&self, ctx: Ctx, _file_name: &U16CStr) -> Status<()> {
        let h = ctx.get()?;
        if h.is_dir && self.vfs.readdir(h.ino, 2).map_err(st)?.iter().any(|_| true) {
            return Err(code::DIRECTORY_NOT_EMPTY);
        }
        if self.is_readonly(h.ino) && !h.is_dir {
            return Err(code::CANNOT_DELETE);
        }
        Ok(())
    }

    fn rename(&self, ctx: Ctx, file_name: &U16CStr, new_file_name: &U16CStr, replace_if_exists: bool) -> Status<()> {
        let h = ctx.get()?;
        let (from_dir, from_shown) = self.split(file_name)?;
        let from = self
            .child_name(from_dir.ino, &from_shown)?
            .ok_or(code::OBJECT_NAME_NOT_FOUND)?;
        let (to_dir, to_shown) = self.split(new_file_name)?;
        let to = names::from_windows(&to_shown).map_err(|_| code::OBJECT_NAME_INVALID)?;
        if let Some(existing) = self.child_name(to_dir.ino, &to_shown)? {
            let target = self.vfs.lookup(to_dir.ino, &existing).map_err(st)?;
            if target.ino != h.ino {
                // Replace files when asked, never directories.
                if !replace_if_exists {
                    return Err(code::OBJECT_NAME_COLLISION);
                }
                if target.kind == Kind::Dir {
                    return Err(code::ACCESS_DENIED);
                }
                self.vfs
                    .rename(from_dir.ino, &from, to_dir.ino, &existing, false)
                    .map_err(st)?;
                if existing == to {
                    return Ok(());
                }
                // The replaced name had another case: take the new spelling.
                return self
                    .vfs
                    .rename(to_dir.ino, &existing, to_dir.ino, &to, true)
                    .map_err(st);
            }
        }
        // A new name, or a case-only rename of the same node.
        self.vfs.rename(from_dir.ino, &from, to_dir.ino, &to, true).map_err(st)
    }

    fn get_security(&self, _ctx: Ctx) -> Status<PSecurityDescriptor> {
        Ok(self.security.as_ptr())
    }

    fn read_directory(&self, ctx: Ctx, marker: Option<&U16CStr>, mut add: impl FnMut(DirInfo) -> bool) -> Status<()> {
        let h = ctx.get()?;
        let mut entries: Vec<(String, u64)> = Vec::new();
        for (ino, _, _, name) in self.vfs.readdir(h.ino, 0).map_err(st)? {
            let root = h.ino == ROOT_INO;
            match name.as_str() {
                "." | ".." if root => continue,
                "." | ".." => entries.push((name, ino)),
                _ if names::fits(&name) => entries.push((names::to_windows(&name), ino)),
                _ => tracing::warn!(name, "name too long for Windows once escaped; not listed"),
            }
        }
        entries.sort();
        let after = marker.map(|m| m.to_string_lossy());
        for (shown, ino) in entries {
            if after.as_ref().is_some_and(|m| shown.as_str() <= m.as_str()) {
                continue;
            }
            let Ok(info) = self.info_of(ino) else { continue };
            if !add(DirInfo::from_str(info, &shown)) {
                break;
            }
        }
        Ok(())
    }

    fn get_dir_info_by_name(&self, ctx: Ctx, file_name: &U16CStr) -> Status<FileInfo> {
        let h = ctx.get()?;
        let shown = text(file_name)?;
        let name = self.child_name(h.ino, &shown)?.ok_or(code::OBJECT_NAME_NOT_FOUND)?;
        Ok(self.info(&self.vfs.lookup(h.ino, &name).map_err(st)?))
    }
}

impl CairnWinFs {
    fn is_readonly(&self, ino: u64) -> bool {
        self.vfs
            .getattr(ino)
            .is_ok_and(|a| a.kind != Kind::Dir && a.perm & 0o222 == 0)
    }
}

/// A WinFsp path or name as text.
fn text(path: &U16CStr) -> Status<String> {
    path.to_string().map_err(|_| code::OBJECT_NAME_INVALID)
}

/// The mounting user's SID as SDDL, so the drive's files belong to them;
/// "BA" (Administrators) if it cannot be read.
fn owner_sid() -> String {
    use windows_sys::Win32::Foundation::{CloseHandle, LocalFree, HANDLE};
    use windows_sys::Win32::Security::Authorization::ConvertSidToStringSidW;
    use windows_sys::Win32::Security::{GetTokenInformation, TokenUser, TOKEN_QUERY, TOKEN_USER};
    use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};
    // SAFETY: a token we open and close, a buffer sized by the first call,
    // and a string Windows allocates and we free.
    unsafe {
        let mut token: HANDLE = 0;
        if OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut token) == 0 {
            return "BA".into();
        }
        let mut len = 0u32;
        GetTokenInformation(token, TokenUser, std::ptr::null_mut(), 0, &mut len);
        let mut buf = vec![0u8; len as usize];
        let ok = GetTokenInformation(token, TokenUser, buf.as_mut_ptr().cast(), len, &mut len) != 0;
        CloseHandle(token);
        if !ok {
            return "BA".into();
        }
        let user = &*(buf.as_ptr() as *const TOKEN_USER);
        let mut wide: *mut u16 = std::ptr::null_mut();
        if ConvertSidToStringSidW(user.User.Sid, &mut wide) == 0 {
            return "BA".into();
        }
        let sid = U16CStr::from_ptr_str(wide).to_string_lossy();
        LocalFree(wide as _);
        sid
    }
}

/// Applies a [`VolumeSpec`] to WinFsp's parameters.
pub fn volume_params(spec: &VolumeSpec) -> Result<Params, String> {
    let mut v = VolumeParams::default();
    v.set_sector_size(spec.sector_size)
        .set_sectors_per_allocation_unit(spec.sectors_per_allocation_unit)
        .set_max_component_length(spec.max_component_length)
        .set_volume_serial_number(spec.volume_serial_number)
        .set_volume_creation_time(winfsp_wrs::filetime_now())
        .set_file_info_timeout(spec.file_info_timeout_ms)
        .set_irp_timeout(spec.irp_timeout_ms)
        .set_case_sensitive_search(spec.case_sensitive_search)
        .set_case_preserved_names(spec.case_preserved_names)
        .set_unicode_on_disk(spec.unicode_on_disk)
        .set_persistent_acls(spec.persistent_acls)
        .set_post_cleanup_when_modified_only(spec.post_cleanup_when_modified_only)
        .set_flush_and_purge_on_cleanup(spec.flush_and_purge_on_cleanup)
        .set_named_streams(spec.named_streams)
        .set_extended_attributes(spec.extended_attributes)
        .set_reparse_point(spec.reparse_points)
        .set_hard_links(spec.hard_links);
    let name = U16CString::from_str(&spec.file_system_name).map_err(|e| e.to_string())?;
    v.set_file_system_name(&name).map_err(|_| "file system name too long")?;
    if !spec.prefix.is_empty() {
        let prefix = U16CString::from_str(&spec.prefix).map_err(|e| e.to_string())?;
        v.set_prefix(&prefix).map_err(|_| "volume prefix too long")?;
    }
    Ok(Params {
        volume_params: v,
        ..Default::default()
    })
}

/// Loads WinFsp's DLL (delay-loaded: the .exe starts without it) or says
/// how to install it.
pub fn load_winfsp() -> Result<(), String> {
    winfsp_wrs::init().map_err(|e| {
        format!(
            "WinFsp is not installed or could not be loaded ({e}). cairn mounts drives through WinFsp: \
             install it with `winget install WinFsp.WinFsp` or from https://winfsp.dev/rel/, then run `cairn mount` again"
        )
    })
}

/// Starts the file system at `mountpoint` (`X:` or a directory that does
/// not exist yet).
pub fn start(fs: CairnWinFs, params: Params, mountpoint: &str) -> Result<FileSystem, String> {
    let mp = U16CString::from_str(mountpoint).map_err(|e| e.to_string())?;
    FileSystem::start(params, Some(&mp), fs)
        .map_err(|s| format!("WinFsp could not mount {mountpoint}: NTSTATUS {s:#010x}"))
}

/// Windows has no numeric owner: files belong to the daemon's user.
fn daemon_user() -> Caller {
    let (uid, gid) = crate::sys::current_owner();
    Caller { uid, gid }
}
