//! The FUSE side of `cairn mount`: mount point checks, the fuser session,
//! signals and unmounting.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use cairn::fuse::CairnFs;
use cairn::vfs::Vfs;

use super::SessionOptions;

/// Checks the mount point (detaching a stale mount a crashed daemon left)
/// and returns its canonical path.
pub fn prepare(dir: &Path) -> Result<PathBuf> {
    recover_stale_mount(dir)?;
    let mountpoint = std::fs::canonicalize(dir).with_context(|| format!("mount point {}", dir.display()))?;
    if is_mounted(&mountpoint) {
        bail!(
            "{} is already a mount point (is cairn already mounted there?)",
            mountpoint.display()
        );
    }
    if !mountpoint.is_dir() {
        bail!("mount point {} is not a directory", mountpoint.display());
    }
    Ok(mountpoint)
}

/// Serves the mount until it is unmounted or the process gets SIGINT/SIGTERM.
pub fn serve(
    runtime: &tokio::runtime::Runtime,
    vfs: Arc<Vfs>,
    mountpoint: &Path,
    options: &SessionOptions,
) -> Result<()> {
    if options.network {
        bail!("--network is for Windows (WinFsp) drives");
    }
    let session = mount_session(vfs.clone(), mountpoint, options.allow_other, options.read_only)?;
    // The kernel lowers the read-ahead to what the INIT reply says, so it
    // is raised once the mount answers (a stat waits for INIT's reply).
    std::thread::spawn({
        let mountpoint = mountpoint.to_owned();
        move || {
            if std::fs::metadata(&mountpoint).is_ok() {
                raise_read_ahead(&vfs, &mountpoint);
            }
        }
    });
    // Held until the session ends, or this process, however it ends.
    let watcher = if options.allow_other {
        None
    } else {
        watch_for_death(mountpoint)
    };
    eprintln!(
        "cairn: mounted at {} (Ctrl-C or fusermount3 -u to stop)",
        mountpoint.display()
    );
    runtime.spawn({
        let mountpoint = mountpoint.to_owned();
        async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("signal received; unmounting");
            unmount(&mountpoint);
        }
    });
    session.run().context("FUSE session")?;
    drop(watcher);
    reap_unmount_helper();
    Ok(())
}

/// fuser's auto-unmount helper (a `fusermount3` child) outlives the
/// session by a moment and then unmounts the mount point *path*. Waiting for
/// it (and for our own watcher) before exiting keeps it from unmounting a
/// new mount made right after this daemon stops (seen when remounting at
/// once).
fn reap_unmount_helper() {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: waitpid on our own children, non-blocking.
        match unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } {
            -1 => return, // no children left
            0 => std::thread::sleep(Duration::from_millis(10)),
            _ => {}
        }
    }
}

/// Starts `cairn watch-mount`, which unmounts our mount if this process
/// dies without doing so (kill -9): it waits for the end of the pipe this
/// process holds, then lazily unmounts the mount point if the mount there is
/// still ours (same device), never one mounted there since.
fn watch_for_death(mountpoint: &Path) -> Option<std::process::ChildStdin> {
    use std::os::unix::process::CommandExt;
    let Some(dev) = mount_device(mountpoint) else {
        tracing::warn!(mountpoint = %mountpoint.display(), "not in the mount table: no unmount watcher");
        return None;
    };
    let spawned = std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .arg("watch-mount")
            .arg("--dev")
            .arg(&dev)
            .arg(mountpoint)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            // Its own process group: a Ctrl-C to the daemon's terminal
            // leaves it to see the daemon end.
            .process_group(0)
            .spawn()
    });
    match spawned {
        Ok(mut child) => child.stdin.take(),
        Err(e) => {
            tracing::warn!(error = %e, "no unmount watcher: a crash of this daemon leaves a stale mount, cleared by the next `cairn mount` there");
            None
        }
    }
}

/// The device (`major:minor`, as /proc/self/mountinfo has it) of the mount
/// at `path`: read from the mount table, since a stat of our own mount
/// before the session runs would wait for ourselves.
fn mount_device(path: &Path) -> Option<String> {
    let target = in_mount_table(path);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last entry for a path is the one on top.
    mounts.lines().rev().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        (fields.get(4) == Some(&&*target)).then(|| fields.get(2).map(|d| d.to_string()))?
    })
}

/// `cairn watch-mount`: waits until stdin ends (the daemon that started it
/// ended), then unmounts `mountpoint` if the mount on top there is still
/// device `dev` and dead (ENOTCONN): a new mount made there meanwhile may
/// have been given the same device number, but it answers.
pub fn watch_mount(dev: &str, mountpoint: &Path) -> Result<()> {
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
    if is_dead_fuse_mount(mountpoint) && mount_device(mountpoint).as_deref() == Some(dev) {
        tracing::info!(mountpoint = %mountpoint.display(), "the daemon ended without unmounting; unmounting");
        fusermount_u(mountpoint, true);
    }
    Ok(())
}

/// Whether the FUSE mount at `path` has lost its daemon: a stat forced past
/// the kernel's attribute cache (which would answer for a dead daemon too)
/// fails with ENOTCONN once the connection is gone, or with ECONNABORTED
/// if it was waiting while the dying daemon's connection was torn down.
fn is_dead_fuse_mount(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path and a zeroed statx buffer we own.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_BASIC_STATS,
            &mut buf,
        )
    };
    r != 0
        && matches!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED)
        )
}

fn is_mounted(path: &Path) -> bool {
    let target = in_mount_table(path);
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(&*target))
}

/// A path as the kernel's mount tables spell it (octal escapes for space,
/// tab, newline and backslash).
fn in_mount_table(path: &Path) -> String {
    let mut out = String::new();
    for c in path.to_string_lossy().chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[test]
fn paths_are_spelt_as_in_the_mount_table() {
    assert_eq!(in_mount_table(Path::new("/mnt/a b\\c")), "/mnt/a\\040b\\134c");
}

/// A daemon killed together with its unmount watcher leaves a dead FUSE
/// mount: every access fails with ENOTCONN. Detach it (lazily) and say so.
fn recover_stale_mount(dir: &Path) -> Result<()> {
    if !is_dead_fuse_mount(dir) {
        return Ok(());
    }
    if !fusermount_u(dir, true) {
        bail!(
            "{} is a stale FUSE mount left by a crashed daemon, and `fusermount3 -u -z` failed; unmount it by hand",
            dir.display()
        );
    }
    eprintln!(
        "cairn: {} was a stale mount left by a crashed daemon; unmounted it (lazy unmount)",
        dir.display()
    );
    Ok(())
}

/// Unmounts our own mount point as `fusermount3 -u` would; if files are
/// still open in it, detaches it lazily so the daemon stops once they close.
/// (Closing fuser's auto-unmount socket does not unmount while this process
/// still holds /dev/fuse.)
fn unmount(mountpoint: &Path) {
    if !fusermount_u(mountpoint, false) && !fusermount_u(mountpoint, true) {
        eprintln!("cairn: could not unmount {}; run fusermount3 -u", mountpoint.display());
    }
}

/// `fusermount3 -u` (`-z`: lazily, detaching a busy or dead mount); whether
/// it worked.
fn fusermount_u(mountpoint: &Path, lazy: bool) -> bool {
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    cmd.arg(mountpoint)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The read-ahead cairn asks of the kernel: one staging chunk, one FUSE
/// request at the most (256 pages). The kernel's default for a FUSE mount,
/// 128 KiB, makes a sequential read of staged data eight round trips per
/// chunk (1 GiB: 2.3 s at 128 KiB, 1.3 s at 1 MiB, docs/BENCHMARKS.md).
const READ_AHEAD_KIB: u32 = 1024;

/// Raises the mount's read-ahead through its backing device's sysfs entry,
/// which only root may write: anyone else keeps the kernel's default, and
/// `cairn status` says so.
fn raise_read_ahead(vfs: &Vfs, mountpoint: &Path) {
    let Some(dev) = mount_device(mountpoint) else {
        return;
    };
    let knob = PathBuf::from(format!("/sys/class/bdi/{dev}/read_ahead_kb"));
    match std::fs::write(&knob, READ_AHEAD_KIB.to_string()) {
        Ok(()) => vfs.set_io_path(|io| {
            io.read_ahead_kib = READ_AHEAD_KIB;
            io.read_ahead_note = None;
        }),
        Err(e) => {
            tracing::info!(knob = %knob.display(), error = %e, "kernel's read-ahead kept");
            vfs.set_io_path(|io| {
                io.read_ahead_note = Some(format!(
                    "the kernel's default: raising it to {READ_AHEAD_KIB} KiB needs root ({e})"
                ))
            });
        }
    }
}

fn mount_session(
    vfs: Arc<Vfs>,
    mountpoint: &Path,
    allow_other: bool,
    read_only: bool,
) -> Result<fuser::Session<CairnFs>> {
    use fuser::{MountOption, SessionACL};
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName("cairn".into()),
        MountOption::Subtype("cairn".into()),
        MountOption::DefaultPermissions,
        if read_only { MountOption::RO } else { MountOption::RW },
    ];
    config.n_threads = Some(4);
    // Without --allow-other the kernel itself keeps every other user (root
    // too) out: fuser's auto-unmount would need allow_other at the kernel,
    // with other users filtered in the daemon, and the kernel then answers
    // their stat calls from its attribute cache without asking. The mount
    // is unmounted after a crash by our own watcher instead.
    if allow_other {
        config.mount_options.push(MountOption::AutoUnmount);
        config.acl = SessionACL::All;
    } else {
        config.acl = SessionACL::Owner;
    }
    let session = fuser::Session::new(CairnFs::new(vfs.clone()), mountpoint, &config)
        .with_context(|| format!("mounting at {}", mountpoint.display()))?;
    let notifier = session.notifier();
    vfs.on_invalidate(move |inval| {
        use cairn::sync::apply::Inval;
        let result = match inval {
            Inval::Node(ino) => notifier.inval_inode(fuser::INodeNo(*ino), 0, 0),
            Inval::Entry { parent, name } => notifier.inval_entry(fuser::INodeNo(*parent), std::ffi::OsStr::new(name)),
        };
        if let Err(e) = result {
            tracing::debug!(?inval, error = %e, "invalidating the kernel's cache");
        }
    });
    Ok(session)
}
