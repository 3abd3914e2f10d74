//! What other local users can and cannot reach (docs/SECURITY.md), tried as
//! they would: a second user (`nobody`, through `setpriv`) reading the home,
//! and a second cairn process on the same home. These run as root, as CI
//! does; `setpriv` needs it to become another user.

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

/// `cmd` run as `nobody` (no groups): its status and stdout.
fn as_nobody(args: &[&str]) -> (bool, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .args(args)
        .output()
        .unwrap();
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

#[test]
fn a_second_cairn_on_one_home_is_refused_and_the_first_ones_open_file_survives() {
    let home = Home::init(&[]);
    let mnt = home.mount(&[]);
    let mut file = std::fs::File::create(mnt.file("open.txt")).unwrap();
    use std::io::Write;
    file.write_all(b"first half, ").unwrap();

    let other = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = home.cairn(&["mount", other.path().to_str().unwrap()]);
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
