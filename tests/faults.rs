//! One test per server fault: the outcome is a committed version, or a clear
//! error with nothing committed, and never a torn or wrong file.
//!
//! Faults a local directory cannot show on demand (slow, stalled, flaky,
//! full, lying) come from the documented `[server.faults]` testing aid; a
//! dead server is a real removed directory (tests/grid.rs).

// These tests drive the `cairn` binary, a FUSE mount or Unix signals; the
// Windows build runs the core's own tests (lib, codec, staging, vfs_model).
#![cfg(unix)]

mod common;

use std::time::{Duration, Instant};

use cairn::config::FaultConfig;
use common::{bytes, stderr, Home};

fn put_file(home: &Home, name: &str, data: &[u8]) -> std::process::Output {
    let src = home.file(name);
    std::fs::write(&src, data).unwrap();
    home.cairn(&["put", "--json", src.to_str().unwrap(), &format!("/{name}")])
}

fn put_json(home: &Home, name: &str, data: &[u8]) -> serde_json::Value {
    let out = put_file(home, name, data);
    assert!(out.status.success(), "put failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn placed_servers(report: &serde_json::Value) -> Vec<String> {
    let mut s: Vec<String> = report["placed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["server"].as_str().unwrap().to_string())
        .collect();
    s.sort();
    s
}

fn get_bytes(home: &Home, path: &str) -> Result<Vec<u8>, String> {
    let got = home.get_bytes(path);
    if got.is_err() {
        assert!(!home.file("got.bin").exists(), "a failed get left an output file");
    }
    got
}

fn check_healthy(home: &Home, path: &str) -> bool {
    // `check` exits non-zero when unhealthy; its report says why.
    let out = home.cairn(&["check", "--json", path]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["healthy"].as_bool().unwrap()
}

fn timeout(home: &Home, secs: u64) {
    home.edit_config(|c| c.grid.timeout_secs = secs);
}

/// Makes s2 hang on every request until the returned flag file is removed.
fn stall_s2(home: &Home) -> std::path::PathBuf {
    let flag = home.file("s2-stalled");
    std::fs::write(&flag, "").unwrap();
    home.set_faults(
        "s2",
        FaultConfig {
            stall_flag: Some(flag.clone()),
            ..Default::default()
        },
    );
    flag
}

#[test]
fn a_stalled_server_is_dropped_after_the_time_out_and_repaired_when_it_answers() {
    let home = Home::init(&[]);
    timeout(&home, 2);
    let flag = stall_s2(&home);
    let data = bytes(3 << 20, 1);
    let report = put_json(&home, "a.bin", &data);
    assert_eq!(placed_servers(&report), ["s1", "s3", "s4", "s5"]);
    let failure = report["failures"][0]["error"].as_str().unwrap();
    assert!(failure.contains("no answer within 2s"), "{report}");
    assert_eq!(get_bytes(&home, "/a.bin").unwrap(), data);
    assert!(!check_healthy(&home, "/a.bin"));

    // The server answers again: repair places exactly its share.
    std::fs::remove_file(&flag).unwrap();
    let out = home.ok(&["repair", "--all"]);
    assert!(out.contains("healthy now"), "{out}");
    assert!(check_healthy(&home, "/a.bin"));
}

#[test]
fn a_server_stalled_mid_upload_spills_until_the_spill_limit_then_is_dropped() {
    let home = Home::init(&[]);
    // A long time-out: only the spill limit can end the wait quickly.
    timeout(&home, 120);
    home.edit_config(|c| c.grid.spill_limit_mib = Some(4));
    home.set_faults(
        "s1",
        FaultConfig {
            stall_after_bytes: Some(1 << 20),
            ..Default::default()
        },
    );
    let data = bytes(40 << 20, 2);
    let src = home.file("big.bin");
    std::fs::write(&src, &data).unwrap();
    let started = Instant::now();
    let out = home
        .command(&["put", "--json", src.to_str().unwrap(), "/big.bin"])
        .env("CAIRN_LOG", "cairn=info")
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(log.contains("spilling its blocks to disk"), "{log}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(placed_servers(&report), ["s2", "s3", "s4", "s5"]);
    let failure = report["failures"][0]["error"].as_str().unwrap();
    assert!(failure.contains("spill queue full (4 MiB"), "{report}");
    // Dropped for its spill, long before its 120 s time-out.
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
    assert_eq!(get_bytes(&home, "/big.bin").unwrap(), data);
    assert!(
        std::fs::read_dir(home.file("spill")).unwrap().next().is_none(),
        "spill files are unnamed"
    );
}

#[test]
fn a_slow_server_spills_to_disk_and_still_gets_its_share() {
    let home = Home::init(&[]);
    home.set_faults(
        "s4",
        FaultConfig {
            delay_ms: 40,
            ..Default::default()
        },
    );
    let data = bytes(24 << 20, 3);
    let src = home.file("slow.bin");
    std::fs::write(&src, &data).unwrap();
    let out = home
        .command(&["put", "--json", src.to_str().unwrap(), "/slow.bin"])
        .env("CAIRN_LOG", "cairn=info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("spilling its blocks to disk"), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(placed_servers(&report), ["s1", "s2", "s3", "s4", "s5"], "{report}");
    assert!(check_healthy(&home, "/slow.bin"));
    assert_eq!(get_bytes(&home, "/slow.bin").unwrap(), data);
}

#[test]
fn erroring_servers_are_dropped_while_happiness_holds_and_fail_cleanly_below_it() {
    let home = Home::init(&[]);
    let always = FaultConfig {
        error_rate: 1.0,
        ..Default::default()
    };
    home.set_faults("s5", always.clone());
    let data = bytes(2 << 20, 4);
    let report = put_json(&home, "one.bin", &data);
    assert_eq!(placed_servers(&report), ["s1", "s2", "s3", "s4"]);
    assert!(report["failures"][0]["error"]
        .as_str()
        .unwrap()
        .contains("injected fault: I/O error"));
    assert_eq!(get_bytes(&home, "/one.bin").unwrap(), data);

    // Two erroring servers of five leave 3 < happy 4: nothing commits.
    home.set_faults("s1", always);
    let shares_before = home.share_files();
    let out = put_file(&home, "two.bin", &data);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("3 of 4 needed for happiness; nothing was committed"),
        "{err}"
    );
    assert!(
        err.contains("s1: injected fault") && err.contains("s5: injected fault"),
        "{err}"
    );
    assert_eq!(home.share_files(), shares_before, "no visible share of a failed put");
    assert!(get_bytes(&home, "/two.bin").is_err());
}

#[test]
fn flaky_servers_give_whole_versions_or_clear_errors_never_torn_ones() {
    let home = Home::init(&[]);
    timeout(&home, 5);
    for (i, name) in ["s1", "s2", "s3", "s4", "s5"].iter().enumerate() {
        home.set_faults(
            name,
            FaultConfig {
                error_rate: 0.02,
                seed: i as u64,
                ..Default::default()
            },
        );
    }
    let (mut committed, mut refused) = (0, 0);
    for round in 0..12u64 {
        let data = bytes((round as usize + 1) * 300_000, 100 + round);
        let name = format!("f{round}.bin");
        let out = put_file(&home, &name, &data);
        if !out.status.success() {
            assert!(stderr(&out).contains("nothing was committed"), "{}", stderr(&out));
            refused += 1;
            continue;
        }
        committed += 1;
        // Reads meet the same faults: the right bytes, or a clear error.
        match get_bytes(&home, &format!("/{name}")) {
            Ok(got) => assert!(got == data, "round {round}: wrong content"),
            Err(e) => assert!(e.contains("valid"), "{e}"),
        }
    }
    eprintln!("flaky grid: {committed} committed, {refused} refused");
    assert!(committed > 0, "the fault rate is low enough for most puts to commit");
}

#[test]
fn a_full_server_is_dropped_and_the_version_commits_on_the_others() {
    let home = Home::init(&[]);
    home.set_faults(
        "s3",
        FaultConfig {
            capacity_bytes: Some(1 << 20),
            ..Default::default()
        },
    );
    let small = bytes(100_000, 5);
    assert_eq!(placed_servers(&put_json(&home, "small.bin", &small)).len(), 5);
    let big = bytes(6 << 20, 6);
    let report = put_json(&home, "big.bin", &big);
    assert_eq!(placed_servers(&report), ["s1", "s2", "s4", "s5"]);
    let why = report["failures"][0]["error"].as_str().unwrap();
    assert!(why.contains("no space left on device"), "{why}");
    assert_eq!(get_bytes(&home, "/big.bin").unwrap(), big);
    assert_eq!(get_bytes(&home, "/small.bin").unwrap(), small);
}

#[test]
fn corrupt_reads_are_detected_and_never_returned() {
    let home = Home::init(&[]);
    let data = bytes(5 << 20, 7);
    put_json(&home, "c.bin", &data);
    let lying = FaultConfig {
        corrupt_read_rate: 1.0,
        ..Default::default()
    };
    // Two lying servers of five: three honest ones still rebuild it.
    home.set_faults("s1", lying.clone());
    home.set_faults("s2", lying.clone());
    assert_eq!(get_bytes(&home, "/c.bin").unwrap(), data);
    // Three lying: no output at all, and the error says why.
    home.set_faults("s3", lying);
    let err = get_bytes(&home, "/c.bin").unwrap_err();
    assert!(err.contains("corrupt"), "{err}");
}

#[test]
fn reads_hedge_around_slow_servers() {
    let home = Home::init(&[]);
    timeout(&home, 120);
    let data = bytes(4 << 20, 8);
    put_json(&home, "h.bin", &data);
    // Two servers take 30 s per request. Without hedging the read would
    // wait for them (30 s or more); with it, it goes around them.
    for name in ["s1", "s2"] {
        home.set_faults(
            name,
            FaultConfig {
                delay_ms: 30_000,
                ..Default::default()
            },
        );
    }
    let started = Instant::now();
    assert_eq!(get_bytes(&home, "/h.bin").unwrap(), data);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(20), "read took {elapsed:?}");
}

#[test]
fn a_bad_fault_config_names_the_field() {
    let home = Home::init(&[]);
    home.edit_config(|c| {
        c.servers[1].faults = Some(FaultConfig {
            error_rate: 1.5,
            ..Default::default()
        })
    });
    let out = home.cairn(&["repair", "--all"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("server[1].faults.error_rate"), "{}", stderr(&out));
}

#[test]
fn the_mount_commits_and_reads_back_through_a_stalled_and_a_lying_server() {
    let home = Home::init(&[]);
    timeout(&home, 2);
    let flag = stall_s2(&home);
    home.set_faults(
        "s4",
        FaultConfig {
            corrupt_read_rate: 1.0,
            ..Default::default()
        },
    );
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("f{i}"), bytes(i * 700_000 + 10, 40 + i as u64)))
        .collect();
    let mnt = home.mount(&["--writeback-delay", "0", "--repair-interval", "0.5"]);
    for (name, data) in &files {
        std::fs::write(mnt.file(name), data).unwrap();
    }
    home.ok(&["sync"]);
    assert!(mnt.unmount().success());

    // Only the grid has them now; s2 hangs and s4 lies on every read.
    std::fs::remove_dir_all(home.file("cache")).unwrap();
    let mnt = home.mount(&["--repair-interval", "0.5"]);
    for (name, data) in &files {
        assert!(std::fs::read(mnt.file(name)).unwrap() == *data, "{name}");
    }
    // s2 answers again: the mount places the shares it missed. (`check`
    // runs from the config file, where s4 no longer lies; the running
    // daemon's s4 still does.)
    std::fs::remove_file(&flag).unwrap();
    home.edit_config(|c| c.servers[3].faults = None);
    let deadline = Instant::now() + Duration::from_secs(20);
    for (name, _) in &files {
        let cap = home.versions(&format!("/{name}"))[0]["cap"]
            .as_str()
            .unwrap()
            .to_string();
        while !home.cairn(&["check", "--cap", &cap]).status.success() {
            assert!(
                Instant::now() < deadline,
                "{name}: the missing share was never repaired"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(mnt.unmount().success());
}

/// A mapped version's segment is decoded from its data shares unchecked
/// and checked by the manifest's hash of it; only a mismatch has its
/// blocks checked one by one. Damaged share files on the servers' disks
/// (real files, not a fault injector: the trailers stay intact, so the
/// shares look good until their blocks are read) must be routed around
/// while enough good shares remain, and refused, never returned, after.
#[test]
fn a_cold_read_of_a_mapped_file_goes_around_damaged_data_shares() {
    let home = Home::init(&[]);
    let data = bytes(3 << 20, 61);
    let mnt = home.mount(&["--writeback-delay", "0"]);
    std::fs::write(mnt.file("m.bin"), &data).unwrap();
    home.ok(&["sync"]);
    let cap = home.versions("/m.bin")[0]["cap"].as_str().unwrap().to_string();
    assert!(cap.starts_with("cairn:map1:"), "{cap}");
    assert!(mnt.unmount().success());

    // One bit in segment 1's block of shares 0 and 1: the first decode is
    // wrong, and the read must find and skip both.
    let block_len = (1u64 << 20).div_ceil(3);
    let damage = |share: &str| {
        for path in home.shares_of("/m.bin") {
            if path.file_name().unwrap() == share {
                let mut bytes = std::fs::read(&path).unwrap();
                bytes[(8 + block_len + 1000) as usize] ^= 0x10;
                std::fs::write(&path, bytes).unwrap();
            }
        }
    };
    damage("0");
    damage("1");
    std::fs::remove_dir_all(home.file("cache")).unwrap();
    let mnt = home.mount(&[]);
    assert!(std::fs::read(mnt.file("m.bin")).unwrap() == data);
    assert!(mnt.unmount().success());
    // The unchecked decode ran, failed its hash, and the blocks it was
    // given named both culprits.
    let log = std::fs::read_to_string(home.log_path()).unwrap();
    assert_eq!(log.matches("did not match its hash").count(), 1, "{log}");
    for share in ["share 0: block 1 does not match", "share 1: block 1 does not match"] {
        assert!(log.contains(share), "{share}: {log}");
    }

    // A third damaged share leaves two good ones of the three needed.
    damage("2");
    std::fs::remove_dir_all(home.file("cache")).unwrap();
    let mnt = home.mount(&[]);
    let err = std::fs::read(mnt.file("m.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(mnt.unmount().success());
}
