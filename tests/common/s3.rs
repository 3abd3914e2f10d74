//! Real S3 servers for tests: s3s-fs processes on 127.0.0.1, each with its
//! own root directory and a `cairn` bucket. `.ci/run` installs s3s-fs.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "cairn-test";
pub const SECRET_KEY: &str = "cairn-test-secret";
pub const BUCKET: &str = "cairn";

pub struct S3Servers {
    pub root: tempfile::TempDir,
    pub ports: Vec<u16>,
    procs: Vec<Option<Child>>,
}

fn binary() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let installed = home.join(".cargo/bin/s3s-fs");
    if installed.exists() {
        return installed;
    }
    PathBuf::from("s3s-fs")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl S3Servers {
    pub fn start(n: usize) -> S3Servers {
        let root = tempfile::Builder::new().prefix("cairn-s3-").tempdir().unwrap();
        let mut servers = S3Servers {
            root,
            ports: Vec::new(),
            procs: Vec::new(),
        };
        for i in 0..n {
            let dir = servers.data_dir(i);
            std::fs::create_dir_all(dir.join(BUCKET)).unwrap();
            servers.ports.push(free_port());
            servers.procs.push(None);
            servers.spawn(i);
        }
        servers
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.root.path().join(format!("server{i}"))
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::File::create(self.root.path().join(format!("server{i}.log"))).unwrap();
        let child = Command::new(binary())
            .args(["--host", "127.0.0.1", "--port", &self.ports[i].to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.data_dir(i))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting s3s-fs (.ci/run installs it: cargo install --locked s3s-fs@0.14.1 --features binary): {e}"));
        self.procs[i] = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.ports[i])).is_err() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs on port {} never listened",
                self.ports[i]
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}/{BUCKET}/grid", self.ports[i])
    }

    /// `cairn init` arguments for a grid of these servers.
    pub fn init_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for i in 0..self.ports.len() {
            args.push("--s3".to_string());
            args.push(self.url(i));
        }
        // The secret comes from the environment: see `secret_env`.
        args.extend(["--s3-access-key-id", ACCESS_KEY].map(String::from));
        args
    }

    /// What `cairn init` with [`S3Servers::init_args`] needs in its
    /// environment: the secret key, never a command-line argument.
    pub fn secret_env(&self) -> [(&'static str, &'static str); 1] {
        [("CAIRN_S3_SECRET_ACCESS_KEY", SECRET_KEY)]
    }

    pub fn pid(&self, i: usize) -> i32 {
        self.procs[i].as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, i: usize, sig: i32) {
        // SAFETY: a signal to a process this helper started.
        assert_eq!(unsafe { libc::kill(self.pid(i), sig) }, 0);
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed server again on its port and data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Bytes the server processes wrote (mostly to sockets): /proc's wchar.
    pub fn bytes_sent(&self) -> u64 {
        (0..self.procs.len())
            .filter(|&i| self.procs[i].is_some())
            .map(|i| {
                let io = std::fs::read_to_string(format!("/proc/{}/io", self.pid(i))).unwrap();
                io.lines()
                    .find_map(|l| l.strip_prefix("wchar: "))
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum()
    }
}

impl Drop for S3Servers {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            if self.procs[i].is_some() {
                self.signal(i, libc::SIGCONT);
                self.kill(i);
            }
        }
    }
}
