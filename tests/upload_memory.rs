//! The memory bound of uploads with a stalled server: a 2 GiB file uploads
//! while one server stops answering after its first MiB. Its blocks spill
//! to disk instead of memory, so the uploader's peak RSS stays under the
//! memory budget (default 64 MiB) + 32 MiB.

// These tests drive the `cairn` binary, a FUSE mount or Unix signals; the
// Windows build runs the core's own tests (lib, codec, staging, vfs_model).
#![cfg(unix)]

mod common;

use cairn::config::FaultConfig;
use common::{bytes, run_measured, sparse_file, Home};

#[test]
fn a_2_gib_upload_with_a_stalled_server_stays_within_the_memory_budget() {
    let home = Home::init(&[]);
    home.edit_config(|c| c.grid.timeout_secs = 20);
    home.set_faults(
        "s2",
        FaultConfig {
            stall_after_bytes: Some(1 << 20),
            ..Default::default()
        },
    );
    let budget_mib = home.config().grid.memory_budget_mib as i64;
    let src = home.file("big.bin");
    let size: u64 = 2 << 30;
    let chunk = bytes(8 << 20, 9);
    sparse_file(&src, size, &chunk, &[0, size / 3, size - chunk.len() as u64]);

    let mut cmd = home.command(&["put", "--json", src.to_str().unwrap(), "/big.bin"]);
    cmd.env("CAIRN_LOG", "cairn=info");
    let (ok, stdout, log, peak_kib) = run_measured(cmd, home.path());
    assert!(ok, "{log}");
    let peak_mib = peak_kib / 1024;
    eprintln!("peak RSS of a 2 GiB put with s2 stalled: {peak_mib} MiB (budget {budget_mib} MiB)");
    assert!(log.contains("server is behind; spilling its blocks to disk"), "{log}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["placed"].as_array().unwrap().len(), 4, "{report}");
    assert_eq!(report["failures"][0]["server"], "s2", "{report}");
    assert!(peak_mib < budget_mib + 32, "peak RSS {peak_mib} MiB");
    std::fs::remove_file(&src).unwrap();

    home.get_and_spot_check("/big.bin", size, size / 3, &chunk);
}
