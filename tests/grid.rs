//! The storage core through the real `cairn` binary on real directory
//! servers: loss, corruption and missing servers.

// These tests drive the `cairn` binary, a FUSE mount or Unix signals; the
// Windows build runs the core's own tests (lib, codec, staging, vfs_model).
#![cfg(unix)]

mod common;

use common::{bytes, stderr, Home};

const SIZE: usize = 3 * 1024 * 1024 + 12345;

fn put_sample(home: &Home) -> (Vec<u8>, String) {
    let data = bytes(SIZE, 1);
    std::fs::write(home.file("src.bin"), &data).unwrap();
    let cap = home.ok(&["put", home.file("src.bin").to_str().unwrap(), "/dir/sample.bin"]);
    (data, cap.trim().to_string())
}

fn get(home: &Home, args: &[&str]) -> (std::process::Output, Option<Vec<u8>>) {
    let out_path = home.file("out.bin");
    let _ = std::fs::remove_file(&out_path);
    let out = home.cairn(&[args, &[out_path.to_str().unwrap()]].concat());
    (out, std::fs::read(&out_path).ok())
}

/// Nothing but the output file may appear next to it, even on failure.
fn assert_no_partial_files(home: &Home) {
    let stray: Vec<_> = std::fs::read_dir(home.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(stray.is_empty(), "partial files left: {stray:?}");
}

#[test]
fn put_get_ls_check_round_trip() {
    let home = Home::init(&[]);
    let (data, cap) = put_sample(&home);
    assert!(cap.starts_with("cairn:chk1:"), "{cap}");
    let (out, got) = get(&home, &["get", "/dir/sample.bin"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(got.unwrap(), data);
    assert!(home.ok(&["ls", "/dir"]).contains("sample.bin"));
    assert!(home.cairn(&["check", "/dir/sample.bin"]).status.success());
    assert_eq!(home.share_files().len(), 5, "one share per server");
}

#[test]
fn get_by_capability_needs_only_the_servers() {
    let home = Home::init(&[]);
    let (data, cap) = put_sample(&home);
    // A second home with the same config and no catalog.
    let other = tempfile::tempdir().unwrap();
    std::fs::copy(home.file("config.toml"), other.path().join("config.toml")).unwrap();
    let out_path = other.path().join("copy.bin");
    let out = home
        .command(&["get", "--cap", &cap, out_path.to_str().unwrap()])
        .env("CAIRN_HOME", other.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(out_path).unwrap(), data);
}

#[test]
fn survives_losing_the_shares_of_n_minus_k_servers() {
    let home = Home::init(&[]);
    let (data, _) = put_sample(&home);
    for (_, path) in home.share_files().into_iter().take(2) {
        std::fs::remove_file(path).unwrap();
    }
    let (out, got) = get(&home, &["get", "/dir/sample.bin"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(got.unwrap(), data);
    let check = home.cairn(&["check", "/dir/sample.bin"]);
    assert!(!check.status.success(), "check must fail when shares are missing");
}

#[test]
fn a_corrupt_share_is_skipped_and_reported() {
    let home = Home::init(&[]);
    let (data, _) = put_sample(&home);
    // Flip one byte inside the first block of each of two shares, and one byte
    // of the trailer of a third: only two shares stay intact, so even one
    // undetected corruption would show up as wrong content or a failure.
    let shares = home.share_files();
    for (i, (_, path)) in shares.iter().take(3).enumerate() {
        let mut bytes = std::fs::read(path).unwrap();
        let at = if i < 2 { 100 + i * 1000 } else { bytes.len() - 100 };
        bytes[at] ^= 0x40;
        std::fs::write(path, bytes).unwrap();
    }
    let (out, got) = get(&home, &["get", "/dir/sample.bin"]);
    assert!(!out.status.success(), "only 2 of 5 shares are intact; k = 3");
    assert!(got.is_none(), "no output file on failure");
    let msg = stderr(&out);
    assert!(msg.contains("corrupt"), "the error says what it found: {msg}");
    assert_no_partial_files(&home);

    // With just one corrupt share, the content comes back exact.
    let home = Home::init(&[]);
    let (data2, _) = put_sample(&home);
    assert_eq!(data, data2);
    let (_, path) = &home.share_files()[0];
    let mut bytes = std::fs::read(path).unwrap();
    bytes[5000] ^= 1;
    std::fs::write(path, bytes).unwrap();
    let (out, got) = get(&home, &["get", "/dir/sample.bin"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(got.unwrap(), data);
    let check = home.cairn(&["check", "--json", "/dir/sample.bin"]);
    assert!(!check.status.success());
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(report["healthy"], false);
    assert_eq!(report["recoverable"], true);
    assert_eq!(report["missing_shares"].as_array().unwrap().len(), 1);
}

#[test]
fn a_removed_server_directory_is_a_dead_server() {
    let home = Home::init(&[]);
    let (data, _) = put_sample(&home);
    std::fs::remove_dir_all(home.server_dir("s3")).unwrap();
    let (out, got) = get(&home, &["get", "/dir/sample.bin"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(got.unwrap(), data);

    // Happiness 4 still holds with four servers...
    home.ok(&["put", home.file("src.bin").to_str().unwrap(), "/dir/second.bin"]);
    // ...but not with three: the upload fails, exits non-zero, and leaves
    // no version and no visible share.
    std::fs::remove_dir_all(home.server_dir("s4")).unwrap();
    let before = home.share_files();
    let out = home.cairn(&["put", home.file("src.bin").to_str().unwrap(), "/dir/third.bin"]);
    assert!(!out.status.success());
    let msg = stderr(&out);
    assert!(
        msg.contains("happiness") && msg.contains("s3") && msg.contains("s4"),
        "{msg}"
    );
    assert!(
        msg.contains("3 of 4"),
        "the error counts the servers that took a share: {msg}"
    );
    assert_eq!(home.share_files(), before, "no share of the failed upload is visible");
    assert!(!home.ok(&["ls", "/dir"]).contains("third.bin"));
    for s in ["s1", "s2", "s5"] {
        let incoming = home.server_dir(s).join("incoming");
        let left: Vec<_> = std::fs::read_dir(incoming).unwrap().collect();
        assert!(left.is_empty(), "{s}: abandoned staging files: {left:?}");
    }
}

#[test]
fn fewer_than_k_shares_fails_clearly_without_output() {
    let home = Home::init(&[]);
    put_sample(&home);
    for (_, path) in home.share_files().into_iter().take(3) {
        std::fs::remove_file(path).unwrap();
    }
    let (out, got) = get(&home, &["get", "/dir/sample.bin"]);
    assert!(!out.status.success());
    assert!(got.is_none());
    let msg = stderr(&out);
    assert!(msg.contains("only 2 valid shares of the 3 needed"), "{msg}");
    assert_no_partial_files(&home);
}

#[test]
fn empty_and_tiny_files() {
    let home = Home::init(&[]);
    for (name, len) in [("empty", 0usize), ("one", 1), ("seg", 1 << 20)] {
        let data = bytes(len, 7);
        std::fs::write(home.file(name), &data).unwrap();
        home.ok(&["put", home.file(name).to_str().unwrap(), &format!("/{name}")]);
        let (out, got) = get(&home, &["get", &format!("/{name}")]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert_eq!(got.unwrap(), data, "{name}");
        assert!(home.cairn(&["check", &format!("/{name}")]).status.success(), "{name}");
    }
}

#[test]
fn bad_config_names_the_field() {
    let home = Home::init(&[]);
    let cfg = home.file("config.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    for (from, to, field) in [
        ("happy = 4", "happy = 7", "grid.happy"),
        ("needed = 3", "needed = 0", "grid.needed"),
        ("backend = \"dir\"", "backend = \"ftp\"", "server[0].backend"),
        ("segment_size = 1048576", "segment_size = 1000", "grid.segment_size"),
        ("total = 5", "total = 5\ncolour = 1", "colour"),
    ] {
        std::fs::write(&cfg, good.replacen(from, to, 1)).unwrap();
        let out = home.cairn(&["put", cfg.to_str().unwrap(), "/x"]);
        assert!(!out.status.success());
        let msg = stderr(&out);
        assert!(msg.contains(field), "expected {field} in: {msg}");
    }
    let out = home
        .command(&["init", "--needed", "4", "--happy", "3"])
        .env("CAIRN_HOME", home.file("fresh"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("grid.happy"), "{}", stderr(&out));
}

#[test]
fn init_flags_choose_servers_and_parameters() {
    let dirs = tempfile::tempdir().unwrap();
    let paths: Vec<String> = (0..4)
        .map(|i| dirs.path().join(format!("srv{i}")).display().to_string())
        .collect();
    let mut args = vec!["--needed", "2", "--happy", "3"];
    for p in &paths {
        args.extend(["--server-dir", p]);
    }
    let home = Home::init(&args);
    let cfg = std::fs::read_to_string(home.file("config.toml")).unwrap();
    assert!(
        cfg.contains("needed = 2") && cfg.contains("total = 4") && cfg.contains(&paths[3]),
        "{cfg}"
    );
    let data = bytes(100_000, 3);
    std::fs::write(home.file("a"), &data).unwrap();
    let cap = home.ok(&["put", home.file("a").to_str().unwrap(), "/a"]);
    assert!(cap.contains(":2:4:100000:"), "{cap}");
    for p in &paths {
        assert!(std::path::Path::new(p).join("shares").is_dir(), "{p} holds a share");
    }
}

#[test]
fn repair_puts_back_lost_and_corrupt_shares_exactly() {
    let home = Home::init(&[]);
    // s2 is down during the upload: happiness (4) holds with four servers.
    let aside = home.file("s2-aside");
    std::fs::rename(home.server_dir("s2"), &aside).unwrap();
    let (data, _) = put_sample(&home);
    assert!(!home.cairn(&["check", "/dir/sample.bin"]).status.success());
    std::fs::rename(&aside, home.server_dir("s2")).unwrap();
    // And another share is corrupted on disk.
    let (_, victim) = home.share_files()[0].clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[4242] ^= 0x10;
    std::fs::write(&victim, bytes).unwrap();

    let out = home.cairn(&["repair", "--json", "/dir/sample.bin"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reports[0]["missing"].as_array().unwrap().len(), 2, "{reports}");
    assert_eq!(reports[0]["healthy"], true);
    assert!(home.cairn(&["check", "/dir/sample.bin"]).status.success());
    assert_eq!(home.share_files().len(), 5, "one share per server again");
    // Every share is now valid on its own: any 3 of them rebuild the file.
    for (_, path) in home.share_files().into_iter().take(2) {
        std::fs::remove_file(path).unwrap();
    }
    let (out, got) = get(&home, &["get", "/dir/sample.bin"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(got.unwrap(), data);
    // `--all` repairs the two just deleted; a second pass finds nothing to do.
    let pass = |n: usize| {
        let out = home.cairn(&["repair", "--all", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r[0]["missing"].as_array().unwrap().len(), n, "{r}");
    };
    pass(2);
    pass(0);
}

/// What `strace` saw one process do: each line of its trace, in order.
fn traced(home: &Home, args: &[&str]) -> Vec<String> {
    let log = home.file("strace.log");
    let mut c = std::process::Command::new("strace");
    c.args([
        "-f",
        "-qq",
        "-y",
        "-e",
        "trace=fsync,rename,renameat,renameat2,mkdir,mkdirat",
        "-o",
    ])
    .arg(&log)
    .arg(env!("CARGO_BIN_EXE_cairn"))
    .args(args)
    .env("CAIRN_HOME", home.path());
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // A call another thread interrupted is printed in two pieces; join them
    // where it finished.
    let mut started = std::collections::HashMap::new();
    let mut lines = Vec::new();
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        let (pid, rest) = line.split_once(' ').unwrap_or((line, ""));
        if let Some(start) = rest.strip_suffix(" <unfinished ...>") {
            started.insert(pid.to_owned(), start.to_owned());
        } else if let Some((_, end)) = rest.split_once(" resumed>") {
            lines.push(format!("{pid} {}{end}", started.remove(pid).unwrap_or_default()));
        } else {
            lines.push(line.to_owned());
        }
    }
    lines
}

/// The quoted paths of a traced call, in order.
fn quoted(line: &str) -> Vec<&str> {
    line.split('"').skip(1).step_by(2).collect()
}

/// Every rename into, and every directory made in, the servers' `shares` or
/// `records` seen in `trace`, each checked to be followed by an fsync of its
/// parent directory: (renames, directories).
fn renames_and_mkdirs_synced(home: &Home, trace: &[String]) -> (usize, usize) {
    let servers = home.path().join("servers").display().to_string();
    // fsync(N</path>): the path of the directory synced.
    let synced_after = |i: usize, dir: &str| {
        trace[i + 1..]
            .iter()
            .any(|l| l.contains("fsync(") && l.contains(&format!("<{dir}>")))
    };
    let parent = |p: &str| std::path::Path::new(p).parent().unwrap().display().to_string();
    let (mut renamed, mut made) = (0, 0);
    for (i, line) in trace.iter().enumerate() {
        let paths = quoted(line);
        let durable = |p: &&&str| p.starts_with(&servers) && (p.contains("/shares") || p.contains("/records"));
        let Some(last) = paths.last().filter(durable) else {
            continue;
        };
        if line.contains("rename") && line.contains("= 0") {
            renamed += 1;
            assert!(
                synced_after(i, &parent(last)),
                "{last} renamed into place, its directory never synced"
            );
        } else if line.contains("mkdir") && line.contains("= 0") {
            made += 1;
            assert!(
                synced_after(i, &parent(last)),
                "directory {last} made, its parent never synced"
            );
        }
    }
    (renamed, made)
}

/// Finding 17 of issue 18, tried with a real tracer: a share or a pointer
/// record is durable only if the directory entries leading to it are. After
/// one is renamed into place its directory is fsynced, and so is the parent
/// of every directory made on the way (a synced file in a lost directory is
/// lost with it).
#[test]
fn new_shares_records_and_their_new_directories_are_synced_into_their_parents() {
    let home = Home::init(&[]);
    std::fs::write(home.file("src.bin"), bytes(SIZE, 4)).unwrap();
    let trace = traced(&home, &["put", home.file("src.bin").to_str().unwrap(), "/f"]);
    let (shares, dirs) = renames_and_mkdirs_synced(&home, &trace);
    assert_eq!(shares, 5, "one share per server:\n{}", trace.join("\n"));
    assert!(
        dirs >= 5,
        "the first share of each server makes its directories:\n{}",
        trace.join("\n")
    );
    // Publication: the namespace snapshot's shares, then each server's record.
    let trace = traced(&home, &["sync"]);
    let (renamed, _) = renames_and_mkdirs_synced(&home, &trace);
    let records = trace
        .iter()
        .filter(|l| l.contains("rename") && l.contains("/records"))
        .count();
    assert!(
        records >= 5 && renamed >= 10,
        "{records} records of {renamed}:\n{}",
        trace.join("\n")
    );
}

/// Devices find each other's heads by listing records (issue 20). A dir
/// server's half-written record (a dot-file its put leaves after a crash)
/// is never listed.
#[test]
fn records_are_listed_by_prefix_and_deleted_on_dir_servers() {
    let home = Home::init(&[]);
    for s in &home.config().servers {
        let records = s.path.as_ref().unwrap().join("records");
        std::fs::create_dir_all(&records).unwrap();
        std::fs::write(records.join(".log-d1-a-3.77.0123456789abcdef.tmp"), b"torn").unwrap();
    }
    common::records_are_listed_by_prefix_and_deleted(&home);
}
