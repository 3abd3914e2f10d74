//! S3 grids: five real s3s-fs servers on 127.0.0.1 as the grid.

// These tests drive the `cairn` binary, a FUSE mount or Unix signals; the
// Windows build runs the core's own tests (lib, codec, staging, vfs_model).
#![cfg(unix)]

mod common;

use std::time::{Duration, Instant};

use common::s3::S3Servers;
use common::{bytes, Home};

fn s3_home(servers: &S3Servers) -> Home {
    let args = servers.init_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Home::init_with_env(&args, &servers.secret_env())
}

fn put(home: &Home, name: &str, data: &[u8]) -> serde_json::Value {
    let src = home.file(name);
    std::fs::write(&src, data).unwrap();
    let out = home.ok(&["put", "--json", src.to_str().unwrap(), &format!("/{name}")]);
    std::fs::remove_file(&src).unwrap();
    serde_json::from_str(&out).unwrap()
}

fn healthy(home: &Home, path: &str) -> bool {
    home.cairn(&["check", path]).status.success()
}

#[test]
fn put_get_check_on_an_s3_grid_and_a_killed_server() {
    let mut servers = S3Servers::start(5);
    let home = s3_home(&servers);
    // 20 MiB: shares of ~7 MiB go up as multipart uploads (5 MiB parts);
    // the small file's shares are single PUTs.
    let big = bytes(20 << 20, 1);
    let small = bytes(5000, 2);
    let report = put(&home, "big.bin", &big);
    assert_eq!(report["placed"].as_array().unwrap().len(), 5, "{report}");
    put(&home, "small.bin", &small);
    assert_eq!(home.get_bytes("/big.bin").unwrap(), big);
    assert_eq!(home.get_bytes("/small.bin").unwrap(), small);
    assert!(healthy(&home, "/big.bin"));

    // A killed server: still readable, and check names it.
    servers.kill(2);
    assert_eq!(home.get_bytes("/big.bin").unwrap(), big);
    assert_eq!(home.get_bytes("/small.bin").unwrap(), small);
    let out = home.cairn(&["check", "/big.bin"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("s3"),
        "names the dead server"
    );
    // Writes go on with happiness 4 of the 4 left.
    let third = bytes(3 << 20, 3);
    let report = put(&home, "third.bin", &third);
    assert_eq!(report["placed"].as_array().unwrap().len(), 4, "{report}");
    servers.restart(2);
    assert!(home.ok(&["repair", "--all"]).contains("healthy now"));
    assert!(healthy(&home, "/third.bin"));
}

#[test]
fn reads_fetch_only_the_blocks_they_need() {
    let servers = S3Servers::start(5);
    let home = s3_home(&servers);
    let data = bytes(64 << 20, 4);
    put(&home, "big.bin", &data);
    let mnt = home.mount(&[]);
    let before = servers.bytes_sent();
    // 64 KiB from the middle of a 64 MiB file that is not in the cache.
    let f = std::fs::File::open(mnt.file("big.bin")).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    use std::os::unix::fs::FileExt;
    f.read_exact_at(&mut buf, 32 << 20).unwrap();
    let sent = servers.bytes_sent() - before;
    assert_eq!(buf, data[32 << 20..(32 << 20) + (64 << 10)]);
    eprintln!("servers sent {sent} bytes for a 64 KiB read of a 64 MiB file");
    // The whole file would be 64 MiB; a few segments with read-ahead are
    // a few MiB.
    assert!(sent < 16 << 20, "servers sent {sent} bytes");
    drop(f);
    assert!(mnt.unmount().success());
}

#[test]
fn a_sigstopped_server_is_dropped_memory_stays_bounded_and_it_is_repaired_after_sigcont() {
    let servers = S3Servers::start(5);
    let home = s3_home(&servers);
    home.edit_config(|c| c.grid.timeout_secs = 5);
    let src = home.file("stop.bin");
    let sha = {
        // Not kept in this process: a child's peak RSS (from wait4) counts
        // the parent's memory it was forked with.
        let data = bytes(200 << 20, 5);
        std::fs::write(&src, &data).unwrap();
        common::sha256_hex(&data)
    };
    let mut cmd = home.command(&["put", "--json", src.to_str().unwrap(), "/stop.bin"]);
    cmd.env("CAIRN_LOG", "cairn=info");
    let started = Instant::now();
    let stopper = std::thread::spawn({
        let pid = servers.pid(1);
        move || {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: a signal to the s3s-fs process this test started.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
    });
    let (ok, stdout, log, peak_kib) = common::run_measured(cmd, home.path());
    stopper.join().unwrap();
    eprintln!(
        "put with s2 stopped: {:?}, peak RSS {} MiB",
        started.elapsed(),
        peak_kib / 1024
    );
    servers.signal(1, libc::SIGCONT);
    assert!(ok, "{log}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["placed"].as_array().unwrap().len(), 4, "{report}");
    assert_eq!(report["failures"][0]["server"], "s2", "{report}");
    let budget_mib = home.config().grid.memory_budget_mib as i64;
    assert!(peak_kib / 1024 < budget_mib + 32, "peak RSS {} MiB", peak_kib / 1024);
    assert_eq!(common::sha256_hex(&home.get_bytes("/stop.bin").unwrap()), sha);
    assert!(!healthy(&home, "/stop.bin"));
    assert!(home.ok(&["repair", "--all"]).contains("healthy now"));
    assert!(healthy(&home, "/stop.bin"));
}

#[test]
fn a_put_killed_mid_upload_leaves_only_incomplete_multipart_uploads_which_repair_aborts() {
    let servers = S3Servers::start(5);
    let home = s3_home(&servers);
    home.slow_servers(50);
    let src = home.file("big.bin");
    std::fs::write(&src, bytes(60 << 20, 6)).unwrap();
    let mut child = home
        .command(&["put", src.to_str().unwrap(), "/big.bin"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let journal = home.file("multipart");
    let deadline = Instant::now() + Duration::from_secs(30);
    let journaled = || common::walk_count(&journal);
    while journaled() < 5 {
        assert!(Instant::now() < deadline, "no multipart upload was started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let objects = || {
        let mut n = 0;
        for i in 0..5 {
            n += common::walk_count(&servers.data_dir(i).join("cairn"));
        }
        n
    };
    assert_eq!(objects(), 0, "no share is visible after the kill");
    assert!(home.get_bytes("/big.bin").is_err());

    home.edit_config(|c| {
        for s in &mut c.servers {
            s.faults = None;
        }
    });
    // What the killed put journaled, to tell apart, if anything is left,
    // an upload repair was never told of from one its abort missed.
    let mut journal_entries = Vec::new();
    common::walk(&journal, &mut |p| {
        journal_entries.push(std::fs::read_to_string(p).unwrap())
    });
    let out = home.ok(&["repair", "--all"]);
    assert!(out.contains("removed 5 abandoned partial uploads"), "{out}");
    assert_eq!(journaled(), 0);
    // s3s-fs keeps parts of open uploads beside the buckets; aborting
    // removed them. A part whose body was cut off by the kill is a
    // `.tmp.N.internal.part` that s3s-fs deletes once it notices the closed
    // connection, which can be after the repair (seen once in CI): allow
    // it a few seconds. Under load a create sent before the kill can also
    // land after the repair listed the uploads (seen twice in CI, once on
    // a second server after a second repair): s3s-fs may still be working
    // through requests the killed put sent, so a repair runs again, at
    // most once a second, while an upload is left.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_repair = Instant::now();
    for i in 0..5 {
        loop {
            let leftover: Vec<_> = std::fs::read_dir(servers.data_dir(i))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n != "cairn")
                .collect();
            if leftover.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "server {i} kept {leftover:?}; journaled: {journal_entries:?}; repair said: {out}"
            );
            if last_repair.elapsed() >= Duration::from_secs(1) && leftover.iter().any(|n| n.starts_with(".upload-")) {
                home.ok(&["repair", "--all"]);
                last_repair = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn the_mount_works_unchanged_on_an_s3_grid() {
    let servers = S3Servers::start(5);
    let home = s3_home(&servers);
    common::files_survive_losing_the_cache(&home);
}

#[test]
fn one_grid_mixes_dir_and_s3_servers() {
    let servers = S3Servers::start(3);
    let dirs = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = Vec::new();
    for name in ["a", "b"] {
        args.push("--server-dir".into());
        args.push(dirs.path().join(name).to_str().unwrap().into());
    }
    args.extend(servers.init_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let home = Home::init_with_env(&args, &servers.secret_env());
    let kinds: Vec<String> = home.config().servers.iter().map(|s| s.backend.clone()).collect();
    assert_eq!(kinds, ["dir", "dir", "s3", "s3", "s3"]);
    let data = bytes(9 << 20, 7);
    let report = put(&home, "mixed.bin", &data);
    assert_eq!(report["placed"].as_array().unwrap().len(), 5, "{report}");
    assert_eq!(common::walk_count(dirs.path()), 2, "one share in each directory server");
    assert_eq!(home.get_bytes("/mixed.bin").unwrap(), data);
    assert!(healthy(&home, "/mixed.bin"));
}

/// Finding 7 of issue 18 on a real S3 server: one s3s-fs serves an 800 MiB
/// pointer record (a sparse file put in its directory, as a hostile server
/// would store it). Recovery stops reading it at the record bound and
/// recovers from the other four, under 100 MiB of RSS.
#[test]
fn a_huge_pointer_record_from_an_s3_server_is_refused_without_being_read() {
    let servers = S3Servers::start(5);
    let home = s3_home(&servers);
    put(&home, "a", b"a");
    home.ok(&["sync"]);
    let root = home.root_cap();
    let mut records = Vec::new();
    common::walk(&servers.data_dir(1), &mut |p| {
        if p.parent().is_some_and(|d| d.ends_with("records")) {
            records.push(p.to_owned())
        }
    });
    assert_eq!(records.len(), 1, "{records:?}");
    let record = std::fs::OpenOptions::new().write(true).open(&records[0]).unwrap();
    record.set_len(800 << 20).unwrap();
    let probe = Home::empty();
    let mut cmd = probe.command(&["recover", "--config", home.file("config.toml").to_str().unwrap()]);
    cmd.env("CAIRN_ROOT_CAP", root).envs(servers.secret_env());
    let (ok, out, err, peak_kib) = common::run_measured(cmd, probe.path());
    assert!(ok, "the other servers' pointers still recover it: {err}");
    assert!(out.contains("unreachable: record of"), "{out}");
    assert!(peak_kib < 100 << 10, "peak RSS {peak_kib} KiB");
}

/// Devices find each other's heads by listing records (issue 20); on S3
/// that is a LIST of the records prefix, filtered by name.
#[test]
fn records_are_listed_by_prefix_and_deleted_on_s3_servers() {
    let servers = S3Servers::start(5);
    let home = s3_home(&servers);
    for (key, value) in servers.secret_env() {
        // Every test of this binary that needs it passes the same secret.
        std::env::set_var(key, value);
    }
    common::records_are_listed_by_prefix_and_deleted(&home);
}
