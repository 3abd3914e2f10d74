//! A full local disk: writes get ENOSPC, the daemon keeps running, nothing
//! staged or committed is harmed, and work continues once space is freed.
//! The staging cache sits on a real 64 MiB tmpfs (root is needed to mount it).

// These tests drive the `cairn` binary, a FUSE mount or Unix signals; the
// Windows build runs the core's own tests (lib, codec, staging, vfs_model).
#![cfg(unix)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bytes, Home, Mounted};

struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A home on its own 64 MiB tmpfs, its five servers on the ordinary disk:
/// only the home fills up.
fn home_on_a_small_disk() -> (Home, Tmpfs, tempfile::TempDir) {
    let home = Home::empty();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs"])
        .arg(home.path())
        .status()
        .unwrap()
        .success();
    assert!(ok, "mounting a tmpfs needs root");
    let tmpfs = Tmpfs(home.path().to_owned());
    let servers = tempfile::tempdir().unwrap();
    let mut args = vec!["init".to_string()];
    for i in 0..5 {
        args.push("--server-dir".into());
        args.push(servers.path().join(format!("s{i}")).display().to_string());
    }
    home.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    (home, tmpfs, servers)
}

/// Every server hangs on every request while the returned flag exists
/// (created by the caller).
fn stall_flag(home: &Home, servers: &Path) -> PathBuf {
    let flag = servers.join("stalled");
    home.edit_config(|c| {
        for s in &mut c.servers {
            s.faults.get_or_insert_with(Default::default).stall_flag = Some(flag.clone());
        }
    });
    flag
}

/// Fills the file system of `dir` to the last byte; removing the returned
/// file frees it again.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 64 << 10];
    let mut small = false;
    loop {
        let piece: &[u8] = if small { &block[..512] } else { &block };
        match f.write_all(piece) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && !small => small = true,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    filler
}

/// Finding 10 of issue 18: the upload succeeded, but recording it in the
/// catalog hit a full disk. `put` must fail, not print a capability the
/// catalog does not hold.
#[test]
fn a_put_whose_catalog_record_hits_a_full_disk_fails_and_records_nothing() {
    let (home, _tmpfs, servers) = home_on_a_small_disk();
    let flag = stall_flag(&home, servers.path());
    std::fs::write(&flag, "").unwrap();
    let src = tempfile::tempdir().unwrap();
    let data = bytes(1 << 20, 9);
    std::fs::write(src.path().join("f"), &data).unwrap();
    let put = home
        .command(&["put", &src.path().join("f").display().to_string(), "/f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The snapshot is taken (in the home), then the upload hangs on the
    // servers: fill the disk in that gap, then let the upload finish.
    let stage = home.path().join("stage");
    let deadline = Instant::now() + Duration::from_secs(10);
    let snapshotted = || {
        std::fs::read_dir(&stage)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.metadata().is_ok_and(|m| m.len() == data.len() as u64))
    };
    while !snapshotted() {
        assert!(Instant::now() < deadline, "put took no snapshot");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let filler = fill(home.path());
    std::fs::remove_file(&flag).unwrap();
    let out = put.wait_with_output().unwrap();
    let err = common::stderr(&out);
    assert!(
        !out.status.success(),
        "put succeeded on a full disk: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty(), "put printed a capability it did not record");
    assert!(err.contains("recording the uploaded version in the catalog"), "{err}");

    std::fs::remove_file(filler).unwrap();
    assert!(!home.ok(&["ls", "/"]).contains('f'), "the failed put left an entry");
    home.ok(&["put", &src.path().join("f").display().to_string(), "/f"]);
    assert!(home.get_bytes("/f").unwrap() == data);
}

/// The mount's twin of the test above: an upload finished, but recording it
/// hit a full disk. The version stays queued (nothing is lost), and once
/// space is back it is committed, its shares the ones the catalog names.
#[test]
fn a_finished_upload_whose_record_hits_a_full_disk_is_committed_once_space_is_back() {
    let (home, _tmpfs, servers) = home_on_a_small_disk();
    let flag = stall_flag(&home, servers.path());
    let mnt = home.mount(&["--writeback-delay", "0"]);
    // Once a first file is on the grid, the mount's own start-up requests
    // are done: only the upload below hangs.
    std::fs::write(mnt.file("first"), b"first").unwrap();
    home.ok(&["sync"]);
    std::fs::write(&flag, "").unwrap();
    let data = bytes(4 << 20, 5);
    std::fs::write(mnt.file("f"), &data).unwrap();
    // The key is committed before any share is sent; then the upload hangs.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first_key = loop {
        if let Some(key) = home.upload_key("/f") {
            break key;
        }
        assert!(Instant::now() < deadline, "the upload never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    let filler = fill(home.path());
    std::fs::remove_file(&flag).unwrap();
    let failed_record = || {
        let status: serde_json::Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
        status["status"]["queue"].as_array().unwrap().iter().any(|e| {
            e["last_error"]
                .as_str()
                .is_some_and(|err| err.contains("recording the committed version"))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !failed_record() {
        assert!(Instant::now() < deadline, "recording never failed");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_file(filler).unwrap();
    home.ok(&["sync"]);
    // SQLite rolled the failed record back, so the version was uploaded
    // again under a new key, and the first attempt's shares were deleted.
    let last_key = home.upload_key("/f").unwrap();
    let shares_under = |key: &str| {
        let si = Home::storage_index_of(key);
        let mut n = 0;
        common::walk(servers.path(), &mut |p| n += p.to_string_lossy().contains(&si) as usize);
        n
    };
    assert_ne!(first_key, last_key);
    assert_eq!(shares_under(&first_key), 0, "the first attempt's shares were orphaned");
    assert_eq!(shares_under(&last_key), 5);
    // Read back from the grid alone: the shares the catalog names are there.
    assert!(mnt.unmount().success());
    std::fs::remove_dir_all(home.path().join("cache")).unwrap();
    let mnt = home.mount(&[]);
    assert!(std::fs::read(mnt.file("f")).unwrap() == data);
    assert!(mnt.unmount().success());
}

#[test]
fn enospc_then_recovery_once_space_is_freed() {
    let (home, _tmpfs, _servers) = home_on_a_small_disk();
    let mnt: Mounted = home.mount(&["--writeback-delay", "600"]);

    let keep = bytes(4 << 20, 1);
    std::fs::write(mnt.file("keep"), &keep).unwrap();
    let err = std::fs::write(mnt.file("huge"), bytes(100 << 20, 2)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    // Still mounted and serving; the staged file is intact.
    assert!(common::is_mounted(mnt.path()));
    assert!(std::fs::read(mnt.file("keep")).unwrap() == keep);
    std::fs::remove_file(mnt.file("huge")).unwrap();

    // The kernel sends a file's release after close(2) has returned: an
    // unlink that reaches the daemon first finds the file still open and
    // leaves its bytes to the release (open and unlinked, it stays
    // readable), so the space may come back a moment later.
    let after = bytes(8 << 20, 3);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(e) = std::fs::write(mnt.file("after"), &after) {
        assert!(
            e.raw_os_error() == Some(libc::ENOSPC) && std::time::Instant::now() < deadline,
            "the space of a removed file never came back: {e}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    home.ok(&["sync"]);
    assert!(mnt.unmount().success());
    std::fs::remove_dir_all(home.path().join("cache")).unwrap();
    let mnt = home.mount(&[]);
    assert!(std::fs::read(mnt.file("keep")).unwrap() == keep);
    assert!(std::fs::read(mnt.file("after")).unwrap() == after);
    assert!(mnt.unmount().success());
}
