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
    let session = mount_session(vfs, mountpoint, options.allow_other, options.read_only)?;
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
    reap_unmount_helper();
    Ok(())
}

/// fuser's auto-unmount helper (a `fusermount3` child) outlives the
/// session by a moment and then unmounts the mount point *path*. Waiting for
/// it before exiting keeps it from unmounting a new mount made right after
/// this daemon stops (seen when remounting at once).
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

fn is_mounted(path: &Path) -> bool {
    let target = path.to_string_lossy();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(&*target))
}

/// A daemon killed together with its auto-unmount helper leaves a dead FUSE
/// mount: every access fails with ENOTCONN. Detach it (lazily) and say so.
fn recover_stale_mount(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            let ok = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
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
        _ => Ok(()),
    }
}

/// Unmounts our own mount point as `fusermount3 -u` would; if files are
/// still open in it, detaches it lazily so the daemon stops once they close.
/// (Closing fuser's auto-unmount socket does not unmount while this process
/// still holds /dev/fuse.)
fn unmount(mountpoint: &Path) {
    let run = |lazy: bool| {
        let mut cmd = std::process::Command::new("fusermount3");
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        cmd.arg(mountpoint)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !run(false) && !run(true) {
        eprintln!("cairn: could not unmount {}; run fusermount3 -u", mountpoint.display());
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
    // Auto-unmount (the mount goes away if the daemon dies) needs
    // allow_other or allow_root at the FUSE level.
    config.mount_options.push(MountOption::AutoUnmount);
    config.acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::RootAndOwner
    };
    let session = match fuser::Session::new(CairnFs::new(vfs.clone()), mountpoint, &config) {
        Ok(s) => s,
        Err(e) if !allow_other => {
            tracing::warn!(error = %e, "auto-unmount unavailable (allow user_allow_other in /etc/fuse.conf); mounting without it");
            config.mount_options.retain(|o| *o != MountOption::AutoUnmount);
            config.acl = SessionACL::Owner;
            fuser::Session::new(CairnFs::new(vfs.clone()), mountpoint, &config)?
        }
        Err(e) => return Err(e).context(format!("mounting at {}", mountpoint.display())),
    };
    let notifier = session.notifier();
    vfs.on_content_changed(move |ino| {
        if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), 0, 0) {
            tracing::debug!(ino, error = %e, "invalidating the kernel's cache of a file");
        }
    });
    Ok(session)
}
