//! What other local users can and cannot reach (docs/SECURITY.md), tried as
//! they would: a second user (`nobody`, through `setpriv`) reading the home,
//! and a second cairn process on the same home. These run as root, as CI
//! does; `setpriv` needs it to become another user.

// These tests drive the `cairn` binary, a FUSE mount or other users; the
// Windows build runs the core's own tests (lib, codec, staging, vfs_model).
#![cfg(unix)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{stderr, Home};

fn root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `program` to run as `nobody` (no groups).
fn nobody(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", program]);
    c
}

/// `cmd` run as `nobody`: its status and stdout.
fn as_nobody(args: &[&str]) -> (bool, String) {
    let out = nobody(args[0]).args(&args[1..]).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cairn_at(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    c.args(args).env("CAIRN_HOME", home).env_remove("CAIRN_LOG");
    c
}

/// As if the user's shell had `umask 0`.
fn with_umask_zero(c: &mut Command) -> &mut Command {
    // SAFETY: umask is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::umask(0);
            Ok(())
        })
    }
}

fn wait_mounted(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::is_mounted(dir) {
        assert!(Instant::now() < deadline, "mount did not appear at {}", dir.display());
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn unmount(dir: &Path, mut child: std::process::Child) {
    assert!(Command::new("fusermount3")
        .arg("-u")
        .arg(dir)
        .status()
        .unwrap()
        .success());
    assert!(child.wait().unwrap().success());
}

/// A parent anyone may enter (as `~/.local/share` is), and a home path in it
/// that cairn itself creates.
fn world_enterable_parent() -> (tempfile::TempDir, PathBuf) {
    let parent = tempfile::tempdir().unwrap();
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = parent.path().join("home");
    (parent, home)
}

#[test]
fn the_home_is_owner_only_whatever_the_umask_and_nobody_reads_it() {
    if !root() {
        eprintln!("skipped: needs root to run a process as nobody");
        return;
    }
    let (_parent, home) = world_enterable_parent();
    let mnt = tempfile::tempdir().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = with_umask_zero(&mut cairn_at(&home, &["mount", mnt.path().to_str().unwrap()]))
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    wait_mounted(mnt.path());
    let secret = mnt.path().join("private");
    std::fs::create_dir(&secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let salaries = b"name,salary\nalice,123456789\n".repeat(40_000); // ~1.1 MiB: chunks, not one pack
    std::fs::write(secret.join("salaries.csv"), &salaries).unwrap();
    std::fs::write(secret.join("small.txt"), b"alice,123456789\n").unwrap();
    let out = with_umask_zero(&mut cairn_at(&home, &["sync"])).output().unwrap();
    assert!(out.status.success(), "sync: {}", stderr(&out));
    // `cairn put` stages a plaintext snapshot of its source too.
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), b"alice,123456789\n").unwrap();
    unmount(mnt.path(), child);
    let out = with_umask_zero(&mut cairn_at(&home, &["put", src.path().to_str().unwrap(), "/put.txt"]))
        .output()
        .unwrap();
    assert!(out.status.success(), "put: {}", stderr(&out));

    let mut loose = Vec::new();
    let mut seen = 0;
    let mut check = |p: &Path| {
        let mode = std::fs::symlink_metadata(p).unwrap().permissions().mode();
        seen += 1;
        if mode & 0o077 != 0 {
            loose.push(format!("{:o} {}", mode & 0o7777, p.display()));
        }
    };
    check(&home);
    walk_all(&home, &mut check);
    assert!(seen > 20, "the walk saw the home's files ({seen})");
    assert!(loose.is_empty(), "reachable by others:\n{}", loose.join("\n"));

    // The attacker: nothing of the home can be read, listed or searched.
    let home_s = home.to_str().unwrap();
    for target in ["catalog.db", "config.toml", "cache", "cache/versions", "stage"] {
        let path = format!("{home_s}/{target}");
        assert!(!as_nobody(&["cat", &path]).0, "nobody read {path}");
        assert!(!as_nobody(&["ls", &path]).0, "nobody listed {path}");
    }
    let (_, found) = as_nobody(&["grep", "-rl", "alice", home_s]);
    assert!(found.is_empty(), "nobody found the secret in {found}");
}

fn walk_all(dir: &Path, f: &mut dyn FnMut(&Path)) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        f(&p);
        if e.file_type().unwrap().is_dir() {
            walk_all(&p, f);
        }
    }
}

#[test]
fn a_home_others_can_write_or_that_another_user_owns_is_refused() {
    if !root() {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let home = Home::init(&[]);
    let mode = |m| std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(m)).unwrap();
    mode(0o770);
    let out = home.cairn(&["ls", "/"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("chmod 700"), "names the fix: {}", stderr(&out));
    // Left readable by an older cairn: made owner-only, and used.
    mode(0o755);
    home.ok(&["ls", "/"]);
    let now = std::fs::metadata(home.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(now, 0o700, "tightened");
    let nobody = nix_uid("nobody");
    std::os::unix::fs::chown(home.path(), Some(nobody), None).unwrap();
    let out = home.cairn(&["ls", "/"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("owned by user"), "{}", stderr(&out));
    std::os::unix::fs::chown(home.path(), Some(0), None).unwrap();
    home.ok(&["ls", "/"]);
}

fn nix_uid(name: &str) -> u32 {
    let out = Command::new("id").args(["-u", name]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
}

#[test]
fn a_put_ended_by_sigterm_leaves_its_snapshot_only_until_the_next_command() {
    let home = Home::init(&[]);
    home.slow_servers(200);
    let src = home.file("src.bin");
    std::fs::write(&src, common::bytes(8 << 20, 5)).unwrap();
    let mut child = home
        .command(&["put", src.to_str().unwrap(), "/src.bin"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stage = home.file("stage");
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::walk_count(&stage) == 0 {
        assert!(Instant::now() < deadline, "put staged no snapshot");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill on the PID of the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(!child.wait().unwrap().success());
    assert_eq!(common::walk_count(&stage), 1, "the snapshot a killed put leaves");
    home.slow_servers(0);
    home.ok(&["put", src.to_str().unwrap(), "/again.bin"]);
    assert_eq!(common::walk_count(&stage), 0, "cleaned by the next put");
}

/// `cairn mount DIR` that must fail at once: its output. One still running
/// after 10 s was not refused: it is unmounted and the test fails.
fn refused_mount(home: &Home, dir: &Path) -> std::process::Output {
    let child = home
        .command(&["mount", dir.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    let watchdog = std::thread::spawn(move || {
        while Instant::now() < deadline {
            // SAFETY: signal 0 only asks whether the child still exists.
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    });
    std::thread::scope(|s| {
        let waited = s.spawn(|| child.wait_with_output().unwrap());
        if watchdog.join().unwrap() {
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(dir).status();
            // SAFETY: kill on the PID of the child we spawned.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = waited.join();
            panic!("cairn mount {} was not refused", dir.display());
        }
        waited.join().unwrap()
    })
}

#[test]
fn a_second_cairn_on_one_home_is_refused_and_the_first_ones_open_file_survives() {
    let home = Home::init(&[]);
    let mnt = home.mount(&[]);
    let mut file = std::fs::File::create(mnt.file("open.txt")).unwrap();
    use std::io::Write;
    file.write_all(b"first half, ").unwrap();

    let other = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = refused_mount(&home, other.path());
    assert!(!out.status.success(), "a second mount of one home is refused");
    assert!(started.elapsed() < Duration::from_secs(5), "at once");
    let why = stderr(&out);
    assert!(
        why.contains("in use by `cairn mount` (pid") && why.contains(&mnt.pid().to_string()),
        "names the running one: {why}"
    );
    assert!(!common::is_mounted(other.path()));
    for args in [&["put", "/etc/hostname", "/h"][..], &["gc"], &["repair", "--all"]] {
        let out = home.cairn(args);
        assert!(!out.status.success(), "{args:?} while mounted");
        assert!(stderr(&out).contains("in use by"), "{args:?}: {}", stderr(&out));
    }

    file.write_all(b"second half").unwrap();
    drop(file);
    assert_eq!(std::fs::read(mnt.file("open.txt")).unwrap(), b"first half, second half");
    home.ok(&["sync"]);
    assert!(mnt.unmount().success());
    assert_eq!(home.get_bytes("/open.txt").unwrap(), b"first half, second half");
}

fn xattr(path: &Path, name: &str) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer of the given length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| String::from_utf8(buf[..len as usize].to_vec()).unwrap())
}

/// The pack capability inside a packed file's capability.
fn pack_of(member_cap: &str) -> &str {
    &member_cap[member_cap.find("cairn:chk1:").expect("a packed capability")..]
}

#[test]
fn a_packed_files_capability_opens_that_file_only_and_only_its_owner_gets_it() {
    if !root() {
        eprintln!("skipped: needs root to run a process as nobody");
        return;
    }
    let home = Home::init(&[]);
    let mnt = home.mount(&["--allow-other"]);
    let public = mnt.file("public.txt");
    let secret = mnt.file("salaries.csv");
    std::fs::write(&public, b"hello world\n").unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&secret, b"name,salary\nalice,123456789\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    home.ok(&["sync"]);
    let cap = xattr(&public, "user.cairn.cap").expect("the owner gets the capability");
    let secret_cap = xattr(&secret, "user.cairn.cap").unwrap();
    assert!(cap.starts_with("cairn:pack2:"), "{cap}");
    assert_eq!(pack_of(&cap), pack_of(&secret_cap), "both files in one pack");

    // Whoever holds the public file's capability holds the pack's key too:
    // it opens nothing but ciphertexts of the other members.
    let out = home.file("pack.bin");
    home.ok(&["get", "--cap", pack_of(&cap), out.to_str().unwrap()]);
    let pack = std::fs::read(&out).unwrap();
    assert!(!pack.is_empty());
    assert!(
        !pack.windows(5).any(|w| w == b"alice") && !pack.windows(5).any(|w| w == b"hello"),
        "the pack holds plaintext"
    );
    home.ok(&["get", "--cap", &cap, out.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        b"hello world\n",
        "a member's own capability reads it"
    );

    // Another user may read the public file, not learn its capability.
    let public_s = public.to_str().unwrap();
    assert_eq!(as_nobody(&["cat", public_s]), (true, "hello world\n".into()));
    assert!(!as_nobody(&["cat", secret.to_str().unwrap()]).0);
    let py = "import os, sys; print(os.getxattr(sys.argv[1], 'user.cairn.sha256').decode()); \
              print('user.cairn.cap' in os.listxattr(sys.argv[1])); os.getxattr(sys.argv[1], 'user.cairn.cap')";
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            py,
            public_s,
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&common::sha256_hex(b"hello world\n")),
        "the hash is not secret: {said} {}",
        stderr(&out)
    );
    assert!(said.contains("False"), "listxattr hides the capability: {said}");
    assert!(!out.status.success(), "nobody got the capability");
    assert!(stderr(&out).contains("Permission denied"), "{}", stderr(&out));
    assert!(mnt.unmount().success());
}

/// The upload keys the catalog records for `path`'s newest version.
#[test]
fn every_upload_attempt_of_a_version_has_its_own_key() {
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "0"]);
    // Two of five servers gone: happiness (4) cannot hold, attempts fail.
    home.servers_away(&["s1", "s2"]);
    let data = common::bytes(2 << 20, 78);
    std::fs::write(mnt.file("f"), &data).unwrap();
    let mut keys = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while keys.len() < 2 && Instant::now() < deadline {
        keys.extend(home.upload_key("/f"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(keys.len() >= 2, "attempts under one key: {keys:?}");
    home.servers_back(&["s1", "s2"]);
    home.ok(&["sync"]);
    let last = home.upload_key("/f").unwrap();
    let si = Home::storage_index_of(&last);
    let shares = home.shares_of("/f");
    assert!(!shares.is_empty() && shares.iter().all(|p| p.to_string_lossy().contains(&si)));
    // The earlier attempts' shares were deleted, not orphaned.
    for (_, p) in home.share_files() {
        let name = p.to_string_lossy();
        for k in &keys {
            let old = Home::storage_index_of(k);
            assert!(*k == last || !name.contains(&old), "an earlier attempt's share: {name}");
        }
    }
    assert_eq!(home.get_bytes("/f").unwrap(), data);
    assert!(mnt.unmount().success());
}

fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

#[test]
fn a_damaged_chunk_is_never_read_or_uploaded_as_zeros() {
    // The committed file's cached chunk, cut short; the staged one's, removed.
    damaged_chunks_are_refetched_or_refused(|committed, staged| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(committed)
            .unwrap()
            .set_len(1000)
            .unwrap();
        std::fs::remove_file(staged).unwrap();
    });
}

#[test]
fn a_chunk_altered_in_place_is_caught_by_its_sum() {
    // Same lengths, one byte changed in each: only the chunk's SHA-256 tells.
    let flip = |path: &Path| {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[4321] ^= 0x40;
        std::fs::write(path, bytes).unwrap();
    };
    damaged_chunks_are_refetched_or_refused(|committed, staged| {
        flip(committed);
        flip(staged);
    });
}

/// Damages chunk 0 of a committed, cached file and chunk 1 of a staged one
/// with `damage`: the first must read back whole (fetched again from the
/// grid), the second fail with EIO and keep `cairn sync` from succeeding.
fn damaged_chunks_are_refetched_or_refused(damage: impl FnOnce(&Path, &Path)) {
    if !root() {
        eprintln!("skipped: needs root to drop the page cache");
        return;
    }
    let home = Home::empty();
    let mnt = home.mount(&["--writeback-delay", "3600"]);
    let chunk = 1 << 20;
    let committed = common::bytes(2 * chunk, 1);
    std::fs::write(mnt.file("committed.bin"), &committed).unwrap();
    home.ok(&["sync"]);
    let staged = common::bytes(2 * chunk, 2);
    std::fs::write(mnt.file("staged.bin"), &staged).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // sealed at release
    let versions = home.file("cache/versions");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&versions)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    let (committed_dir, staged_dir) = {
        let first = std::fs::read(dirs[0].join("0")).unwrap();
        if first == committed[..chunk] {
            (dirs[0].clone(), dirs[1].clone())
        } else {
            (dirs[1].clone(), dirs[0].clone())
        }
    };
    damage(&committed_dir.join("0"), &staged_dir.join("1"));
    drop_page_cache();

    assert!(
        std::fs::read(mnt.file("committed.bin")).unwrap() == committed,
        "refetched from the grid"
    );
    let err = std::fs::read(mnt.file("staged.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let out = home.cairn(&["sync"]);
    assert!(!out.status.success(), "sync reports the version it cannot upload");
    assert!(stderr(&out).contains("/staged.bin"), "{}", stderr(&out));
    let versions = home.versions("/staged.bin");
    assert_eq!(versions.last().unwrap()["state"], "staged", "{versions:?}");
    assert!(home.shares_of("/staged.bin").is_empty());
    drop(mnt);
}

#[test]
fn restore_resolves_a_relative_path_where_the_user_is() {
    let home = Home::init(&[]);
    let mnt = home.mount(&["--writeback-delay", "0"]);
    std::fs::create_dir(mnt.file("sub")).unwrap();
    for (path, first) in [("file.txt", "top v1"), ("sub/file.txt", "sub v1")] {
        std::fs::write(mnt.file(path), first).unwrap();
        home.ok(&["sync"]);
        std::fs::write(mnt.file(path), format!("{first} then v2")).unwrap();
        home.ok(&["sync"]);
    }
    let out = home
        .command(&["restore", "file.txt", "--version", "1"])
        .current_dir(mnt.file("sub"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(mnt.file("sub/file.txt")).unwrap(), "sub v1");
    assert_eq!(
        std::fs::read_to_string(mnt.file("file.txt")).unwrap(),
        "top v1 then v2",
        "untouched"
    );
    assert!(mnt.unmount().success());
}

#[test]
fn hostile_config_values_and_capabilities_get_a_clear_error_not_a_crash() {
    let home = Home::init(&[]);
    let config = home.file("config.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let cases = [
        (
            "memory_budget_mib = 64",
            "memory_budget_mib = 4398046511104",
            "grid.memory_budget_mib",
        ),
        (
            "segment_size = 1048576",
            "segment_size = 4294967280",
            "grid.segment_size",
        ),
        ("name = \"s1\"", "name = \"..\"", "server[0].name"),
        ("keep_days = 30", "keep_days = 4000000000", "retention.keep_days"),
    ];
    for (from, to, field) in cases {
        assert!(original.contains(from), "{from}");
        std::fs::write(&config, original.replacen(from, to, 1)).unwrap();
        for args in [&["gc", "--dry-run"][..], &["repair", "--all"]] {
            let out = home.cairn(args);
            assert_eq!(out.status.code(), Some(1), "{to}: {args:?}: {}", stderr(&out));
            assert!(stderr(&out).contains(field), "{to}: names {field}: {}", stderr(&out));
        }
        assert!(config.exists(), "{to}: config.toml is still there");
    }
    std::fs::write(&config, &original).unwrap();
    // Capabilities whose sizes would overflow or allocate without bound.
    let out = home.file("out.bin");
    for cap in [
        "cairn:chk1:aeaqcaibaeaqcaibaeaqcaibae:aeaqcaibaeaqcaibaeaqcaibaeaqcaibaeaqcaibaeaqcaibaeaq:3:5:18446744073709551615:16",
        "cairn:chk1:aeaqcaibaeaqcaibaeaqcaibae:aeaqcaibaeaqcaibaeaqcaibaeaqcaibaeaqcaibaeaqcaibaeaq:3:5:36028797018963968:1048576",
    ] {
        let got = home.cairn(&["get", "--cap", cap, out.to_str().unwrap()]);
        assert_eq!(got.status.code(), Some(1), "{}", stderr(&got));
        assert!(stderr(&got).contains("segments"), "{}", stderr(&got));
        let packed = format!("cairn:pack2:0:1:aeaqcaibaeaqcaibaeaqcaibae:{cap}");
        let got = home.cairn(&["get", "--cap", &packed, out.to_str().unwrap()]);
        assert_eq!(got.status.code(), Some(1), "{}", stderr(&got));
    }
}

#[test]
fn without_allow_other_no_other_user_reaches_the_mount_at_all() {
    if !root() {
        eprintln!("skipped: needs root to run a process as nobody");
        return;
    }
    let home = Home::init(&[]);
    let mnt = home.mount(&[]);
    std::fs::write(mnt.file("open.txt"), b"for all").unwrap();
    std::fs::set_permissions(mnt.file("open.txt"), std::fs::Permissions::from_mode(0o644)).unwrap();
    // Listed and stat'ed once by the owner, so the kernel holds the root's
    // listing and the file's attributes (it answered other users' stat from
    // them when the mount was allow_other at the kernel, filtered by fuser).
    assert_eq!(std::fs::read_dir(mnt.path()).unwrap().count(), 1);
    std::fs::metadata(mnt.file("open.txt")).unwrap();
    let root_dir = mnt.path().to_str().unwrap();
    let file = mnt.file("open.txt");
    let file = file.to_str().unwrap();
    // The kernel refuses all of these before asking the daemon.
    for args in [
        &["ls", root_dir][..],
        &["stat", root_dir],
        &["stat", file],
        &["cat", file],
    ] {
        assert!(!as_nobody(args).0, "nobody could {args:?}");
    }
    assert!(mnt.unmount().success());
}

#[test]
fn a_changed_segment_size_is_refused_not_applied_to_the_cache() {
    let home = Home::init(&[]);
    let mnt = home.mount(&[]);
    let data = common::bytes(3 << 20, 9);
    std::fs::write(mnt.file("f.bin"), &data).unwrap();
    assert!(mnt.unmount().success());
    home.edit_config(|c| c.grid.segment_size = 512 << 10);
    let dir = tempfile::tempdir().unwrap();
    let out = refused_mount(&home, dir.path());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("grid.segment_size is 524288") && stderr(&out).contains("made with 1048576"),
        "{}",
        stderr(&out)
    );
    home.edit_config(|c| c.grid.segment_size = 1 << 20);
    let mnt = home.mount(&[]);
    assert!(std::fs::read(mnt.file("f.bin")).unwrap() == data);
    assert!(mnt.unmount().success());
}

#[test]
fn an_unreadable_working_copy_state_is_set_aside_and_the_mount_starts() {
    let home = Home::init(&[]);
    let mnt = home.mount(&[]);
    let data = common::bytes(2 << 20, 10);
    std::fs::write(mnt.file("f.bin"), &data).unwrap();
    home.ok(&["sync"]);
    // A write over the sealed version: a working copy with a state file.
    let mut open = std::fs::OpenOptions::new().write(true).open(mnt.file("f.bin")).unwrap();
    use std::io::{Seek, Write};
    open.seek(std::io::SeekFrom::Start(10)).unwrap();
    open.write_all(b"edit").unwrap();
    let work = home.file("cache/work");
    let states: Vec<PathBuf> = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().path().join("state"))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(states.len(), 1, "the copy over a base keeps a state file");
    assert!(mnt.signal(libc::SIGKILL).code().is_none());
    drop(open);
    std::fs::write(&states[0], b"").unwrap(); // as a power loss could leave it
    let mnt = home.mount(&[]);
    assert!(
        std::fs::read(mnt.file("f.bin")).unwrap() == data,
        "the last sealed version"
    );
    assert_eq!(
        common::walk_count(&home.file("cache/quarantine")),
        2,
        "state and the edited chunk, kept"
    );
    assert!(mnt.unmount().success());
}

/// A copy left by kill -9 whose seal reads a base chunk the cache no
/// longer holds (a write past the short end of a file not in the cache;
/// the fetched chunk then lost): recovery, which has no grid, sets it
/// aside and the mount starts, rather than failing to start.
#[test]
fn a_copy_whose_seal_needs_a_lost_base_chunk_is_set_aside_and_the_mount_starts() {
    let home = Home::init(&[]);
    let mnt = home.mount(&[]);
    let data = common::bytes((2 << 20) + 1000, 11);
    std::fs::write(mnt.file("f.bin"), &data).unwrap();
    home.ok(&["sync"]);
    assert!(mnt.unmount().success());
    std::fs::remove_dir_all(home.file("cache")).unwrap();
    let mnt = home.mount(&[]);
    let open = std::fs::OpenOptions::new().write(true).open(mnt.file("f.bin")).unwrap();
    use std::os::unix::fs::FileExt;
    open.write_all_at(b"past the end", 4 << 20).unwrap();
    // The seal will read the 1000 bytes of the short chunk 2: fetched.
    assert!(home.file("cache/versions").read_dir().unwrap().next().is_some());
    assert!(mnt.signal(libc::SIGKILL).code().is_none());
    drop(open);
    std::fs::remove_dir_all(home.file("cache/versions")).unwrap();
    std::fs::create_dir(home.file("cache/versions")).unwrap();
    let mnt = home.mount(&[]);
    assert!(
        std::fs::read(mnt.file("f.bin")).unwrap() == data,
        "the last sealed version"
    );
    assert!(common::walk_count(&home.file("cache/quarantine")) >= 1);
    assert!(mnt.unmount().success());
}

#[test]
fn shares_piled_on_one_server_are_not_healthy() {
    let home = Home::init(&[]);
    let src = home.file("src.bin");
    std::fs::write(&src, common::bytes(3 << 20, 12)).unwrap();
    home.ok(&["put", src.to_str().unwrap(), "/f.bin"]);
    home.ok(&["check", "/f.bin"]);
    // A server that gathered every share (as a hostile one could claim to).
    let s1 = home.server_dir("s1");
    for path in home.shares_of("/f.bin") {
        let server = path
            .ancestors()
            .find(|p| p.parent() == Some(&home.path().join("servers")))
            .unwrap()
            .to_owned();
        if server != s1 {
            let to = s1.join(path.strip_prefix(&server).unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::rename(&path, &to).unwrap();
        }
    }
    let out = home.cairn(&["check", "/f.bin"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("5 of 5 shares valid, on 1 servers"), "{said}");
}

#[test]
fn a_server_down_for_a_moment_is_asked_again_by_a_reader_that_saw_it_fail() {
    use std::os::unix::fs::FileExt;
    let home = Home::init(&[]);
    let mnt = home.mount(&["--writeback-delay", "0"]);
    let data = common::bytes(12 << 20, 13);
    std::fs::write(mnt.file("f.bin"), &data).unwrap();
    home.ok(&["sync"]);
    assert!(mnt.unmount().success());
    std::fs::remove_dir_all(home.file("cache")).unwrap();
    home.servers_away(&["s1", "s2"]);
    let mnt = home.mount(&[]);
    let file = std::fs::File::open(mnt.file("f.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    file.read_exact_at(&mut buf, 0).unwrap(); // the reader: s3, s4, s5
    assert!(buf == data[..4096]);
    home.servers_away(&["s3"]);
    let at = 9 << 20;
    assert!(file.read_exact_at(&mut buf, at).is_err(), "two shares of three needed");
    home.servers_back(&["s3"]);
    std::thread::sleep(Duration::from_secs(6));
    file.read_exact_at(&mut buf, at).expect("s3 is back and asked again");
    assert!(buf == data[at as usize..at as usize + 4096]);
    drop(file);
    assert!(mnt.unmount().success());
}

#[test]
fn get_writes_through_a_private_unpredictable_temp_file_and_ends_with_the_users_mode() {
    let home = Home::init(&[]);
    let src = home.file("src.bin");
    let data = common::bytes(3 << 20, 14);
    std::fs::write(&src, &data).unwrap();
    home.ok(&["put", src.to_str().unwrap(), "/f.bin"]);
    home.slow_servers(150);
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.bin");
    let mut cmd = home.command(&["get", "/f.bin", out.to_str().unwrap()]);
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        })
    };
    let mut child = cmd.stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let partial = loop {
        let found = std::fs::read_dir(out_dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .next();
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "no partial file appeared");
        std::thread::sleep(Duration::from_millis(5));
    };
    let name = partial.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with(".out.bin.cairn-partial-"), "{name}");
    assert!(
        !name.ends_with(&child.id().to_string()),
        "named after the pid: predictable"
    );
    let mode = std::fs::metadata(&partial).map(|m| m.permissions().mode() & 0o777);
    assert!(
        mode.as_ref().map_or(true, |m| *m == 0o600),
        "partial file mode {mode:?}"
    );
    assert!(child.wait().unwrap().success());
    assert!(std::fs::read(&out).unwrap() == data);
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o644,
        "the umask's mode"
    );
}

/// Sends `request` on the control socket at `socket` as `nobody` (or as
/// this process) and returns what came back.
fn control_exchange(socket: &Path, request: &[u8], as_nobody: bool) -> String {
    let script = "import socket,sys\n\
        s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
        data=sys.stdin.buffer.read()\n\
        try:\n    s.sendall(data)\nexcept OSError: pass\n\
        out=b''\n\
        while True:\n    b=s.recv(65536)\n    if not b: break\n    out+=b\n\
        sys.stdout.buffer.write(out)\n";
    let mut cmd = if as_nobody {
        nobody("/usr/bin/python3")
    } else {
        Command::new("/usr/bin/python3")
    };
    let mut child = cmd
        .args(["-c", script, socket.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), request).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_control_socket_answers_only_its_owner_and_reads_a_bounded_request() {
    if !root() {
        eprintln!("skipped: needs root to run a process as nobody");
        return;
    }
    let home = Home::init(&[]);
    let mnt = home.mount(&[]);
    let socket = home.file("control.sock");
    let status = br#"{"cmd":"status"}
"#;
    assert!(control_exchange(&socket, status, false).contains(r#""ok":true"#));
    // Opened up to nobody (the 0700 home and 0600 socket normally keep them
    // from connecting at all), the daemon's own peer check still refuses.
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    mode(home.path(), 0o711);
    mode(&socket, 0o666);
    let reply = control_exchange(&socket, status, true);
    mode(&socket, 0o600);
    mode(home.path(), 0o700);
    assert_eq!(reply, "", "nobody got an answer from the daemon");
    // A 1 MiB line: the daemon stops reading at 64 KiB and answers no request.
    let mut huge = vec![b' '; 1 << 20];
    huge.extend_from_slice(status);
    let reply = control_exchange(&socket, &huge, false);
    assert!(!reply.contains(r#""ok":true"#), "{reply}");
    // And goes on serving.
    home.ok(&["status"]);
    assert!(mnt.unmount().success());
}

/// Finding 17 of issue 18 (by reading, before): a version superseded before
/// its upload is freed from the cache and was never on the grid. Restoring
/// it must be refused plainly, not queue an upload that cannot read it.
#[test]
fn restoring_a_version_freed_before_its_upload_is_refused_not_queued() {
    let home = Home::init(&[]);
    let mnt = home.mount(&["--writeback-delay", "1"]);
    std::fs::write(mnt.file("f"), "v1, never uploaded").unwrap();
    std::fs::write(mnt.file("f"), "v2").unwrap();
    home.ok(&["sync"]);
    let states: Vec<String> = home
        .versions("/f")
        .iter()
        .map(|v| format!("{}:{}", v["num"], v["state"].as_str().unwrap_or("?")))
        .collect();
    assert!(states.contains(&"1:superseded".to_owned()), "{states:?}");
    let out = home
        .command(&["restore", &mnt.file("f").display().to_string(), "--version", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "restored a version nothing holds");
    assert!(stderr(&out).contains("no longer in the cache"), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["status"]["queue"].as_array().unwrap().len(), 0, "{status}");
    home.ok(&["sync"]);
    assert_eq!(std::fs::read_to_string(mnt.file("f")).unwrap(), "v2");
    assert!(mnt.unmount().success());
}

/// Finding 16 of issue 18: no secret on a command line or in a log. The old
/// flags are refused, and a mount on an S3 grid logging at its most verbose
/// while it writes, uploads (whole and packed), publishes and stops prints
/// neither the root capability, nor a file's capability or key, nor the S3
/// secret, and has none of them on its command line.
#[test]
fn secrets_never_reach_a_command_line_or_a_log() {
    for args in [["recover", "--root-cap", "x"], ["init", "--s3-secret-access-key", "x"]] {
        let out = Home::empty().cairn(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr(&out).contains("unexpected argument"), "{}", stderr(&out));
    }
    let servers = common::s3::S3Servers::start(5);
    let init = servers.init_args();
    let init: Vec<&str> = init.iter().map(String::as_str).collect();
    let home = Home::init_with_env(&init, &servers.secret_env());
    let dir = tempfile::tempdir().unwrap();
    let log = home.file("trace.log");
    let child = home
        .command(&["mount", dir.path().to_str().unwrap(), "--writeback-delay", "0"])
        .env("CAIRN_LOG", "cairn=trace,debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_mounted(dir.path());
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap();
    std::fs::write(dir.path().join("small"), b"a small packed file").unwrap();
    std::fs::write(dir.path().join("big"), common::bytes(3 << 20, 16)).unwrap();
    home.ok(&["sync"]);
    let caps: Vec<String> = ["small", "big"]
        .iter()
        .map(|f| xattr(&dir.path().join(f), "user.cairn.cap").expect("committed"))
        .collect();
    unmount(dir.path(), child);
    let root = home.root_cap();
    // Keys are the long base32 fields of a capability (the key, the pack's
    // member key); the whole capability is checked as well.
    let mut secrets = vec![root.to_owned(), common::s3::SECRET_KEY.to_owned()];
    for cap in &caps {
        secrets.push(cap.clone());
        secrets.extend(cap.split(':').filter(|f| f.len() >= 26).map(str::to_owned));
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("committed a pack"),
        "the log is not verbose enough to tell:\n{logged}"
    );
    let cmdline = String::from_utf8_lossy(&cmdline);
    for secret in &secrets {
        assert!(!logged.contains(secret.as_str()), "{secret} is in the mount's log");
        assert!(
            !cmdline.contains(secret.as_str()),
            "{secret} is on the mount's command line"
        );
    }
}
