//! The FUSE adapter: each fuser callback decodes its arguments, calls the
//! platform-neutral [`Vfs`] core, and encodes the result. Errors become
//! errno values in [`errno`], the one place that decides them.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenAccMode,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::catalog::Kind;
use crate::vfs::{Attr, Caller, SetAttr, Vfs, VfsError};

/// How long the kernel may cache attributes, names and the absence of
/// names. Every change goes through the kernel, and sealing at close keeps
/// the attributes the kernel saw; the one change behind its back,
/// `cairn restore`, invalidates the file explicitly (docs/SEMANTICS.md,
/// "Kernel caching").
const TTL: Duration = Duration::from_secs(60);
const BLOCK: u64 = 4096;
/// The I/O size reported as st_blksize. Tools size their buffers by it (cp
/// uses the larger of 128 KiB and st_blksize), and every FUSE write is a
/// round trip: 1 MiB, one staging chunk, is eight times fewer than 128 KiB.
const PREFERRED_IO: u32 = 1 << 20;

pub struct CairnFs {
    vfs: Arc<Vfs>,
    /// The kernel opens directories without asking (no OPENDIR and
    /// RELEASEDIR per directory listed): cairn keeps no state per open
    /// directory.
    zero_message_opendir: bool,
}

impl CairnFs {
    pub fn new(vfs: Arc<Vfs>) -> Self {
        CairnFs {
            vfs,
            zero_message_opendir: false,
        }
    }
}

/// The single mapping from core errors to errno.
pub fn errno(e: &VfsError) -> Errno {
    use crate::vfs::ErrorKind as K;
    let code = match e.kind() {
        K::NotFound => libc::ENOENT,
        K::Exists => libc::EEXIST,
        K::NotDir => libc::ENOTDIR,
        K::IsDir => libc::EISDIR,
        K::NotEmpty => libc::ENOTEMPTY,
        K::Invalid => libc::EINVAL,
        K::NameTooLong => libc::ENAMETOOLONG,
        K::ReadOnly => libc::EROFS,
        K::NotPermitted => libc::EPERM,
        K::AccessDenied => libc::EACCES,
        K::NoAttr => libc::ENODATA,
        K::NotSupported => libc::EOPNOTSUPP,
        K::Busy => libc::EBUSY,
        K::BadHandle => libc::EBADF,
        K::DiskFull => libc::ENOSPC,
        K::Os { code, .. } => code.unwrap_or(libc::EIO),
        K::Catalog | K::Grid => libc::EIO,
    };
    if code == libc::EIO {
        tracing::warn!(error = %e, "returning EIO");
    }
    Errno::from_i32(code)
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        // (Never shown: the core resolves a hard link to its node.)
        Kind::Link => FileType::RegularFile,
    }
}

fn fuse_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(BLOCK) * (BLOCK / 512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: PREFERRED_IO,
        flags: 0,
    }
}

fn name_str(name: &OsStr) -> Result<&str, Errno> {
    name.to_str().ok_or(Errno::from_i32(libc::EINVAL))
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

macro_rules! reply {
    ($reply:expr, $result:expr, |$ok:ident| $body:expr) => {
        match $result {
            Ok($ok) => $body,
            Err(e) => $reply.error(errno(&e)),
        }
    };
}

fn entry(reply: ReplyEntry, result: Result<Attr, VfsError>) {
    reply!(reply, result, |a| reply.entry(&TTL, &fuse_attr(&a), Generation(0)))
}

/// A name that does not exist, cached by the kernel as such (inode 0), so
/// `tar x` and `git status` do not ask again for names they create.
fn negative_entry(reply: ReplyEntry) {
    let none = Attr {
        ino: 0,
        kind: Kind::File,
        size: 0,
        perm: 0,
        uid: 0,
        gid: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        nlink: 0,
        rdev: 0,
    };
    reply.entry(&TTL, &fuse_attr(&none), Generation(0))
}

fn empty(reply: ReplyEmpty, result: Result<(), VfsError>) {
    reply!(reply, result, |_ok| reply.ok())
}

impl Filesystem for CairnFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        use fuser::InitFlags;
        // Each where the kernel offers it: READDIRPLUS when a listing is
        // followed by lookups (ls -l), and caching symlink targets (a
        // symlink never changes in place).
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            // The daemon drops set-ID bits on write, chown and truncate
            // (the kernel flags writes that must): the kernel then stops
            // asking for security.capability before every write.
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        ] {
            if let Err(missing) = config.add_capabilities(flag) {
                tracing::debug!(?missing, "kernel lacks a FUSE capability");
            }
        }
        self.zero_message_opendir = config.add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT).is_ok();
        // Every change to a file's bytes goes through this kernel, except a
        // restore and a change from another machine, which invalidate the
        // file explicitly: so the kernel keeps a file's pages until told,
        // and a read just after a write comes from memory. (AUTO_INVAL_DATA
        // dropped them at every getattr after a write moved the mtime.) An
        // older kernel without the flag drops them when the mtime moves.
        let page_cache = if config.add_capabilities(InitFlags::FUSE_EXPLICIT_INVAL_DATA).is_ok() {
            "kept until changed elsewhere"
        } else {
            let _ = config.add_capabilities(InitFlags::FUSE_AUTO_INVAL_DATA);
            "dropped when a file's mtime moves (the kernel lacks FUSE_EXPLICIT_INVAL_DATA)"
        };
        self.vfs.set_io_path(|io| {
            io.page_cache = page_cache.into();
            // Asking for more than the kernel offers answers with its offer.
            io.read_ahead_kib = config.set_max_readahead(u32::MAX).unwrap_or_else(|offer| offer) / 1024;
        });
        Ok(())
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.zero_message_opendir {
            // Tells a kernel that offered it to stop sending OPENDIR.
            reply.error(Errno::from_i32(libc::ENOSYS));
        } else {
            reply.opened(FileHandle(0), FopenFlags::empty());
        }
    }

    fn destroy(&mut self) {
        if let Err(e) = self.vfs.seal_all() {
            tracing::error!(error = %e, "sealing open files at unmount");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::from_i32(libc::ENOENT));
        };
        match self.vfs.lookup(parent.0, name) {
            Err(VfsError::NotFound) => negative_entry(reply),
            result => entry(reply, result),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply!(reply, self.vfs.getattr(ino.0), |a| reply.attr(&TTL, &fuse_attr(&a)))
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time),
            mtime: mtime.map(time),
            // The kernel's own test (CAP_FSETID) is not passed on; root
            // stands for it.
            resize_drops_setid: req.uid() != 0,
        };
        reply!(reply, self.vfs.setattr(ino.0, set), |a| reply
            .attr(&TTL, &fuse_attr(&a)))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        reply!(reply, self.vfs.readlink(ino.0), |t| reply.data(t.as_bytes()))
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::from_i32(libc::EINVAL));
        };
        entry(reply, self.vfs.mkdir(parent.0, name, mode & !umask, caller(req)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::from_i32(libc::ENOENT));
        };
        empty(reply, self.vfs.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::from_i32(libc::ENOENT));
        };
        empty(reply, self.vfs.rmdir(parent.0, name));
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::from_i32(libc::EINVAL));
        };
        let perm = mode & !umask;
        let kind = match mode & libc::S_IFMT {
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            // mknod of a regular file: an empty file, as creat() then close().
            libc::S_IFREG | 0 => {
                let made = self
                    .vfs
                    .create(parent.0, name, perm, caller(req))
                    .and_then(|(attr, fh)| {
                        self.vfs.release(fh)?;
                        Ok(attr)
                    });
                return entry(reply, made);
            }
            _ => return reply.error(Errno::from_i32(libc::EINVAL)),
        };
        entry(reply, self.vfs.mknod(parent.0, name, kind, perm, rdev, caller(req)));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (Ok(name), Some(target)) = (name_str(link_name), target.to_str()) else {
            return reply.error(Errno::from_i32(libc::EINVAL));
        };
        entry(reply, self.vfs.symlink(parent.0, name, target, caller(req)));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (Ok(name), Ok(newname)) = (name_str(name), name_str(newname)) else {
            return reply.error(Errno::from_i32(libc::EINVAL));
        };
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::from_i32(libc::EINVAL));
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        empty(reply, self.vfs.rename(parent.0, name, newparent.0, newname, no_replace));
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let Ok(name) = name_str(newname) else {
            return reply.error(Errno::from_i32(libc::EINVAL));
        };
        entry(reply, self.vfs.link(ino.0, newparent.0, name));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let truncate = flags.0 & libc::O_TRUNC != 0;
        // Truncating drops set-ID bits as a write does (root stands for
        // CAP_FSETID, which the kernel does not pass on).
        if truncate && req.uid() != 0 {
            if let Err(e) = self.vfs.drop_setid(ino.0) {
                return reply.error(errno(&e));
            }
        }
        reply!(reply, self.vfs.open(ino.0, write, truncate), |fh| reply
            .opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE))
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::from_i32(libc::EINVAL));
        };
        reply!(
            reply,
            self.vfs.create(parent.0, name, mode & !umask, caller(req)),
            |ok| {
                let (attr, fh) = ok;
                reply.created(
                    &TTL,
                    &fuse_attr(&attr),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE,
                )
            }
        )
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        thread_local! {
            // Each session thread's read buffer, as large as its largest
            // request (1 MiB): lent to the core, never freed or zeroed again.
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| {
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            let buf = &mut buf[..size as usize];
            reply!(reply, self.vfs.read(fh.0, offset, buf), |n| reply.data(&buf[..n]))
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            if let Err(e) = self.vfs.drop_setid(ino.0) {
                return reply.error(errno(&e));
            }
        }
        reply!(reply, self.vfs.write(fh.0, offset, data), |n| reply.written(n as u32))
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        empty(reply, self.vfs.flush(fh.0));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.vfs.release(fh.0));
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        empty(reply, self.vfs.fsync(fh.0));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.vfs.fallocate(ino.0, offset, length, mode));
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        reply!(reply, self.vfs.readdir(ino.0, offset), |entries| {
            for (child, off, kind, name) in entries {
                if reply.add(INodeNo(child), off, file_type(kind), name) {
                    break;
                }
            }
            reply.ok()
        })
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        reply!(reply, self.vfs.readdir_plus(ino.0, offset), |entries| {
            for (off, name, attr) in entries {
                if reply.add(INodeNo(attr.ino), off, name, &TTL, &fuse_attr(&attr), Generation(0)) {
                    break;
                }
            }
            reply.ok()
        })
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctls: isatty() and friends get the answer a regular file gives.
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply!(reply, self.vfs.statfs(), |s| reply.statfs(
            s.total_bytes / BLOCK,
            s.free_bytes / BLOCK,
            s.free_bytes / BLOCK,
            s.files + 1_000_000,
            1_000_000,
            BLOCK as u32,
            crate::vfs::NAME_MAX as u32,
            BLOCK as u32,
        ))
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::from_i32(libc::EINVAL));
        };
        empty(reply, self.vfs.setxattr(ino.0, name, value));
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::from_i32(libc::ENODATA));
        };
        reply!(reply, self.vfs.getxattr(ino.0, name, caller(req)), |value| xattr_reply(
            reply, size, &value
        ))
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply!(reply, self.vfs.listxattr(ino.0, caller(req)), |names| {
            let mut buf = Vec::new();
            for n in names {
                buf.extend_from_slice(OsStr::new(&n).as_bytes());
                buf.push(0);
            }
            xattr_reply(reply, size, &buf)
        })
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::from_i32(libc::ENODATA));
        };
        empty(reply, self.vfs.removexattr(ino.0, name));
    }
}

/// Size 0 asks how big the value is; too small a buffer is ERANGE.
fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(value);
    }
}
