//! kill -9 of the daemon at the moments that matter, then a restart: what
//! was closed is all there, a file open for writing keeps the bytes that
//! reached the staging cache, uploads resume, and stale mounts are handled.

// These tests drive the `cairn` binary, a FUSE mount or Unix signals; the
// Windows build runs the core's own tests (lib, codec, staging, vfs_model).
#![cfg(unix)]

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{bytes, is_mounted, sha256_hex, Home};

/// After a crash: mount again, sync, drop the cache, mount again (content
/// now comes from the grid alone) and hand the mount to `check`.
fn restart_and_verify(home: &Home, check: impl FnOnce(&common::Mounted)) {
    let mnt = home.mount(&["--writeback-delay", "0"]);
    home.ok(&["sync"]);
    assert!(mnt.unmount().success());
    std::fs::remove_dir_all(home.path().join("cache")).unwrap();
    let mnt = home.mount(&[]);
    check(&mnt);
    assert!(mnt.unmount().success());
}

/// The daemon's watcher (`cairn watch-mount`, or fusermount3's helper
/// under --allow-other) unmounts a killed daemon's mount.
fn wait_unmounted(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_mounted(path) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!is_mounted(path), "the killed daemon's mount is still there after 5 s");
}

#[test]
fn closed_files_survive_kill_9_before_upload() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "600"]);
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("f{i}"), bytes(i * 50_000 + 1, i as u64)))
        .collect();
    std::fs::create_dir(mnt.file("d")).unwrap();
    for (name, data) in &files {
        std::fs::write(mnt.file(&format!("d/{name}")), data).unwrap();
    }
    std::fs::rename(mnt.file("d/f0"), mnt.file("d/renamed")).unwrap();
    let path = mnt.path().to_owned();
    mnt.signal(libc::SIGKILL);
    wait_unmounted(&path);
    restart_and_verify(&home, |mnt| {
        assert!(std::fs::read(mnt.file("d/renamed")).unwrap() == files[0].1);
        for (name, data) in &files[1..] {
            assert!(
                &std::fs::read(mnt.file(&format!("d/{name}"))).unwrap() == data,
                "{name}"
            );
        }
    });
}

#[test]
fn a_file_open_for_writing_at_kill_9_keeps_what_reached_staging() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "600"]);
    std::fs::write(mnt.file("old"), b"old content").unwrap();
    let written = bytes(3 << 20, 4);
    let mut f = std::fs::File::create(mnt.file("open")).unwrap();
    f.write_all(&written).unwrap();
    let mut g = std::fs::OpenOptions::new().write(true).open(mnt.file("old")).unwrap();
    g.write_all(b"NEW").unwrap();
    let path = mnt.path().to_owned();
    mnt.signal(libc::SIGKILL);
    drop((f, g));
    wait_unmounted(&path);
    restart_and_verify(&home, |mnt| {
        assert!(std::fs::read(mnt.file("open")).unwrap() == written);
        assert_eq!(std::fs::read(mnt.file("old")).unwrap(), b"NEW content");
        // The recovered state is a version of its own, after the closed one.
        let all = home.versions("/old");
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[0]["size"], 11);
        assert_eq!(all[1]["sha256"], sha256_hex(b"NEW content"));
    });
}

#[test]
fn an_upload_killed_midway_resumes_and_leaves_no_partial_shares() {
    let home = Home::init(&[]);
    let cfg = home.file("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // Slow servers, so the kill lands mid-upload.
    home.slow_servers(50);
    let mnt = home.mount(&["--writeback-delay", "0"]);
    let data = bytes(20 << 20, 6);
    std::fs::write(mnt.file("big"), &data).unwrap();
    // Wait until share bytes are flowing.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status: serde_json::Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
        if status["status"]["queue"][0]["sent"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "upload never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let path = mnt.path().to_owned();
    mnt.signal(libc::SIGKILL);
    wait_unmounted(&path);
    let partial: usize = (1..=5)
        .map(|i| std::fs::read_dir(home.server_dir(&format!("s{i}")).join("incoming")).map_or(0, |d| d.count()))
        .sum();
    assert!(partial > 0, "the kill should have left partial shares behind");
    std::fs::write(&cfg, text).unwrap(); // servers at full speed again
    restart_and_verify(&home, |mnt| {
        assert!(std::fs::read(mnt.file("big")).unwrap() == data);
    });
    for i in 1..=5 {
        let left = std::fs::read_dir(home.server_dir(&format!("s{i}")).join("incoming"))
            .unwrap()
            .count();
        assert_eq!(left, 0, "s{i}: partial shares left after the resumed upload");
    }
    let shares = home.shares_of("/big").len();
    assert_eq!(
        shares, 5,
        "the resumed upload removed the interrupted one's shares: one share per server, no orphans"
    );
}

#[test]
fn a_stale_mount_is_recovered_and_reported() {
    let home = Home::empty();
    let mnt = home.mount(&[]);
    std::fs::write(mnt.file("f"), b"kept").unwrap();
    let path = mnt.path().to_owned();
    // Kill the unmount watcher first, then the daemon: the mount stays,
    // dead (ENOTCONN), as after a crash of both.
    let helper = std::process::Command::new("pgrep")
        .args(["-P", &mnt.pid().to_string(), "-f", "watch-mount"])
        .output()
        .unwrap();
    assert!(!helper.stdout.is_empty(), "the daemon has an unmount watcher");
    for pid in String::from_utf8_lossy(&helper.stdout).split_whitespace() {
        // SAFETY: kill on the PID of the daemon's own helper.
        unsafe { libc::kill(pid.parse().unwrap(), libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(100));
    mnt.signal(libc::SIGKILL);
    let dead = std::fs::metadata(&path).unwrap_err();
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN), "the mount should be stale");

    // `cairn mount` on the stale mount point recovers it and says so.
    let log = home.path().join("recover.log");
    let mut child = home
        .command(&["mount", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut recovered = false;
    while Instant::now() < deadline {
        if std::fs::read(path.join("f")).ok().as_deref() == Some(b"kept".as_slice()) {
            recovered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: SIGTERM to the daemon this test started: a clean stop.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(recovered, "no working mount after recovery: {said}");
    assert!(status.success(), "{said}");
    assert!(said.contains("stale mount"), "{said}");
    // Its temporary directory could not be removed while the mount was stale.
    let _ = std::fs::remove_dir(&path);
}
