//! Shared helpers: a private CAIRN_HOME and the real `cairn` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    /// A fresh home with the embedded default grid (or `init_args`).
    pub fn init(init_args: &[&str]) -> Home {
        let home = Home {
            dir: tempfile::Builder::new().prefix("cairn-test-").tempdir().unwrap(),
        };
        let out = home.cairn(&[&["init"], init_args].concat());
        assert!(out.status.success(), "init failed: {}", stderr(&out));
        home
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.args(args).env("CAIRN_HOME", self.path()).env_remove("CAIRN_LOG");
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

    pub fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
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
        }
    }

    /// Where a mount's daemon logs: kept in /tmp when CAIRN_TEST_LOG is set.
    fn log_path(&self) -> PathBuf {
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
            .stderr(std::fs::File::create(self.log_path()).unwrap())
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
