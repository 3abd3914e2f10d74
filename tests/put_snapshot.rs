//! Ticket #427: a source file rewritten while `cairn put` reads it. What is
//! uploaded must be exactly one whole state of the file, byte for byte.

// These tests drive the `cairn` binary, a FUSE mount or Unix signals; the
// Windows build runs the core's own tests (lib, codec, staging, vfs_model).
#![cfg(unix)]

mod common;

use std::collections::HashSet;
use std::io::{Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{stderr, Home};

const SIZE: usize = 8 << 20;
const CHUNK: usize = 64 << 10;

#[test]
fn a_file_rewritten_during_put_is_uploaded_as_one_whole_state() {
    // The oracle below (one fill byte = one whole state) holds only if the
    // writer is never stopped in the middle of a rewrite. Right after the
    // 4 GiB puts of other tests, the kernel throttles writers on dirty
    // pages: the writer then sleeps inside a write whose ctime already
    // moved, the file itself stays half-rewritten and quiet, and `put`
    // rightly uploads that state (seen in CI). Start with clean pages.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let home = Home::init(&[]);
    let src = home.file("live.bin");
    std::fs::write(&src, vec![0u8; SIZE]).unwrap();

    // The writer rewrites the file in place, chunk by chunk, one fill byte
    // per generation, so any state caught mid-rewrite mixes two bytes. It is
    // busy half the time and idle the other half, so both races and stable
    // windows occur.
    //
    // A mixed state is still one the file really had if the writer stalled
    // in it (descheduled on a loaded machine: seen in CI), and `put` rightly
    // uploads a state that stayed quiet through its snapshot. So the writer
    // notes every chunk whose write, with the gap before it, took longer
    // than `stall`: a torn upload must fall in such a chunk. A snapshot is
    // trusted only if the source stayed quiet from a clock tick before it
    // began until its copy of 8 MiB ended, so a pause shorter than one copy
    // cannot pass for a stable state; `stall` is half the fastest copy
    // measured here, so this machine's speed sets it.
    let stall = (0..3)
        .map(|_| {
            let t = Instant::now();
            std::fs::copy(&src, home.file("probe.bin")).unwrap();
            t.elapsed()
        })
        .min()
        .unwrap()
        / 2;
    let stop = Arc::new(AtomicBool::new(false));
    let stalls = Arc::new(Mutex::new(HashSet::<(u8, usize)>::new()));
    let writer = {
        let (stop, stalls) = (stop.clone(), stalls.clone());
        let src = src.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
            let mut generation = 1u8;
            while !stop.load(Ordering::Relaxed) {
                let busy_until = Instant::now() + Duration::from_millis(40);
                while Instant::now() < busy_until {
                    f.seek(SeekFrom::Start(0)).unwrap();
                    // One clock reading per chunk, so every moment between
                    // two writes' returns is charged to one chunk.
                    let mut last = Instant::now();
                    for chunk in 0..SIZE / CHUNK {
                        f.write_all(&[generation; CHUNK]).unwrap();
                        let now = Instant::now();
                        if now - last >= stall {
                            stalls.lock().unwrap().insert((generation, chunk));
                        }
                        last = now;
                    }
                    generation = generation.wrapping_add(1).max(1);
                }
                std::thread::sleep(Duration::from_millis(40));
            }
        })
    };

    let mut retries_seen = 0;
    let mut uploaded = 0;
    let mut stalled_states = 0;
    // At least 12 puts, and more (up to 40) until one has met the writer.
    for i in 0..40 {
        if i >= 12 && retries_seen > 0 {
            break;
        }
        let dest = format!("/live-{i}.bin");
        let out = home
            .command(&["put", src.to_str().unwrap(), &dest])
            .env("CAIRN_LOG", "cairn=info")
            .output()
            .unwrap();
        let log = stderr(&out);
        retries_seen += log.matches("changed during snapshot").count();
        if !out.status.success() {
            // Giving up is allowed, but only with the clear error.
            assert!(log.contains("kept changing while it was read"), "{log}");
            continue;
        }
        uploaded += 1;
        let copy = home.file("copy.bin");
        home.ok(&["get", &dest, copy.to_str().unwrap()]);
        let bytes = std::fs::read(&copy).unwrap();
        assert_eq!(bytes.len(), SIZE);
        let first = bytes[0];
        let Some(torn) = bytes.iter().position(|&b| b != first) else {
            continue;
        };
        // One rewrite caught where it stalled: `first` up to `torn`, the
        // generation before from there on. A pause inside chunk c's write,
        // or before it, is charged to c; one just after chunk c-1's write
        // returned, before its clock reading, is charged to c-1.
        let rest = bytes[torn];
        let chunk = torn / CHUNK;
        let stalled = bytes[torn..].iter().all(|&b| b == rest) && {
            let stalls = stalls.lock().unwrap();
            stalls.contains(&(first, chunk)) || (torn % CHUNK == 0 && stalls.contains(&(first, chunk - 1)))
        };
        assert!(
            stalled,
            "put {i} uploaded a torn file: byte {first} then {rest} at {torn}, where the writer did not stall"
        );
        stalled_states += 1;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(uploaded > 0, "no put found a stable moment");
    if stalled_states > 0 {
        eprintln!("{stalled_states} upload(s) caught the writer stalled (over {stall:?}) mid-rewrite");
    }
    // Proves the race was actually exercised, so this test could fail.
    assert!(retries_seen > 0, "no snapshot ever overlapped a rewrite");
}

#[test]
fn put_of_a_missing_file_or_directory_fails_clearly() {
    let home = Home::init(&[]);
    let out = home.cairn(&["put", "/nonexistent/file", "/x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/file"), "{}", stderr(&out));
    let out = home.cairn(&["put", home.path().to_str().unwrap(), "/x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a regular file"), "{}", stderr(&out));
    assert!(home.ok(&["ls", "/"]).is_empty());
}
