//! A full local disk: writes get ENOSPC, the daemon keeps running, nothing
//! staged or committed is harmed, and work continues once space is freed.
//! The staging cache sits on a real 64 MiB tmpfs (root is needed to mount it).

// These tests drive the `cairn` binary, a FUSE mount or Unix signals; the
// Windows build runs the core's own tests (lib, codec, staging, vfs_model).
#![cfg(unix)]

mod common;

use std::process::Command;

use common::{bytes, Home, Mounted};

struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn enospc_then_recovery_once_space_is_freed() {
    let home = Home::empty();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs"])
        .arg(home.path())
        .status()
        .unwrap()
        .success();
    assert!(ok, "mounting a tmpfs needs root");
    let _tmpfs = Tmpfs(home.path().to_owned());
    // The servers live on the ordinary disk; only the staging cache is full.
    let servers = tempfile::tempdir().unwrap();
    let mut args = vec!["init".to_string()];
    for i in 0..5 {
        args.push("--server-dir".into());
        args.push(servers.path().join(format!("s{i}")).display().to_string());
    }
    home.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mnt: Mounted = home.mount(&["--writeback-delay", "600"]);

    let keep = bytes(4 << 20, 1);
    std::fs::write(mnt.file("keep"), &keep).unwrap();
    let err = std::fs::write(mnt.file("huge"), bytes(100 << 20, 2)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    // Still mounted and serving; the staged file is intact.
    assert!(common::is_mounted(mnt.path()));
    assert!(std::fs::read(mnt.file("keep")).unwrap() == keep);
    std::fs::remove_file(mnt.file("huge")).unwrap();

    let after = bytes(8 << 20, 3);
    std::fs::write(mnt.file("after"), &after).unwrap();
    home.ok(&["sync"]);
    assert!(mnt.unmount().success());
    std::fs::remove_dir_all(home.path().join("cache")).unwrap();
    let mnt = home.mount(&[]);
    assert!(std::fs::read(mnt.file("keep")).unwrap() == keep);
    assert!(std::fs::read(mnt.file("after")).unwrap() == after);
    assert!(mnt.unmount().success());
}
