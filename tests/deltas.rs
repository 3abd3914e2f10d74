#![cfg(unix)]
//! Versions that cost what changed (issue 21): an upload sends only the
//! segments that differ from the file's previous version, plus a manifest,
//! and every version reads back from the grid alone.

mod common;

use std::os::unix::fs::FileExt;

use common::Home;
use rand::{Rng, SeedableRng};

const MIB: usize = 1 << 20;

/// Bytes of every share file on every server.
fn grid_bytes(home: &Home) -> u64 {
    home.share_files()
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum()
}

fn pwrite(path: &std::path::Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// Every version of `path` read back with `cairn get` (from the grid: the
/// command line has no cache) against the SHA-256 it is listed with and
/// against `expected` (by version number).
fn every_version_reads_back(home: &Home, path: &str, expected: &std::collections::BTreeMap<i64, String>) {
    let out = home.file("read-back");
    for (num, sha) in expected {
        let got = home.cairn(&["get", path, out.to_str().unwrap(), "--version", &num.to_string()]);
        assert!(got.status.success(), "version {num}: {}", common::stderr(&got));
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&common::sha256_hex(&bytes), sha, "version {num}");
    }
}

#[test]
fn a_4k_edit_of_a_large_file_adds_two_segments_and_a_manifest() {
    let home = Home::init(&[]);
    let m = home.mount(&["--writeback-delay", "0"]);
    let mut data = common::bytes(32 * MIB, 1);
    std::fs::write(m.file("big"), &data).unwrap();
    home.ok(&["sync"]);
    let before = grid_bytes(&home);
    assert!(before >= (32 * MIB * 5 / 3) as u64);

    // 4 KiB across the boundary of segments 4 and 5.
    let at = 5 * MIB - 2048;
    pwrite(&m.file("big"), at as u64, &[7; 4096]);
    data[at..at + 4096].fill(7);
    home.ok(&["sync"]);
    let added = grid_bytes(&home) - before;
    // Two segments on a 3-of-5 grid, and a manifest of 32 segments.
    let goal = (2 * MIB * 5 / 3 + 64 * 1024) as u64;
    assert!(added <= goal, "added {added} bytes, goal {goal}");

    // Nothing changed but the time: no segment is sent again.
    let before = grid_bytes(&home);
    pwrite(&m.file("big"), 0, &data[..1]);
    home.ok(&["sync"]);
    assert!(grid_bytes(&home) - before < 64 * 1024);
    let versions = home.versions("/big");
    assert!(m.unmount().success());

    std::fs::remove_dir_all(home.path().join("cache")).unwrap();
    assert_eq!(versions.len(), 3);
    assert_eq!(versions[1]["sha256"].as_str().unwrap(), common::sha256_hex(&data));
    let expected = versions
        .iter()
        .map(|v| (v["num"].as_i64().unwrap(), v["sha256"].as_str().unwrap().to_string()))
        .collect();
    every_version_reads_back(&home, "/big", &expected);
    assert!(home.cairn(&["check", "/big"]).status.success());
    // And through a mount with an empty cache.
    let m = home.mount(&[]);
    assert!(std::fs::read(m.file("big")).unwrap() == data);
    assert!(m.unmount().success());

    // A new machine recovering the drive reads it too.
    let other = Home::empty();
    let root = other.file("root.txt");
    std::fs::write(&root, home.root_cap()).unwrap();
    let config = home.file("config.toml");
    other.ok(&[
        "recover",
        "--root-cap-file",
        root.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(other.get_bytes("/big").unwrap() == data);
}

/// Bytes of the chunk files in the staging cache (what it fetched or
/// wrote), each file once whatever its hard links.
fn cached_chunk_bytes(home: &Home) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for area in ["versions", "work"] {
        let Ok(dirs) = std::fs::read_dir(home.path().join("cache").join(area)) else {
            continue;
        };
        for dir in dirs.flatten().filter(|d| d.path().is_dir()) {
            for chunk in std::fs::read_dir(dir.path()).unwrap().flatten() {
                let meta = chunk.metadata().unwrap();
                if chunk.file_name().to_string_lossy().parse::<u64>().is_ok() && seen.insert(meta.ino()) {
                    total += meta.len();
                }
            }
        }
    }
    total
}

/// An edit of a file the cache does not hold fetches the segments it
/// reads or changes, not the file; its upload sends those segments and
/// takes the rest (and their hashes) from the previous version on the
/// grid. With no whole file at hand the version has no whole SHA-256, and
/// every segment is still checked by its own.
#[test]
fn an_edit_of_a_file_not_in_the_cache_fetches_only_the_segments_it_changes() {
    let home = Home::init(&[]);
    let m = home.mount(&["--writeback-delay", "0"]);
    let mut data = common::bytes(32 * MIB + 1000, 3);
    std::fs::write(m.file("big"), &data).unwrap();
    home.ok(&["sync"]);
    assert!(m.unmount().success());
    std::fs::remove_dir_all(home.path().join("cache")).unwrap();

    let m = home.mount(&["--writeback-delay", "0"]);
    let grid_before = grid_bytes(&home);
    // 4 KiB across the boundary of segments 4 and 5, then 100 bytes in
    // segment 20 (over the first edit's version, itself not all cached).
    let at = 5 * MIB - 2048;
    pwrite(&m.file("big"), at as u64, &[9; 4096]);
    data[at..at + 4096].fill(9);
    home.ok(&["sync"]);
    pwrite(&m.file("big"), (20 * MIB + 7) as u64, &[5; 100]);
    data[20 * MIB + 7..][..100].fill(5);
    home.ok(&["sync"]);
    // An append into the last, short segment copies its 1000 bytes first.
    let mut f = std::fs::OpenOptions::new().append(true).open(m.file("big")).unwrap();
    std::io::Write::write_all(&mut f, b"appended").unwrap();
    drop(f);
    data.extend_from_slice(b"appended");
    home.ok(&["sync"]);
    // Segments 4, 5 and 20, each fetched once and copied on write once,
    // and the last one's few bytes.
    let cached = cached_chunk_bytes(&home);
    assert!(cached <= (6 * MIB + 4096) as u64, "the edits cached {cached} bytes");
    let added = grid_bytes(&home) - grid_before;
    let goal = (3 * MIB * 5 / 3 + 3 * 64 * 1024) as u64;
    assert!(added <= goal, "added {added} bytes, goal {goal}");
    let versions = home.versions("/big");
    assert_eq!(versions.last().unwrap()["sha256"].as_str(), Some(""), "{versions:?}");
    assert!(std::fs::read(m.file("big")).unwrap() == data);
    assert!(m.unmount().success());

    std::fs::remove_dir_all(home.path().join("cache")).unwrap();
    assert!(home.get_bytes("/big").unwrap() == data);
    assert!(home.cairn(&["check", "/big"]).status.success());
}

/// 100 random edits of a 64 MiB file (overwrites, appends, truncations),
/// each committed as its own version: every version reads back byte-exact
/// from the grid alone. Then gc with retention of the newest half frees
/// the segments only older versions held and keeps every retained
/// version readable.
#[test]
fn random_edits_of_a_64_mib_file_read_back_and_gc_keeps_what_is_shared() {
    let seed: u64 = std::env::var("CAIRN_DELTA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("CAIRN_DELTA_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let home = Home::init(&[]);
    let m = home.mount(&["--writeback-delay", "0"]);
    let path = m.file("disk.img");
    let mut data = common::bytes(64 * MIB, seed);
    std::fs::write(&path, &data).unwrap();
    home.ok(&["sync"]);
    let whole = grid_bytes(&home);
    let mut shas = vec![common::sha256_hex(&data)];
    // Two edits of the first segment in a row: the first of them is used
    // by no later version, so gc surely has one to free (random edits alone
    // may leave every old version used by a kept one, and gc keeps a used
    // version whole with all it uses: a few seeds in a hundred did).
    for round in 0..2u8 {
        let bytes = vec![round; 4096];
        pwrite(&path, 100, &bytes);
        data[100..100 + 4096].copy_from_slice(&bytes);
        home.ok(&["sync"]);
        shas.push(common::sha256_hex(&data));
    }
    for _ in 0..98 {
        match rng.gen_range(0..10) {
            0 => {
                let grow = rng.gen_range(1..2 * MIB);
                let more = common::bytes(grow, rng.gen());
                pwrite(&path, data.len() as u64, &more);
                data.extend_from_slice(&more);
            }
            1 => {
                let len = data.len() - rng.gen_range(1..MIB);
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(len as u64)
                    .unwrap();
                data.truncate(len);
            }
            _ => {
                let len = rng.gen_range(1..16 * 1024);
                let at = rng.gen_range(0..data.len() - len);
                let bytes = common::bytes(len, rng.gen());
                pwrite(&path, at as u64, &bytes);
                data[at..at + len].copy_from_slice(&bytes);
            }
        }
        home.ok(&["sync"]);
        shas.push(common::sha256_hex(&data));
    }
    let edits = grid_bytes(&home) - whole;
    // Whole versions would have added 100 times the file.
    assert!(edits < whole * 10, "100 edits added {edits} bytes; the file is {whole}");
    let versions = home.versions("/disk.img");
    assert!(m.unmount().success());
    std::fs::remove_dir_all(home.path().join("cache")).unwrap();

    let listed: Vec<String> = versions
        .iter()
        .map(|v| v["sha256"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, shas, "one version per edit, in order (seed {seed})");
    let nums: Vec<i64> = versions.iter().map(|v| v["num"].as_i64().unwrap()).collect();
    let all = nums.iter().copied().zip(shas.iter().cloned()).collect();
    every_version_reads_back(&home, "/disk.img", &all);

    home.edit_config(|c| {
        c.retention.keep_versions = 50;
        c.retention.keep_days = 0;
    });
    let before = grid_bytes(&home);
    let report: serde_json::Value = serde_json::from_str(&home.ok(&["gc", "--json"])).unwrap();
    let collected = report["plan"]["versions"].as_array().unwrap().len();
    let freed = before - grid_bytes(&home);
    assert!(
        collected > 0 && freed > 0,
        "gc freed nothing (seed {seed}): {report}; versions: {:?}",
        home.versions("/disk.img")
    );
    // Old versions whose own segments a kept version still uses stay.
    let m = home.mount(&[]);
    let after = home.versions("/disk.img");
    assert!(m.unmount().success());
    let kept: std::collections::BTreeMap<i64, String> = after
        .iter()
        .filter(|v| v["state"] == "committed")
        .map(|v| (v["num"].as_i64().unwrap(), v["sha256"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(kept.len(), after.len() - collected, "{after:?}");
    for (num, sha) in nums.iter().zip(&shas).skip(51) {
        assert_eq!(kept.get(num), Some(sha), "version {num} is among the newest 50");
    }
    every_version_reads_back(&home, "/disk.img", &kept);
    assert!(home.cairn(&["check", "/disk.img"]).status.success());
    // What is left is what the kept versions use: a second gc finds nothing.
    let again: serde_json::Value = serde_json::from_str(&home.ok(&["gc", "--json"])).unwrap();
    assert_eq!(again["plan"]["caps"].as_array().unwrap().len(), 0, "{again}");
}

/// A file stored whole by an older cairn (a `chk1` version, as `cairn put`
/// still writes) is edited through the mount: the edit is sent whole once,
/// as a mapped version, and both read back. A mapped version whose
/// earlier object is gone from every server is an error, never other bytes.
#[test]
fn a_whole_version_edited_becomes_mapped_and_a_lost_segment_object_is_an_error() {
    let home = Home::init(&[]);
    let mut data = common::bytes(3 * MIB + 100, 9);
    let local = home.file("local");
    std::fs::write(&local, &data).unwrap();
    home.ok(&["put", local.to_str().unwrap(), "/old.bin"]);
    let m = home.mount(&["--writeback-delay", "0"]);
    pwrite(&m.file("old.bin"), 10, b"edited");
    data[10..16].copy_from_slice(b"edited");
    home.ok(&["sync"]);
    let caps: Vec<String> = home
        .versions("/old.bin")
        .iter()
        .map(|v| v["cap"].as_str().unwrap().to_string())
        .collect();
    assert!(
        caps[0].starts_with("cairn:chk1:") && caps[1].starts_with("cairn:map1:"),
        "{caps:?}"
    );
    // One more edit takes the other segments from the first mapped version.
    pwrite(&m.file("old.bin"), (2 * MIB) as u64, b"again");
    data[2 * MIB..2 * MIB + 5].copy_from_slice(b"again");
    home.ok(&["sync"]);
    assert!(m.unmount().success());
    assert!(home.get_bytes("/old.bin").unwrap() == data);

    // The first mapped version's own object holds segments 0 and 1 of the
    // newest: with its shares gone everywhere, the newest cannot be read.
    let shares = home.shares_of("/old.bin");
    let first_mapped: cairn::codec::FileCap = caps[1].parse().unwrap();
    let si = first_mapped.stored().storage_index().to_string();
    let mut gone = 0;
    for p in shares.iter().filter(|p| p.to_string_lossy().contains(&si)) {
        std::fs::remove_file(p).unwrap();
        gone += 1;
    }
    assert!(gone >= 3, "{gone} shares of {si} among {shares:?}");
    let err = home.get_bytes("/old.bin").unwrap_err();
    assert!(err.contains("valid shares"), "{err}");
    assert!(!home.cairn(&["check", "/old.bin"]).status.success());
}
