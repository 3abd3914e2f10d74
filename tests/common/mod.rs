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
}

pub fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries {
        let p = e.unwrap().path();
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
