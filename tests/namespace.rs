//! The grid alone restores everything: namespace snapshots on the grid,
//! recovery from the root capability, rollback resistance, and gc.

// These tests drive the `cairn` binary, a FUSE mount or Unix signals; the
// Windows build runs the core's own tests (lib, codec, staging, vfs_model).
#![cfg(unix)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{bytes, stderr, Home};

/// A new, empty CAIRN_HOME recovered from `root` and `config`.
fn recover_into_new_home(root: &str, config: &Path) -> (Home, String) {
    let home = Home::empty();
    let out = home
        .command(&["recover", "--config", config.to_str().unwrap()])
        .env("CAIRN_ROOT_CAP", root)
        .output()
        .unwrap();
    assert!(out.status.success(), "recover failed: {}", stderr(&out));
    (home, String::from_utf8(out.stdout).unwrap())
}

/// Every name under `/` of a home's catalog, with sizes and version counts.
fn listing(home: &Home) -> String {
    fn walk(home: &Home, path: &str, out: &mut String) {
        let entries: serde_json::Value = serde_json::from_str(&home.ok(&["ls", "--json", path])).unwrap();
        for e in entries.as_array().unwrap() {
            let name = e["name"].as_str().unwrap();
            let child = format!("{}/{name}", path.trim_end_matches('/'));
            out.push_str(&format!("{child} {} {} {}\n", e["kind"], e["size"], e["versions"]));
            if e["kind"] == "dir" {
                walk(home, &child, out);
            }
        }
    }
    let mut out = String::new();
    walk(home, "/", &mut out);
    out
}

#[test]
fn a_new_machine_recovers_every_file_from_the_root_capability() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "0"]);
    let tree = mnt.file("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    let mut files = Vec::new();
    for i in 0..30 {
        let p = tree.join(if i % 3 == 0 { "a/b" } else { "a" }).join(format!("f{i}"));
        let data = bytes(i * 7919 % 300_000, i as u64);
        std::fs::write(&p, &data).unwrap();
        files.push((p.strip_prefix(mnt.path()).unwrap().to_owned(), data));
    }
    std::fs::write(mnt.file("notes.txt"), b"first").unwrap();
    home.ok(&["sync"]);
    std::fs::write(mnt.file("notes.txt"), b"second version").unwrap();
    std::os::unix::fs::symlink("a/f1", tree.join("link")).unwrap();
    common::xattr_set(&mnt.file("notes.txt"), "user.colour", b"blue");
    let out = home.ok(&["sync", "--json"]);
    assert!(out.contains("\"namespace_published\": "), "{out}");
    let root = home.root_cap();
    let before = listing(&home);
    assert!(mnt.unmount().success());

    // The laptop dies: keep only config.toml and the (local) servers.
    for entry in std::fs::read_dir(home.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name != "config.toml" && name != "servers" {
            let p = entry.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }
    // From a file this time (the environment and standard input are the others).
    let root_file = home.file("root.txt");
    std::fs::write(&root_file, format!("{root}\n")).unwrap();
    let out = home.ok(&[
        "recover",
        "--root-cap-file",
        root_file.to_str().unwrap(),
        "--config",
        home.file("config.toml").to_str().unwrap(),
    ]);
    assert!(out.contains("joined the drive"), "{out}");
    assert_eq!(listing(&home), before, "the namespace comes back whole");
    assert_eq!(home.root_cap(), root);

    let mnt = home.mount(&[]);
    for (path, data) in &files {
        assert!(std::fs::read(mnt.path().join(path)).unwrap() == *data, "{path:?}");
    }
    assert_eq!(std::fs::read(mnt.file("notes.txt")).unwrap(), b"second version");
    assert_eq!(
        std::fs::read_link(mnt.file("tree/link")).unwrap().to_str(),
        Some("a/f1")
    );
    assert_eq!(common::xattr_get(&mnt.file("notes.txt"), "user.colour"), b"blue");
    let versions = home.versions("/notes.txt");
    assert_eq!(versions.len(), 2, "both versions, each readable");
    assert!(mnt.unmount().success());
}

fn put(home: &Home, path: &str, data: &[u8]) {
    let src = home.file("src.bin");
    std::fs::write(&src, data).unwrap();
    home.ok(&["put", src.to_str().unwrap(), path]);
}

#[test]
fn kill_9_during_a_namespace_upload_leaves_a_whole_namespace() {
    let home = Home::init(&[]);
    put(&home, "/one", b"one");
    home.ok(&["sync"]);
    let root = home.root_cap();
    let first = listing(&home);
    put(&home, "/two", b"two");
    let second = listing(&home);
    // Slow servers, so the kill lands inside the upload or the pointer writes.
    home.slow_servers(150);
    let mut outcomes = Vec::new();
    for kill_after_ms in [200, 700, 1300] {
        let mut child = home
            .command(&["sync"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(kill_after_ms));
        let _ = child.kill();
        child.wait().unwrap();
        let mut config = home.config();
        for s in &mut config.servers {
            s.faults = None;
        }
        let plain = home.file("plain.toml");
        std::fs::write(&plain, config.to_toml()).unwrap();
        let (recovered, _) = recover_into_new_home(&root, &plain);
        let got = listing(&recovered);
        assert!(
            got == first || got == second,
            "recovered a namespace that never was:\n{got}"
        );
        outcomes.push(if got == first { "previous" } else { "new" });
    }
    eprintln!("kill -9 at 200/700/1300 ms recovered: {outcomes:?}");
    assert_eq!(outcomes[0], "previous", "killed before any pointer was written");
}

#[test]
fn a_server_serving_an_old_or_forged_pointer_cannot_roll_the_namespace_back() {
    let home = Home::init(&[]);
    put(&home, "/a", b"a");
    home.ok(&["sync"]);
    let root = home.root_cap();
    let records = |s: &str| home.server_dir(s).join("records");
    let old = home.file("old-records");
    for s in ["s1", "s2", "s3", "s4"] {
        common::copy_tree(&records(s), &old.join(s));
    }
    put(&home, "/b", b"b");
    home.ok(&["sync"]);
    let newest = listing(&home);
    // Four servers roll back to the old (validly signed) pointer, and one
    // of them instead serves a forged one; only s5 is honest.
    for s in ["s1", "s2", "s3", "s4"] {
        std::fs::remove_dir_all(records(s)).unwrap();
        common::copy_tree(&old.join(s), &records(s));
    }
    for entry in std::fs::read_dir(records("s4")).unwrap() {
        let p = entry.unwrap().path();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[15] ^= 0x40; // a higher sequence number
        std::fs::write(&p, bytes).unwrap();
    }
    let (recovered, out) = recover_into_new_home(&root, &home.file("config.toml"));
    assert_eq!(listing(&recovered), newest, "{out}");
    assert!(out.contains("s4: invalid pointer: authentication failed"), "{out}");
    // And a wrong root capability finds nothing it can open.
    let other = Home::init(&[]);
    let wrong = other.root_cap();
    let probe = Home::empty();
    let out = probe
        .command(&["recover", "--config", home.file("config.toml").to_str().unwrap()])
        .env("CAIRN_ROOT_CAP", &wrong)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no server holds a valid namespace pointer"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn gc_deletes_only_what_retention_lets_go() {
    let home = Home::init(&[]);
    home.edit_config(|c| {
        c.retention.keep_versions = 2;
        c.retention.keep_days = 0;
    });
    for i in 1..=5u64 {
        put(&home, "/f", &bytes(50_000, i));
        home.ok(&["sync"]);
    }
    let shares_before = home.share_files().len();
    let dry = home.ok(&["gc", "--dry-run"]);
    assert!(
        dry.starts_with("would delete 3 versions and 2 namespace snapshots"),
        "{dry}"
    );
    assert_eq!(home.share_files().len(), shares_before, "a dry run deletes nothing");
    let out = home.ok(&["gc"]);
    assert!(out.contains("deleted 3 versions and 2 namespace snapshots"), "{out}");
    assert_eq!(
        home.share_files().len(),
        shares_before - 5 * 5,
        "5 shares for each of 5 capabilities"
    );
    // What is retained still reads back; what went is refused clearly.
    for (num, seed) in [(5, 5), (4, 4)] {
        let got = home.file("got.bin");
        home.ok(&["get", "/f", got.to_str().unwrap(), "--version", &num.to_string()]);
        assert_eq!(std::fs::read(&got).unwrap(), bytes(50_000, seed));
    }
    let got = home.file("gone.bin");
    let out = home.cairn(&["get", "/f", got.to_str().unwrap(), "--version", "1"]);
    assert!(!out.status.success());
    assert!(!got.exists());
    // The newest namespace still recovers everything retained.
    let (recovered, _) = recover_into_new_home(&home.root_cap(), &home.file("config.toml"));
    assert!(listing(&recovered).contains("/f "));
    assert!(home
        .ok(&["gc"])
        .starts_with("deleted 0 versions and 0 namespace snapshots"));
}

#[test]
fn recovery_refuses_to_guess_from_too_few_servers_and_takes_a_floor() {
    // 2-of-5, happy 3: a publication may miss 2 servers, so 3 must answer;
    // 2 suffice to read the snapshot when the user accepts that.
    let home = Home::init(&["--needed", "2", "--happy", "3"]);
    put(&home, "/a", b"a");
    home.ok(&["sync"]);
    put(&home, "/b", b"b");
    home.ok(&["sync"]);
    let root = home.root_cap();
    // Three of five servers stall: the two that answer need not hold the
    // newest pointer.
    home.edit_config(|c| {
        c.grid.timeout_secs = 1;
        for s in &mut c.servers[2..] {
            s.faults = Some(cairn::config::FaultConfig {
                stall: true,
                ..Default::default()
            });
        }
    });
    let config = home.file("config.toml");
    let recover = |extra: &[&str]| {
        let probe = Home::empty();
        let out = probe
            .command(&[&["recover", "--config", config.to_str().unwrap()], extra].concat())
            .env("CAIRN_ROOT_CAP", &root)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr(&out),
        )
    };
    let (ok, _, err) = recover(&[]);
    assert!(!ok, "recovered from one server of five");
    assert!(
        err.contains("only 2 servers answered; 3 must") && err.contains("--accept-partial"),
        "{err}"
    );
    let (ok, out, err) = recover(&["--accept-partial"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("recovered namespace 2 (published 20"),
        "sequence and time: {out}"
    );
    assert!(out.contains("2 of 5 servers answered"), "{out}");
    let (ok, _, err) = recover(&["--accept-partial", "--min-seq", "3"]);
    assert!(!ok);
    assert!(err.contains("older than --min-seq 3"), "{err}");
}

#[test]
fn a_huge_pointer_record_is_refused_without_being_read() {
    let home = Home::init(&[]);
    put(&home, "/a", b"a");
    home.ok(&["sync"]);
    let root = home.root_cap();
    // A hostile server's 800 MiB record (sparse: costs the test no disk).
    let records = home.server_dir("s1").join("records");
    let name = std::fs::read_dir(&records).unwrap().next().unwrap().unwrap().path();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&name)
        .unwrap()
        .set_len(800 << 20)
        .unwrap();
    let probe = Home::empty();
    let mut cmd = probe.command(&["recover", "--config", home.file("config.toml").to_str().unwrap()]);
    cmd.env("CAIRN_ROOT_CAP", &root);
    let (ok, out, err, peak_kib) = common::run_measured(cmd, probe.path());
    assert!(ok, "the other servers' pointers still recover it: {err}");
    assert!(out.contains("s1: unreachable: record of"), "{out}");
    assert!(peak_kib < 100 << 10, "peak RSS {peak_kib} KiB");
}

#[test]
fn recovery_never_makes_a_missing_server_directory_afresh() {
    let home = Home::init(&[]);
    put(&home, "/a", b"a");
    home.ok(&["sync"]);
    let root = home.root_cap();
    // s5 is a disk that is not mounted right now.
    let s5 = home.server_dir("s5");
    std::fs::rename(&s5, home.file("s5-unmounted")).unwrap();
    let (recovered, out) = recover_into_new_home(&root, &home.file("config.toml"));
    assert!(out.contains("s5: unreachable: server directory"), "{out}");
    assert!(
        !s5.exists(),
        "recover made an empty local directory where a server should be"
    );
    assert!(listing(&recovered).contains("a"), "{out}");
}
