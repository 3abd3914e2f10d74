//! The few operating-system calls the core needs that std does not offer
//! the same way on every platform. Each has a Unix and a Windows version;
//! everything else in the core is portable std and tokio.

use std::fs::File;
use std::io;
use std::path::Path;
use std::time::SystemTime;

/// Positional reads and writes that leave no shared file cursor behind.
pub trait PositionalIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;

    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }

    fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_at(buf, offset)? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

impl PositionalIo for File {
    #[cfg(unix)]
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
    #[cfg(unix)]
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::write_at(self, buf, offset)
    }
    // Windows moves the handle's cursor on a positional call; the core never
    // relies on the cursor, so that is harmless.
    #[cfg(windows)]
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::windows::fs::FileExt::seek_read(self, buf, offset)
    }
    #[cfg(windows)]
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        std::os::windows::fs::FileExt::seek_write(self, buf, offset)
    }
}

/// Gives a range of a file's disk space back (Linux hole punching). Where
/// the file system or platform cannot, the space returns when the file is
/// closed.
pub fn punch_hole(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate on a descriptor the caller owns.
        unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Whether bytes `start..end` of `file` are all stored: none past its end,
/// none in a hole (Linux `SEEK_HOLE`; a file system that cannot tell says
/// the whole file is stored, as do other platforms). A log that says bytes
/// were written where the file has a hole tells of a power loss that kept
/// the log but not the bytes.
pub fn stored(file: &File, start: u64, end: u64) -> io::Result<bool> {
    if end > file.metadata()?.len() {
        return Ok(false);
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on a descriptor the caller owns; reads use pread,
        // so the offset it moves is not used.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), start as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(hole as u64 >= end)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = start;
        Ok(true)
    }
}

/// (total, free to this user) bytes of the file system holding `path`.
#[cfg(unix)]
pub fn fs_space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statvfs fills the struct we own from a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((
        s.f_blocks as u64 * s.f_frsize as u64,
        s.f_bavail as u64 * s.f_frsize as u64,
    ))
}

#[cfg(windows)]
pub fn fs_space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::windows::ffi::OsStrExt;
    use windows_sys::Win32::Storage::FileSystem::GetDiskFreeSpaceExW;
    let wide: Vec<u16> = path.as_os_str().encode_wide().chain(Some(0)).collect();
    let (mut free_to_caller, mut total, mut _free) = (0u64, 0u64, 0u64);
    // SAFETY: a NUL-terminated path and three out-pointers we own.
    if unsafe { GetDiskFreeSpaceExW(wide.as_ptr(), &mut free_to_caller, &mut total, &mut _free) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((total, free_to_caller))
}

/// Whether a process with this id still runs (abandoned-upload markers).
#[cfg(unix)]
pub fn process_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks whether the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[cfg(windows)]
pub fn process_alive(pid: u32) -> bool {
    use windows_sys::Win32::Foundation::{CloseHandle, STILL_ACTIVE};
    use windows_sys::Win32::System::Threading::{GetExitCodeProcess, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION};
    // SAFETY: a handle we open, query and close.
    unsafe {
        let handle = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid);
        if handle == 0 {
            return false;
        }
        let mut code = 0u32;
        let alive = GetExitCodeProcess(handle, &mut code) != 0 && code == STILL_ACTIVE as u32;
        CloseHandle(handle);
        alive
    }
}

/// The clock file times are stamped with: the kernel's coarse clock on
/// Linux, so a file written and checked in the same tick compares equal.
pub fn coarse_now() -> (i64, i64) {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
        (ts.tv_sec, ts.tv_nsec)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let d = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        (d.as_secs() as i64, d.subsec_nanos() as i64)
    }
}

/// Shares `source`'s extents with `dest` copy-on-write where the file
/// system can (btrfs, XFS, bcachefs); false where it cannot.
pub fn reflink(source: &File, dest: &File) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: FICLONE takes two valid file descriptors we hold open.
        unsafe { libc::ioctl(dest.as_raw_fd(), libc::FICLONE as _, source.as_raw_fd()) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (source, dest);
        false
    }
}

/// Starts writing a file's dirty pages to disk without waiting for them
/// (Linux: `sync_file_range(SYNC_FILE_RANGE_WRITE)`). A writer that calls it
/// per finished chunk keeps the page cache's dirty pages few, so the kernel
/// does not throttle every other writer of the machine (the catalog's WAL
/// among them) behind it; elsewhere the system's lazy writer does this.
pub fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a file descriptor we hold open; no memory is passed.
        // Best effort: a failure only leaves the pages to the kernel.
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Asks the kernel to start reading a file into its page cache without
/// waiting (Linux: `posix_fadvise(WILLNEED)`): a chunk file's own read-ahead
/// starts only at its first read, so the next chunks of a sequential read
/// are asked for early and their disk reads overlap the copies of this one.
pub fn will_need(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a file descriptor we hold open; no memory is passed.
        // Best effort: a failure only leaves the read to its own time.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Gives the kernel back the free pages inside the heap. glibc returns only
/// the heap's top, so after a large passing working set (a render of the
/// whole tree) the daemon's RSS would stay at its peak.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases pages of free blocks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Makes a directory's entries durable. NTFS journals its metadata and
/// Windows cannot open a directory as a file, so there it is a no-op.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    return File::open(dir)?.sync_all();
    #[cfg(windows)]
    {
        let _ = dir;
        Ok(())
    }
}

/// Writes every dirty page of the file system holding `path` to disk (one
/// syncfs). Windows has no unprivileged equivalent: there staged data is as
/// durable as the system's own lazy writer makes it.
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    return sync_filesystem_of(&File::open(path)?);
    #[cfg(windows)]
    {
        let _ = path;
        Ok(())
    }
}

/// [`sync_filesystem`] of the file system an open file is on.
pub fn sync_filesystem_of(file: &File) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on a descriptor borrowed for the duration of the call.
        if unsafe { libc::syncfs(file.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(windows)]
    {
        let _ = file;
        Ok(())
    }
}

/// Owner recorded on new nodes: the daemon's user. Windows has no numeric
/// owner; its adapter shows a fixed security descriptor instead.
pub fn current_owner() -> (u32, u32) {
    #[cfg(unix)]
    // SAFETY: getuid/getgid cannot fail.
    return unsafe { (libc::getuid(), libc::getgid()) };
    #[cfg(windows)]
    (0, 0)
}

/// The error a write gets when the staging disk is full.
pub fn disk_full() -> io::Error {
    #[cfg(unix)]
    return io::Error::from_raw_os_error(libc::ENOSPC);
    #[cfg(windows)]
    io::Error::from_raw_os_error(windows_sys::Win32::Foundation::ERROR_DISK_FULL as i32)
}

/// Renames `from` to `to`. Windows refuses to rename a file, or a
/// directory with a file in it, while another process holds it open
/// without sharing (a virus scanner's look at a file just written): that
/// lets go soon, so a refusal is tried again for about a second.
pub fn rename_retrying(from: &Path, to: &Path) -> io::Result<()> {
    let tries = if cfg!(windows) { 40 } else { 1 };
    for _ in 1..tries {
        match std::fs::rename(from, to) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                std::thread::sleep(std::time::Duration::from_millis(25))
            }
            other => return other,
        }
    }
    std::fs::rename(from, to)
}

/// What the cache evictor needs to know of a chunk file.
pub struct FileFacts {
    /// (device, inode): the same data seen through several hard links.
    pub identity: (u64, u64),
    pub links: u64,
    pub disk_bytes: u64,
    pub modified: SystemTime,
}

#[cfg(unix)]
pub fn file_facts(_path: &Path, meta: &std::fs::Metadata) -> FileFacts {
    use std::os::unix::fs::MetadataExt;
    FileFacts {
        identity: (meta.dev(), meta.ino()),
        links: meta.nlink(),
        disk_bytes: meta.blocks() * 512,
        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

/// Stable std on Windows gives no file index or link count: each path
/// counts as its own file with one link, so the evictor may over-count what
/// it frees from shared chunks and evict a little less than it could.
#[cfg(windows)]
pub fn file_facts(path: &Path, meta: &std::fs::Metadata) -> FileFacts {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    FileFacts {
        identity: (0, h.finish()),
        links: 1,
        disk_bytes: meta.len(),
        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

/// The device a path lives on, to count servers sharing one disk.
#[cfg(unix)]
pub fn device_of(meta: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::dev(meta)
}

/// Windows: treated as one disk, the cautious answer for free space.
#[cfg(windows)]
pub fn device_of(_meta: &std::fs::Metadata) -> u64 {
    0
}

/// Creates a file only its owner can read (config.toml may hold S3 keys).
/// On Windows the file inherits the user profile's owner-only ACL.
pub fn create_private(path: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Makes a file's data durable. Opened for writing because Windows (and
/// wine) refuse to flush a read-only handle.
pub fn sync_file(path: &Path) -> io::Result<()> {
    std::fs::OpenOptions::new().write(true).open(path)?.sync_all()
}

/// This machine's name, as devices are named by default.
#[cfg(unix)]
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that and terminates the name when it fits.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match String::from_utf8_lossy(&buf[..len]).into_owned() {
        name if ok && !name.is_empty() => name,
        _ => "machine".into(),
    }
}

#[cfg(windows)]
pub fn host_name() -> String {
    std::env::var("COMPUTERNAME").unwrap_or_else(|_| "machine".into())
}
