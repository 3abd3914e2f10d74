//! The mount through a real FUSE mount, driven by real tools and syscalls.

// These tests drive the `cairn` binary, a FUSE mount or Unix signals; the
// Windows build runs the core's own tests (lib, codec, staging, vfs_model).
#![cfg(unix)]

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use common::{bytes, sha256_hex, stderr, Home};

/// The kernel releases a file (which seals it) just after close returns.
fn wait_for_versions(home: &Home, path: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while home.versions(path).len() < n {
        assert!(Instant::now() < deadline, "{path} never got {n} versions");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn committed(versions: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    versions.iter().filter(|v| v["state"] == "committed").collect()
}

#[test]
fn files_read_back_from_the_grid_after_the_cache_is_gone() {
    common::files_survive_losing_the_cache(&Home::empty());
}

#[test]
fn a_file_overwritten_while_its_first_version_uploads_commits_only_whole_versions() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "0"]);
    let path = mnt.file("ticket427.bin");
    let v1 = bytes(200 << 20, 427);
    std::fs::write(&path, &v1).unwrap(); // close: version 1, uploading at once
    wait_for_versions(&home, "/ticket427.bin", 1);
    let mut v2 = v1.clone();
    let patch = bytes(1 << 20, 428);
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(100 << 20)).unwrap();
        f.write_all(&patch).unwrap();
    } // close: version 2
    v2[100 << 20..(100 << 20) + patch.len()].copy_from_slice(&patch);
    home.ok(&["sync"]);
    let all = home.versions(path.to_str().unwrap());
    let done = committed(&all);
    let closed = [sha256_hex(&v1), sha256_hex(&v2)];
    assert!(!done.is_empty());
    for v in &done {
        let sha = v["sha256"].as_str().unwrap();
        assert!(
            closed.contains(&sha.to_string()),
            "committed version {} is no closed state",
            v["num"]
        );
    }
    assert_eq!(
        done.last().unwrap()["sha256"],
        closed[1],
        "the newest commit is version 2"
    );
    assert!(std::fs::read(&path).unwrap() == v2);
    assert!(mnt.unmount().success());
}

#[test]
fn twenty_saves_in_a_second_upload_at_most_two_versions() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "2"]);
    let path = mnt.file("notes.txt");
    let start = Instant::now();
    for i in 0..20 {
        std::fs::write(&path, format!("save number {i}\n").repeat(100)).unwrap();
        std::thread::sleep(Duration::from_millis(40));
    }
    assert!(start.elapsed() < Duration::from_millis(1500));
    home.ok(&["sync"]);
    let all = home.versions(path.to_str().unwrap());
    assert_eq!(all.len(), 20, "every save is a version");
    let done = committed(&all);
    assert!(done.len() <= 2, "{} versions uploaded", done.len());
    assert_eq!(
        all.iter().filter(|v| v["state"] == "superseded").count(),
        20 - done.len()
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "save number 19\n".repeat(100));
    assert!(mnt.unmount().success());
}

#[test]
fn a_file_saved_every_500_ms_still_reaches_the_grid() {
    let home = Home::init(&[]);
    // Slow servers (a test stand-in for a slow link): every share write
    // waits 100 ms, so each upload of this 4 MiB file takes longer than
    // the 500 ms between saves.
    home.slow_servers(100);
    let mnt = home.mount(&["--writeback-delay", "2"]);
    let path = mnt.file("log.bin");
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(60) {
        std::fs::write(&path, bytes(4 << 20, i)).unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let during = committed(&home.versions(path.to_str().unwrap())).len();
    assert!(during >= 2, "only {during} versions committed during a minute of saves");
    home.ok(&["sync"]);
    let all = home.versions(path.to_str().unwrap());
    assert_eq!(
        committed(&all).last().unwrap()["sha256"],
        sha256_hex(&bytes(4 << 20, i - 1))
    );
    assert!(mnt.unmount().success());
}

#[test]
fn sigterm_is_a_clean_stop_and_uploads_resume_at_the_next_mount() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "600"]);
    let data = bytes(3 << 20, 5);
    std::fs::write(mnt.file("pending.bin"), &data).unwrap();
    let status: serde_json::Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["status"]["queue"][0]["path"], "/pending.bin");
    assert!(mnt.signal(libc::SIGTERM).success(), "SIGTERM exits 0");

    let mnt = home.mount(&[]);
    home.ok(&["sync"]);
    let all = home.versions("/pending.bin");
    assert_eq!(committed(&all).len(), 1);
    assert_eq!(all[0]["sha256"], sha256_hex(&data));
    assert!(mnt.signal(libc::SIGINT).success(), "SIGINT exits 0");
}

/// Pages of the file at `path` in the kernel's page cache (mincore).
fn resident_pages(path: &std::path::Path) -> (usize, usize) {
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let page = 4096;
    let pages = len.div_ceil(page);
    // SAFETY: a shared read-only mapping of a file we hold open, unmapped
    // below; mincore writes one byte per page into a buffer that long.
    unsafe {
        use std::os::fd::AsRawFd;
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        let mut vec = vec![0u8; pages];
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
        libc::munmap(map, len);
        (vec.iter().filter(|b| *b & 1 == 1).count(), pages)
    }
}

/// Issue 23: the kernel keeps what a writer wrote in its page cache (it
/// drops a file's pages only when told: a restore or another machine's
/// change), so a read just after a write is served from memory; `cairn
/// status` says which data path is in use.
#[test]
fn a_file_just_written_stays_in_the_page_cache_and_status_shows_the_data_path() {
    let home = Home::empty();
    let mnt = home.mount(&[]);
    let path = mnt.file("fresh.bin");
    let data = bytes(4 << 20, 23);
    std::fs::write(&path, &data).unwrap();
    let (resident, pages) = resident_pages(&path);
    assert_eq!(resident, pages, "pages of a file just written in the page cache");
    assert_eq!(std::fs::read(&path).unwrap(), data);

    let status: serde_json::Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    let io = &status["status"]["io_path"];
    assert_eq!(io["page_cache"], "kept until changed elsewhere", "{status}");
    // Raising the read-ahead writes the mount's sysfs entry: root only.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(io["read_ahead_kib"], 1024, "{status}");
    } else {
        assert!(
            io["read_ahead_note"].as_str().unwrap().contains("needs root"),
            "{status}"
        );
    }
    let text = home.ok(&["status"]);
    assert!(text.contains("page cache: kept until changed elsewhere"), "{text}");
    assert!(mnt.unmount().success());
}

#[test]
fn restore_makes_an_old_version_the_newest_without_uploading() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "0"]);
    let path = mnt.file("doc.txt");
    for i in 1..=3 {
        std::fs::write(&path, format!("draft {i}\n")).unwrap();
        home.ok(&["sync"]);
    }
    // Read once, so the kernel holds the newest content in its page cache.
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "draft 3\n");
    let out = home.ok(&["restore", path.to_str().unwrap(), "--version", "1"]);
    assert!(out.contains("restored as version 4"), "{out}");
    // At once: the kernel kept "draft 3\n" (same size) in its page cache,
    // and restore told it to forget.
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "draft 1\n");
    let all = home.versions("/doc.txt");
    assert_eq!(all.len(), 4);
    assert_eq!(all[3]["state"], "committed");
    assert_eq!(
        all[3]["cap"], all[0]["cap"],
        "restored by capability, not uploaded again"
    );
    let state = xattr(&path, "user.cairn.state");
    assert_eq!(state, "committed");
    // A small file is uploaded in a pack, and named by its range of it.
    assert!(xattr(&path, "user.cairn.cap").starts_with("cairn:pack2:"));
    assert!(mnt.unmount().success());
}

fn xattr(path: &std::path::Path, name: &str) -> String {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer we own.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(len >= 0, "getxattr {name}: {}", std::io::Error::last_os_error());
    String::from_utf8(buf[..len as usize].to_vec()).unwrap()
}

#[test]
fn posix_namespace_operations_behave_as_on_a_local_disk() {
    use std::os::unix::fs::PermissionsExt;
    let home = Home::empty();
    let mnt = home.mount(&[]);
    let p = |n: &str| mnt.file(n);
    std::fs::create_dir(p("a")).unwrap();
    std::fs::write(p("a/x"), b"one").unwrap();
    std::fs::write(p("a/y"), b"two").unwrap();
    // rename over an existing file replaces it
    std::fs::rename(p("a/x"), p("a/y")).unwrap();
    assert_eq!(std::fs::read(p("a/y")).unwrap(), b"one");
    assert!(!p("a/x").exists());
    // rename of a directory, and over an empty directory
    std::fs::create_dir(p("b")).unwrap();
    std::fs::rename(p("a"), p("b")).unwrap();
    assert_eq!(std::fs::read(p("b/y")).unwrap(), b"one");
    // rmdir of a non-empty directory fails
    let err = std::fs::remove_dir(p("b")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
    // chmod and utimens
    std::fs::set_permissions(p("b/y"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(std::fs::metadata(p("b/y")).unwrap().permissions().mode() & 0o777, 0o600);
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(p("b/y"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    assert_eq!(std::fs::metadata(p("b/y")).unwrap().modified().unwrap(), t);
    // truncate by path, growing and shrinking
    std::fs::File::options()
        .write(true)
        .open(p("b/y"))
        .unwrap()
        .set_len(10)
        .unwrap();
    assert_eq!(std::fs::read(p("b/y")).unwrap(), b"one\0\0\0\0\0\0\0");
    std::fs::File::options()
        .write(true)
        .open(p("b/y"))
        .unwrap()
        .set_len(2)
        .unwrap();
    assert_eq!(std::fs::read(p("b/y")).unwrap(), b"on");
    // O_APPEND
    let mut f = std::fs::OpenOptions::new().append(true).open(p("b/y")).unwrap();
    f.write_all(b"+more").unwrap();
    drop(f);
    assert_eq!(std::fs::read(p("b/y")).unwrap(), b"on+more");
    // an unlinked file stays readable through its open handle
    let mut keep = std::fs::File::open(p("b/y")).unwrap();
    std::fs::remove_file(p("b/y")).unwrap();
    let mut back = String::new();
    std::io::Read::read_to_string(&mut keep, &mut back).unwrap();
    assert_eq!(back, "on+more");
    drop(keep);
    std::fs::remove_dir(p("b")).unwrap();
    assert_eq!(std::fs::read_dir(mnt.path()).unwrap().count(), 0);
    // (Hard links: hard_links_are_names_of_one_file_everywhere.)
    assert!(mnt.unmount().success());
}

/// Bytes of chunk files cached for versions (unique inodes).
fn cached_bytes(home: &Home) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    common::walk(&home.path().join("cache/versions"), &mut |p| {
        // Eviction may remove a chunk between the listing and this look.
        if let Ok(m) = std::fs::metadata(p) {
            if seen.insert(m.ino()) {
                total += m.len();
            }
        }
    });
    total
}

#[test]
fn an_uncached_file_streams_and_the_cache_keeps_its_bound() {
    use std::io::Read;
    let home = Home::empty();
    let mnt = home.mount(&["--cache-size", "16"]);
    let data = bytes(64 << 20, 9);
    std::fs::write(mnt.file("big"), &data).unwrap();
    home.ok(&["sync"]);
    assert!(mnt.unmount().success());
    std::fs::remove_dir_all(home.path().join("cache")).unwrap();

    let mnt = home.mount(&["--cache-size", "16"]);
    let mut f = std::fs::File::open(mnt.file("big")).unwrap();
    let mut first = vec![0u8; 4096];
    f.read_exact(&mut first).unwrap();
    assert_eq!(first, data[..4096]);
    // Only the first segments (plus read-ahead) were fetched, not 64 MiB.
    let fetched = cached_bytes(&home);
    assert!(fetched <= 8 << 20, "{fetched} bytes cached after reading 4 KiB");
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).unwrap();
    assert!(rest == data[4096..]);
    // Streaming from the grid keeps the daemon small: each chunk is read
    // ahead once, not once per read that wants it (which held 1.5 GB for a
    // 1 GiB file before that was fixed).
    let status = std::fs::read_to_string(format!("/proc/{}/status", mnt.pid())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        hwm_kib < 64 << 10,
        "daemon peak RSS {} MiB reading a 64 MiB file",
        hwm_kib >> 10
    );
    // The eviction pass (every 2 s) brings clean data under 16 MiB.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cached_bytes(&home) > 16 << 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        cached_bytes(&home) <= 16 << 20,
        "cache over its bound: {}",
        cached_bytes(&home)
    );
    // And evicted data reads back from the grid.
    assert!(std::fs::read(mnt.file("big")).unwrap() == data);
    drop(f);
    assert!(mnt.unmount().success());
}

#[test]
fn staged_data_is_never_evicted() {
    let home = Home::empty();
    let mnt = home.mount(&["--cache-size", "1", "--writeback-delay", "600"]);
    let data = bytes(8 << 20, 3);
    std::fs::write(mnt.file("staged"), &data).unwrap();
    std::thread::sleep(Duration::from_secs(3)); // at least one eviction pass
    assert!(cached_bytes(&home) >= 8 << 20);
    assert!(std::fs::read(mnt.file("staged")).unwrap() == data);
    assert!(mnt.unmount().success());
}

#[test]
fn a_small_edit_of_a_large_file_stages_one_chunk() {
    use std::os::unix::fs::FileExt;
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "600"]);
    let path = mnt.file("big");
    std::fs::write(&path, bytes(64 << 20, 1)).unwrap();
    wait_for_versions(&home, "/big", 1);
    let before = cached_bytes(&home);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[7u8; 4096], 30 << 20).unwrap();
    drop(f);
    wait_for_versions(&home, "/big", 2);
    let extra = cached_bytes(&home) - before;
    // One chunk, the new version's sums (32 bytes a chunk) and its layer
    // (naming the base for the 63 others, in a few hundred bytes).
    assert!(
        extra <= (1 << 20) + 64 * 32 + 1024,
        "a 4 KiB edit added {extra} bytes of staging"
    );
    let all = home.versions("/big");
    assert_eq!(all.len(), 2);
    assert!(mnt.unmount().success());
}

#[test]
fn read_only_mounts_refuse_writes() {
    let home = Home::empty();
    let mnt = home.mount(&[]);
    std::fs::write(mnt.file("f"), b"x").unwrap();
    assert!(mnt.unmount().success());
    let mnt = home.mount(&["--read-only"]);
    assert_eq!(std::fs::read(mnt.file("f")).unwrap(), b"x");
    let err = std::fs::write(mnt.file("g"), b"y").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert!(mnt.unmount().success());
}

#[test]
fn a_shell_redirect_makes_one_version() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "600"]);
    let path = mnt.file("x");
    let ok = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("echo hi > '{}'", path.display()))
        .status()
        .unwrap()
        .success();
    assert!(ok);
    home.ok(&["sync"]);
    let all = home.versions("/x");
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["size"], 3);
    assert!(mnt.unmount().success());
}

#[test]
fn a_fork_while_a_file_is_written_does_not_seal_a_partial_version() {
    // Another thread forking and exec'ing closes an inherited copy of the
    // writer's descriptor, which the kernel reports as a flush of the file.
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "600"]);
    let path = mnt.file("w.bin");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forker = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::process::Command::new("true").status().unwrap();
                n += 1;
            }
            n
        })
    };
    let data = bytes(8 << 20, 8);
    {
        let mut f = std::fs::File::create(&path).unwrap();
        for chunk in data.chunks(1 << 20) {
            f.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(forker.join().unwrap() > 0);
    home.ok(&["sync"]);
    let all = home.versions("/w.bin");
    assert_eq!(all.len(), 1, "partial versions were sealed: {all:?}");
    assert_eq!(all[0]["size"], 8 << 20);
    assert!(mnt.unmount().success());
}

#[test]
fn the_mount_goes_away_if_the_daemon_is_killed() {
    let home = Home::empty();
    let mnt = home.mount(&[]);
    let path = mnt.path().to_owned();
    let status = mnt.signal(libc::SIGKILL);
    assert!(!status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while common::is_mounted(&path) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!common::is_mounted(&path), "auto-unmount did not remove the mount");
}

#[test]
fn a_failed_upload_is_retried_until_the_grid_takes_it() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "0"]);
    // Two of five servers gone: happiness (4) cannot hold.
    home.servers_away(&["s1", "s2"]);
    let data = bytes(2 << 20, 77);
    std::fs::write(mnt.file("f"), &data).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let entry = loop {
        let status: serde_json::Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
        let e = status["status"]["queue"][0].clone();
        if e["attempts"].as_u64().unwrap_or(0) >= 1 || Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(entry["attempts"].as_u64().unwrap() >= 1, "{entry}");
    assert!(entry["last_error"].as_str().unwrap().contains("happiness"), "{entry}");
    let all = home.versions("/f");
    assert_eq!(
        all.last().unwrap()["state"],
        "staged",
        "not committed without happiness: {all:?}"
    );
    // `sync` with a bound gives up, saying why, and loses nothing.
    let out = home.cairn(&["sync", "--timeout", "1"]);
    assert!(!out.status.success(), "sync returned while nothing could commit");
    assert!(
        stderr(&out).contains("within 1 s") && stderr(&out).contains("happiness"),
        "{}",
        stderr(&out)
    );
    // The servers come back; the retry (with backoff) commits it.
    home.servers_back(&["s1", "s2"]);
    home.ok(&["sync"]);
    let all = home.versions("/f");
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["state"], "committed");
    assert_eq!(all[0]["sha256"], sha256_hex(&data));
    // No abandoned staging file is left on the servers that took part.
    for s in ["s3", "s4", "s5"] {
        let left = std::fs::read_dir(home.server_dir(s).join("incoming")).unwrap().count();
        assert_eq!(left, 0, "{s}: staging files left");
    }
    assert!(mnt.unmount().success());
}

#[test]
fn writing_over_a_file_needs_none_of_its_old_bytes() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "0"]);
    for name in ["f", "g"] {
        std::fs::write(mnt.file(name), bytes(300_000, 5)).unwrap();
    }
    home.ok(&["sync"]);
    assert!(mnt.unmount().success());
    // Only the grid has the old bytes, and three of five servers are gone:
    // they cannot be read, yet `> f` (open with O_TRUNC) needs none of them.
    std::fs::remove_dir_all(home.file("cache")).unwrap();
    home.servers_away(&["s1", "s2", "s3"]);
    let mnt = home.mount(&["--writeback-delay", "0"]);
    assert!(std::fs::read(mnt.file("g")).is_err(), "g read with 2 of 5 servers");
    std::fs::write(mnt.file("f"), b"new").unwrap();
    assert_eq!(std::fs::read(mnt.file("f")).unwrap(), b"new");
    home.servers_back(&["s1", "s2", "s3"]);
    home.ok(&["sync"]);
    assert_eq!(home.versions("/f").len(), 2);
    assert!(mnt.unmount().success());
    assert_eq!(home.get_bytes("/f").unwrap(), b"new");
}

#[test]
fn a_rename_never_uploads_again() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "0"]);
    std::fs::create_dir(mnt.file("dir")).unwrap();
    std::fs::write(mnt.file("dir/a"), bytes(1 << 20, 1)).unwrap();
    home.ok(&["sync"]);
    let shares_before = home.shares_of("/dir/a");
    assert_eq!(shares_before.len(), 5);
    std::fs::rename(mnt.file("dir/a"), mnt.file("dir/b")).unwrap();
    std::fs::rename(mnt.file("dir"), mnt.file("moved")).unwrap();
    home.ok(&["sync"]);
    let all = home.versions("/moved/b");
    assert_eq!(all.len(), 1, "the rename made no version");
    assert_eq!(home.shares_of("/moved/b"), shares_before, "the rename wrote no share");
    assert!(mnt.unmount().success());
}

/// Editors save by writing a new file and renaming it over the old one
/// (vim, gedit), Word by a chain of renames (temp written, original renamed
/// away, temp renamed onto the name, old deleted). Either way `cairn
/// versions` of the name must show the whole history, oldest first.
#[test]
fn a_save_by_rename_continues_the_files_history() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "0"]);
    std::fs::write(mnt.file("doc.txt"), b"one").unwrap();
    home.ok(&["sync"]);
    // Replace by rename.
    std::fs::write(mnt.file(".doc.txt.swp"), b"two").unwrap();
    std::fs::rename(mnt.file(".doc.txt.swp"), mnt.file("doc.txt")).unwrap();
    home.ok(&["sync"]);
    // Word's chain.
    std::fs::write(mnt.file("~WRD0001.tmp"), b"three").unwrap();
    std::fs::rename(mnt.file("doc.txt"), mnt.file("~WRL0001.tmp")).unwrap();
    std::fs::rename(mnt.file("~WRD0001.tmp"), mnt.file("doc.txt")).unwrap();
    std::fs::remove_file(mnt.file("~WRL0001.tmp")).unwrap();
    home.ok(&["sync"]);
    let versions = home.versions("/doc.txt");
    let shas: Vec<&str> = versions.iter().map(|v| v["sha256"].as_str().unwrap()).collect();
    let want: Vec<String> = [&b"one"[..], b"two", b"three"].iter().map(|c| sha256_hex(c)).collect();
    assert_eq!(shas, want, "{versions:?}");
    assert_eq!(std::fs::read(mnt.file("doc.txt")).unwrap(), b"three");
    // The oldest, carried over twice, restores.
    let oldest = versions[0]["num"].as_i64().unwrap().to_string();
    home.ok(&["restore", "/doc.txt", "--version", &oldest]);
    assert_eq!(std::fs::read(mnt.file("doc.txt")).unwrap(), b"one");
    // An unrelated new file on a name left long ago inherits nothing: the
    // deleted-file test below covers a name freed by unlink.
    assert!(mnt.unmount().success());
}

#[test]
fn a_new_file_never_inherits_a_deleted_files_versions() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "600"]);
    std::fs::write(mnt.file("a"), b"first file").unwrap();
    home.ok(&["sync"]);
    std::fs::remove_file(mnt.file("a")).unwrap();
    // The same name, and in a naive store the same inode number, again.
    let f = std::fs::File::create(mnt.file("b")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 0);
    assert_eq!(std::fs::read(mnt.file("b")).unwrap(), b"");
    drop(f);
    home.ok(&["sync"]);
    let v: serde_json::Value = serde_json::from_str(&home.ok(&["versions", "--json", "/b"])).unwrap();
    assert_eq!(v["versions"].as_array().unwrap().len(), 1, "{v}");
    assert!(mnt.unmount().success());
}

fn nlink(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap().nlink()
}

fn shas(home: &Home, path: &str) -> Vec<String> {
    let versions = home.versions(path);
    versions
        .iter()
        .map(|v| v["sha256"].as_str().unwrap().to_string())
        .collect()
}

/// Hard links as on ext4: one node with several names across directories,
/// each name reading and writing the same content and history, st_nlink
/// right after every change, a save-by-rename over one name leaving the
/// other with the old content, and link counts surviving kill -9.
#[test]
fn hard_links_are_names_of_one_file_everywhere() {
    use std::os::unix::fs::MetadataExt;
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "0"]);
    for d in ["a", "b"] {
        std::fs::create_dir(mnt.file(d)).unwrap();
    }
    std::fs::write(mnt.file("a/f"), b"one").unwrap();
    home.ok(&["sync"]);
    std::fs::hard_link(mnt.file("a/f"), mnt.file("b/g")).unwrap();
    std::fs::hard_link(mnt.file("b/g"), mnt.file("a/h")).unwrap();
    let ino = std::fs::metadata(mnt.file("a/f")).unwrap().ino();
    for name in ["a/f", "b/g", "a/h"] {
        assert_eq!(nlink(&mnt.file(name)), 3, "{name}");
        assert_eq!(std::fs::metadata(mnt.file(name)).unwrap().ino(), ino, "{name}");
    }
    // Listings show each name with the node's number and link count.
    let listed: Vec<(String, u64)> = std::fs::read_dir(mnt.file("a"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            use std::os::unix::fs::DirEntryExt;
            (e.file_name().into_string().unwrap(), e.ino())
        })
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().all(|(_, i)| *i == ino), "{listed:?}");
    let ls = std::process::Command::new("ls")
        .arg("-l")
        .arg(mnt.file("b"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ls.stdout).contains(" 3 "), "{ls:?}");
    // A write through one name is the content and a version of every name.
    std::fs::write(mnt.file("b/g"), b"two").unwrap();
    home.ok(&["sync"]);
    assert_eq!(std::fs::read(mnt.file("a/f")).unwrap(), b"two");
    let history = vec![sha256_hex(b"one"), sha256_hex(b"two")];
    for name in ["/a/f", "/b/g", "/a/h"] {
        assert_eq!(shas(&home, name), history, "{name}");
    }
    // Linking a directory or onto a taken name fails as on ext4.
    let err = std::fs::hard_link(mnt.file("a"), mnt.file("b/dir")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    let err = std::fs::hard_link(mnt.file("a/f"), mnt.file("b/g")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    // A rename between two names of one file changes nothing.
    std::fs::rename(mnt.file("a/h"), mnt.file("a/f")).unwrap();
    assert!(mnt.file("a/h").exists() && mnt.file("a/f").exists());
    // Unlinking the first name leaves the others, content and history.
    std::fs::remove_file(mnt.file("a/f")).unwrap();
    assert_eq!(nlink(&mnt.file("b/g")), 2);
    assert_eq!(std::fs::read(mnt.file("a/h")).unwrap(), b"two");
    assert_eq!(shas(&home, "/a/h"), history);
    // A save by rename over one name: that name gets the new file (with
    // the history the name had), the other keeps the old content.
    std::fs::write(mnt.file("b/.g.swp"), b"three").unwrap();
    std::fs::rename(mnt.file("b/.g.swp"), mnt.file("b/g")).unwrap();
    home.ok(&["sync"]);
    assert_eq!(std::fs::read(mnt.file("b/g")).unwrap(), b"three");
    assert_eq!(std::fs::read(mnt.file("a/h")).unwrap(), b"two");
    assert_eq!((nlink(&mnt.file("b/g")), nlink(&mnt.file("a/h"))), (1, 1));
    assert_eq!(shas(&home, "/a/h"), history);
    assert_eq!(
        shas(&home, "/b/g"),
        [history.clone(), vec![sha256_hex(b"three")]].concat()
    );
    // Link counts are in the catalog when link(2) returns: kill -9.
    std::fs::hard_link(mnt.file("a/h"), mnt.file("b/k")).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(mnt.signal(libc::SIGKILL).signal(), Some(libc::SIGKILL));
    let mnt = home.mount(&["--writeback-delay", "0"]);
    assert_eq!((nlink(&mnt.file("a/h")), nlink(&mnt.file("b/k"))), (2, 2));
    assert_eq!(std::fs::read(mnt.file("b/k")).unwrap(), b"two");
    // The last name takes the file with it.
    std::fs::remove_file(mnt.file("a/h")).unwrap();
    assert_eq!(nlink(&mnt.file("b/k")), 1);
    std::fs::remove_file(mnt.file("b/k")).unwrap();
    assert!(home.cairn(&["versions", "/b/k"]).status.code() != Some(0));
    assert_eq!(std::fs::read_dir(mnt.file("a")).unwrap().count(), 0);
    assert!(mnt.unmount().success());
}

#[test]
fn shares_a_server_missed_are_repaired_when_it_comes_back() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "0", "--repair-interval", "0.5"]);
    let aside = home.path().join("s5-aside");
    std::fs::rename(home.server_dir("s5"), &aside).unwrap();
    std::fs::write(mnt.file("f"), bytes(2 << 20, 55)).unwrap();
    home.ok(&["sync"]);
    let cap = home.versions("/f")[0]["cap"].as_str().unwrap().to_string();
    assert!(
        !home.cairn(&["check", "--cap", &cap]).status.success(),
        "committed with 4 of 5 shares"
    );
    std::fs::rename(&aside, home.server_dir("s5")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !home.cairn(&["check", "--cap", &cap]).status.success() {
        assert!(Instant::now() < deadline, "the missing share was never repaired");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(mnt.unmount().success());
}

#[test]
fn files_over_4_gib_and_special_files_work_through_the_mount() {
    use std::os::unix::fs::{FileExt, FileTypeExt};
    let home = Home::empty();
    // A long write-back delay: this test is about the mount, not a 5 GiB upload.
    let mnt = home.mount(&["--writeback-delay", "3600"]);
    let path = mnt.file("big");
    let f = std::fs::File::create(&path).unwrap();
    f.write_all_at(b"past 4 GiB", 5 << 30).unwrap();
    drop(f);
    let f = std::fs::File::open(&path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), (5 << 30) + 10);
    let mut buf = [1u8; 10];
    f.read_exact_at(&mut buf, 5 << 30).unwrap();
    assert_eq!(&buf, b"past 4 GiB");
    f.read_exact_at(&mut buf, 4 << 30).unwrap();
    assert_eq!(buf, [0; 10], "the hole reads as zeros");
    drop(f);

    let fifo = std::ffi::CString::new(mnt.file("pipe").to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let meta = std::fs::symlink_metadata(mnt.file("pipe")).unwrap();
    assert!(meta.file_type().is_fifo());
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o640
    );
    assert!(mnt.unmount().success());
}
