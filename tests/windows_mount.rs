//! Acceptance tests for a Windows machine with WinFsp (issue 10): the real
//! `cairn.exe mount` driven through std::fs. Run there with
//! `cargo test --release --test windows_mount`; see integration/windows/.
//! Without WinFsp (Linux CI builds this file for Windows and lints it; wine
//! has no WinFsp driver) each test says so and returns.
#![cfg(windows)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const DRIVE: &str = "W:";

struct Mount {
    child: Child,
    home: tempfile::TempDir,
}

fn winfsp_installed() -> bool {
    if cairn::winfsp::ffi::load_winfsp().is_ok() {
        return true;
    }
    eprintln!("skipped: WinFsp is not installed here (wine or a bare Windows); these tests need its driver");
    false
}

impl Mount {
    fn start() -> Mount {
        let home = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["mount", DRIVE, "--writeback-delay", "0"])
            .env("CAIRN_HOME", home.path())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !Path::new(&format!("{DRIVE}\\")).exists() {
            assert!(Instant::now() < deadline, "cairn did not mount {DRIVE}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Mount { child, home }
    }

    fn file(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{DRIVE}\\{name}"))
    }

    fn versions(&self, path: &str) -> usize {
        let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["versions", "--json", path])
            .env("CAIRN_HOME", self.home.path())
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["versions"].as_array().map_or(0, Vec::len)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_handles_seal_once_on_the_last_cleanup() {
    if !winfsp_installed() {
        return;
    }
    let m = Mount::start();
    let mut a = std::fs::File::create(m.file("two.txt")).unwrap();
    let mut b = std::fs::OpenOptions::new().write(true).open(m.file("two.txt")).unwrap();
    a.write_all(b"first").unwrap();
    drop(a);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(m.versions("/two.txt"), 0, "sealed while a handle was open");
    b.write_all(b"FIRST").unwrap();
    drop(b);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(m.versions("/two.txt"), 1);
}

#[test]
fn delete_on_close_files_never_upload() {
    use std::os::windows::fs::OpenOptionsExt;
    if !winfsp_installed() {
        return;
    }
    let m = Mount::start();
    const FILE_FLAG_DELETE_ON_CLOSE: u32 = 0x0400_0000;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(FILE_FLAG_DELETE_ON_CLOSE)
        .open(m.file("~$owner.docx"))
        .unwrap();
    f.write_all(&[7; 4096]).unwrap();
    drop(f);
    assert!(!m.file("~$owner.docx").exists());
    assert_eq!(m.versions("/~$owner.docx"), 0);
}
