//! Shared helpers: a private CAIRN_HOME and the real `cairn` binary.
#![allow(dead_code)]

pub mod s3;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Home {
    pub dir: tempfile::TempDir,
    /// The machine's name among the drive's devices (CAIRN_DEVICE_NAME):
    /// homes on one host stand for several machines.
    pub device: Option<String>,
}

impl Home {
    /// A fresh home with the embedded default grid (or `init_args`).
    pub fn init(init_args: &[&str]) -> Home {
        Home::init_with_env(init_args, &[])
    }

    /// `init` with variables in its environment (secrets, never arguments).
    pub fn init_with_env(init_args: &[&str], env: &[(&str, &str)]) -> Home {
        let home = Home {
            dir: tempfile::Builder::new().prefix("cairn-test-").tempdir().unwrap(),
            device: None,
        };
        let out = home
            .command(&[&["init"], init_args].concat())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "init failed: {}", stderr(&out));
        home
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.args(args).env("CAIRN_HOME", self.path()).env_remove("CAIRN_LOG");
        if let Some(name) = &self.device {
            c.env("CAIRN_DEVICE_NAME", name);
        }
        // CAIRN_TEST_LOG=cairn=debug logs the daemons of a test run.
        if let Some(filter) = std::env::var_os("CAIRN_TEST_LOG") {
            c.env("CAIRN_LOG", filter);
        }
        c
    }

    pub fn cairn(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cairn(args);
        assert!(out.status.success(), "cairn {args:?} failed: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Servers gone, as if their disks were: their directories moved aside.
    pub fn servers_away(&self, names: &[&str]) {
        let aside = self.path().join("aside");
        std::fs::create_dir_all(&aside).unwrap();
        for s in names {
            std::fs::rename(self.server_dir(s), aside.join(s)).unwrap();
        }
    }

    /// Servers [`Home::servers_away`] took away, back.
    pub fn servers_back(&self, names: &[&str]) {
        for s in names {
            std::fs::rename(self.path().join("aside").join(s), self.server_dir(s)).unwrap();
        }
    }

    pub fn server_dir(&self, name: &str) -> PathBuf {
        self.path().join("servers").join(name)
    }

    /// Every published share file of every server: (server, path).
    pub fn share_files(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        for server in std::fs::read_dir(self.path().join("servers")).unwrap() {
            let server = server.unwrap();
            let name = server.file_name().to_string_lossy().into_owned();
            walk(&server.path().join("shares"), &mut |p| {
                out.push((name.clone(), p.to_owned()))
            });
        }
        out.sort();
        out
    }

    /// `cairn get PATH` into a scratch file: its bytes, or the error output.
    pub fn get_bytes(&self, path: &str) -> Result<Vec<u8>, String> {
        let out_path = self.file("got.bin");
        let _ = std::fs::remove_file(&out_path);
        let out = self.cairn(&["get", path, out_path.to_str().unwrap()]);
        if out.status.success() {
            Ok(std::fs::read(&out_path).unwrap())
        } else {
            Err(stderr(&out))
        }
    }

    /// `cairn get PATH` of a file too large to hold in memory: checks its
    /// size and that `expected` is at `offset`.
    pub fn get_and_spot_check(&self, path: &str, size: u64, offset: u64, expected: &[u8]) {
        use std::os::unix::fs::FileExt;
        let copy = self.file("copy.bin");
        self.ok(&["get", path, copy.to_str().unwrap()]);
        let back = std::fs::File::open(&copy).unwrap();
        assert_eq!(back.metadata().unwrap().len(), size);
        let mut buf = vec![0u8; expected.len()];
        back.read_exact_at(&mut buf, offset).unwrap();
        assert_eq!(buf, expected);
    }

    /// Published share files of the versions of one drive path (not those
    /// of namespace snapshots, which `cairn sync` also uploads).
    pub fn shares_of(&self, path: &str) -> Vec<PathBuf> {
        let catalog = cairn::catalog::Catalog::open(&self.file("catalog.db")).unwrap();
        let ino = catalog.resolve(path).unwrap().ino;
        let dirs: Vec<String> = catalog
            .versions(ino)
            .unwrap()
            .into_iter()
            .filter_map(|v| v.cap)
            .map(|c| {
                c.parse::<cairn::codec::FileCap>()
                    .unwrap()
                    .stored()
                    .storage_index()
                    .to_string()
            })
            .collect();
        self.share_files()
            .into_iter()
            .map(|(_, p)| p)
            .filter(|p| dirs.iter().any(|d| p.to_string_lossy().contains(d.as_str())))
            .collect()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// The drive's root capability, as `cairn root-cap` prints it.
    pub fn root_cap(&self) -> String {
        let out = self.ok(&["root-cap"]);
        out.lines()
            .find_map(|l| l.strip_prefix("root capability: "))
            .expect("root-cap prints it")
            .to_string()
    }

    /// The upload key last recorded (committed) for a top-level file's
    /// newest version, read beside whatever else holds the catalog.
    pub fn upload_key(&self, path: &str) -> Option<String> {
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
        let db = rusqlite::Connection::open_with_flags(self.file("catalog.db"), flags).ok()?;
        let name = path.trim_start_matches('/');
        db.query_row(
            "SELECT v.upload_key FROM versions v JOIN nodes n ON n.ino = v.ino WHERE n.name = ?1 \
             ORDER BY v.num DESC LIMIT 1",
            [name],
            |r| r.get(0),
        )
        .ok()
        .flatten()
    }

    /// The storage index (as share paths spell it) of shares written under
    /// an upload key, as [`Home::upload_key`] gives it.
    pub fn storage_index_of(key_hex: &str) -> String {
        let key = data_encoding::HEXLOWER.decode(key_hex.as_bytes()).unwrap();
        cairn::codec::storage_index_for(&key.try_into().unwrap()).to_string()
    }

    /// Every version of a drive path, from the running daemon.
    pub fn versions(&self, path: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["versions", "--json", path])).unwrap();
        v["versions"].as_array().unwrap().clone()
    }

    /// Injected delay on every request of every server: a slow link.
    pub fn slow_servers(&self, ms: u64) {
        self.edit_config(|c| {
            for s in &mut c.servers {
                s.faults.get_or_insert_with(Default::default).delay_ms = ms;
            }
        });
    }

    pub fn config(&self) -> cairn::config::Config {
        cairn::config::Config::load(&self.file("config.toml")).unwrap()
    }

    pub fn edit_config(&self, f: impl FnOnce(&mut cairn::config::Config)) {
        let mut config = self.config();
        f(&mut config);
        std::fs::write(self.file("config.toml"), config.to_toml()).unwrap();
    }

    /// Sets the injected faults of server `name` (see docs/RELIABILITY.md).
    pub fn set_faults(&self, name: &str, faults: cairn::config::FaultConfig) {
        self.edit_config(|c| {
            let server = c.servers.iter_mut().find(|s| s.name == name).expect("server name");
            server.faults = Some(faults);
        });
    }
}

/// Copies the directory `from` into `to`, everything below it (files and
/// directories only).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let into = to.join(entry.file_name());
        match entry.file_type().unwrap().is_dir() {
            true => copy_tree(&entry.path(), &into),
            false => drop(std::fs::copy(entry.path(), into).unwrap()),
        }
    }
}

pub fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

/// Runs `cmd` to its end; returns (success, stdout, stderr, peak RSS in KiB)
/// of that one process: its VmHWM, read every 10 ms while it runs. (wait4's
/// ru_maxrss would also count the test process the child was spawned from.)
pub fn run_measured(mut cmd: std::process::Command, dir: &std::path::Path) -> (bool, String, String, i64) {
    let out = dir.join("measured.out");
    let err = dir.join("measured.err");
    let mut child = cmd
        .stdout(std::process::Stdio::from(std::fs::File::create(&out).unwrap()))
        .stderr(std::process::Stdio::from(std::fs::File::create(&err).unwrap()))
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            if let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let read = |p| std::fs::read_to_string(p).unwrap();
    (status.success(), read(&out), read(&err), peak_kib)
}

/// A sparse file of `size` bytes holding `chunk` at each of `offsets`; the
/// rest reads as zeros.
pub fn sparse_file(path: &Path, size: u64, chunk: &[u8], offsets: &[u64]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for &off in offsets {
        f.write_all_at(chunk, off).unwrap();
    }
}

/// Files under `dir`, recursively; 0 if it does not exist.
pub fn walk_count(dir: &Path) -> usize {
    let mut n = 0;
    walk(dir, &mut |_| n += 1);
    n
}

pub fn xattr_set(path: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings and a buffer of the given length.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
}

/// Extended attribute `name` of `path` (of any length Linux allows).
pub fn xattr_get(path: &Path, name: &str) -> Vec<u8> {
    let p = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: as above.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "getxattr: {}", std::io::Error::last_os_error());
    buf.truncate(r as usize);
    buf
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Deterministic pseudo-random bytes.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A running `cairn mount` of a home, unmounted on drop.
pub struct Mounted {
    pub dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

pub fn is_mounted(dir: &Path) -> bool {
    let target = dir.to_str().unwrap();
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(target))
}

impl Home {
    /// An empty home (no config): `cairn mount` initialises it.
    pub fn empty() -> Home {
        Home {
            dir: tempfile::Builder::new().prefix("cairn-test-").tempdir().unwrap(),
            device: None,
        }
    }

    /// Where a mount's daemon logs: kept in /tmp when CAIRN_TEST_LOG is set.
    pub fn log_path(&self) -> PathBuf {
        match std::env::var_os("CAIRN_TEST_LOG") {
            Some(_) => PathBuf::from(format!(
                "/tmp/cairn-test-{}.log",
                self.path().file_name().unwrap().to_string_lossy()
            )),
            None => self.path().join("mount.log"),
        }
    }

    pub fn mount(&self, extra: &[&str]) -> Mounted {
        let dir = tempfile::Builder::new().prefix("cairn-mnt-").tempdir().unwrap();
        let child = self
            .command(&[&["mount", dir.path().to_str().unwrap()], extra].concat())
            .stdout(std::process::Stdio::null())
            .stderr(
                // Appended to: a test's later mounts of one home keep the log.
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.log_path())
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let m = Mounted {
            dir,
            child: Some(child),
        };
        for _ in 0..200 {
            if is_mounted(m.path()) {
                return m;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!(
            "mount did not appear: {}",
            std::fs::read_to_string(self.log_path()).unwrap_or_default()
        );
    }
}

impl Mounted {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// Unmounts as a user would and returns the daemon's exit status.
    pub fn unmount(mut self) -> std::process::ExitStatus {
        let ok = Command::new("fusermount3")
            .arg("-u")
            .arg(self.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "fusermount3 -u failed");
        self.wait()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal to the daemon and returns its exit status.
    pub fn signal(mut self, sig: i32) -> std::process::ExitStatus {
        let pid = self.child.as_ref().unwrap().id() as i32;
        // SAFETY: kill on the PID of the child we spawned.
        unsafe { libc::kill(pid, sig) };
        self.wait()
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        for _ in 0..400 {
            if let Some(status) = child.try_wait().unwrap() {
                // After a kill, auto-unmount lags a moment; the temporary
                // mount point can only be removed once the mount is gone.
                for _ in 0..100 {
                    if !is_mounted(self.path()) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                return status;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        let _ = child.kill();
        panic!("cairn mount did not exit within 10 s of unmounting");
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(self.path())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(data))
}

/// Mounts `home`, copies in a 100 MiB file and a tree, syncs, deletes the
/// staging cache, mounts again and compares everything, read from the grid
/// alone.
pub fn files_survive_losing_the_cache(home: &Home) {
    let mnt = home.mount(&[]);
    let big = bytes(100 << 20, 11);
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("big.bin"), &big).unwrap();
    let tree = src.path().join("tree");
    for i in 0..120 {
        let dir = tree.join(format!("d{}", i % 7));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}")), bytes(i * 997 % 20_000, i as u64)).unwrap();
    }
    std::os::unix::fs::symlink("d0/f0", tree.join("link")).unwrap();
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(ok.success(), "cp -a {from:?}");
    };
    copy(&src.path().join("big.bin"), mnt.path());
    copy(&tree, mnt.path());
    let same = |mnt: &Mounted, what: &str| {
        let out = std::process::Command::new("diff")
            .arg("-r")
            .arg(src.path().join(what))
            .arg(mnt.file(what))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "diff -r {what}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    // Readers see writes at once, before any upload.
    same(&mnt, "big.bin");
    same(&mnt, "tree");
    home.ok(&["sync"]);
    assert!(mnt.unmount().success(), "clean unmount exits 0");

    std::fs::remove_dir_all(home.path().join("cache")).unwrap();
    let mnt = home.mount(&[]);
    same(&mnt, "big.bin");
    same(&mnt, "tree");
    assert_eq!(
        std::fs::read_link(mnt.file("tree/link")).unwrap().to_str(),
        Some("d0/f0")
    );
    let times = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().modified().unwrap();
    assert_eq!(
        times(&tree.join("d3/f10")),
        times(&mnt.file("tree/d3/f10")),
        "cp -a kept mtime"
    );
    assert!(mnt.unmount().success());
}

/// Every server of `home`'s grid lists the records of a prefix (and only
/// those), deletes one, and
/// deletes one that is not there without error.
pub fn records_are_listed_by_prefix_and_deleted(home: &Home) {
    let config = home.config();
    let grid = cairn::grid::Grid::from_config(&config, home.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for s in &grid.servers {
        let server = &s.server;
        rt.block_on(async {
            for name in ["log-d1-a-1", "log-d1-a-2", "log-d1-b-1", "head-d1-a", "log-d2-a-1"] {
                server.put_record(name, name.as_bytes().to_vec()).await.unwrap();
            }
            let mut listed = server.list_records("log-d1-a-").await.unwrap();
            listed.sort();
            assert_eq!(listed, ["log-d1-a-1", "log-d1-a-2"], "server {}", s.name);
            assert_eq!(server.list_records("head-d1-").await.unwrap(), ["head-d1-a"]);
            assert!(server.list_records("bell-").await.unwrap().is_empty());
            server.delete_record("log-d1-a-1").await.unwrap();
            server.delete_record("log-d1-a-1").await.unwrap();
            assert_eq!(server.list_records("log-d1-a-").await.unwrap(), ["log-d1-a-2"]);
            assert_eq!(server.get_record("log-d1-a-1").await.unwrap(), None);
            assert_eq!(server.get_record("log-d1-a-2").await.unwrap().unwrap(), b"log-d1-a-2");
        });
    }
}
