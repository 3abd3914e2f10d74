//! `cairn put` of a 4 GiB file keeps its peak RSS under 100 MiB: memory is
//! bounded by a few blocks per server, not by the file.
//! Its own test binary, so RUSAGE_CHILDREN sees only this test's children.

// These tests drive the `cairn` binary, a FUSE mount or Unix signals; the
// Windows build runs the core's own tests (lib, codec, staging, vfs_model).
#![cfg(unix)]

mod common;

use common::{bytes, sparse_file, Home};

fn peak_child_rss_kib() -> i64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) }, 0);
    usage.ru_maxrss
}

#[test]
fn put_of_4_gib_stays_under_100_mib_rss() {
    let home = Home::init(&[]);
    let src = home.file("big.bin");
    let size: u64 = 4 << 30;
    // Real data at the start, middle and end; the rest reads as zeros.
    let chunk = bytes(8 << 20, 5);
    sparse_file(&src, size, &chunk, &[0, size / 2, size - chunk.len() as u64]);
    let out = home.ok(&["put", src.to_str().unwrap(), "/big.bin"]);
    assert!(out.contains(&format!(":3:5:{size}:")), "{out}");
    let rss_mib = peak_child_rss_kib() / 1024;
    eprintln!("peak RSS of cairn put, 4 GiB: {rss_mib} MiB");
    assert!(rss_mib < 100, "peak RSS {rss_mib} MiB");
    std::fs::remove_file(&src).unwrap();

    // And it is all there: spot-check by reading it back.
    home.get_and_spot_check("/big.bin", size, size / 2, &chunk);
}
