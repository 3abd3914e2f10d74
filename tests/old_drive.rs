//! A drive written by an older cairn still opens: a home made by the cairn
//! of 2026-12-02 (commit a1b8255: its catalog schema, staging layout, `pack2`
//! packs and whole `chk1` versions, before mapped versions, layered seals
//! and checkpoints) is mounted by this build, read from its staging cache
//! and then from the grid alone, changed, and synced.
//!
//! The fixture, `tests/fixtures/drive-2026-12-02`, was made by that build
//! (2-of-3 grid, 64 KiB segments, to keep it small): `docs/notes.txt`
//! written three times (a sync after each), `docs/deep/hello.txt` (mode
//! 640, mtime 2020-01-02 03:04:05 UTC, xattr `user.color=blue`),
//! `docs/deep/small.bin` (70,000 random bytes), `big.bin` (1,100,000
//! random bytes, its staging copy removed so it is read from the grid), and
//! the symlink `link` → `docs/notes.txt`. Its config names its servers
//! under `@HOME@`, replaced here by the copy's path.

#![cfg(unix)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{sha256_hex, xattr_get, Home};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/drive-2026-12-02");

/// The files as the old build wrote them: path and SHA-256.
const FILES: [(&str, &str); 4] = [
    (
        "docs/notes.txt",
        "008ec8974f1843ed8f001dc692f98308f27d9b3e5735e6b94a937dcc3591733f",
    ),
    (
        "docs/deep/hello.txt",
        "cd2fdfd1d96e5a8e26f6aef54b7cab31e955922ba2b040529c810839498c0cda",
    ),
    (
        "docs/deep/small.bin",
        "68656223f06403c388dddc85c7f0d33ebd3c52ac80e1e8a0523b271e877cf1bd",
    ),
    (
        "big.bin",
        "218c6243cde197323473b1532ee347674443465379e9fb95b4ab022e1af84436",
    ),
];

fn old_home() -> Home {
    let home = Home::empty();
    common::copy_tree(Path::new(FIXTURE), home.path());
    let config = home.file("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("@HOME@", home.path().to_str().unwrap())).unwrap();
    home
}

fn assert_files(mnt: &common::Mounted) {
    for (path, sha) in FILES {
        assert_eq!(sha256_hex(&std::fs::read(mnt.file(path)).unwrap()), sha, "{path}");
    }
    let hello = std::fs::metadata(mnt.file("docs/deep/hello.txt")).unwrap();
    assert_eq!(hello.permissions().mode() & 0o7777, 0o640);
    assert_eq!(hello.mtime(), 1_577_934_245);
    assert_eq!(xattr_get(&mnt.file("docs/deep/hello.txt"), "user.color"), b"blue");
    assert_eq!(
        std::fs::read_link(mnt.file("link")).unwrap(),
        Path::new("docs/notes.txt")
    );
}

#[test]
fn a_drive_written_by_the_cairn_of_2026_12_02_opens_reads_and_changes() {
    let home = old_home();
    let mnt = home.mount(&["--writeback-delay", "0"]);
    assert_files(&mnt);
    // Its history came along, each version readable.
    let versions = home.versions("/docs/notes.txt");
    assert_eq!(versions.len(), 3, "{versions:?}");
    // It takes changes in this build's formats beside the old ones.
    std::fs::write(mnt.file("docs/notes.txt"), b"fourth, by the new build\n").unwrap();
    let big = common::bytes(1_500_000, 77);
    std::fs::write(mnt.file("docs/new.bin"), &big).unwrap();
    home.ok(&["sync"]);
    assert_eq!(home.versions("/docs/notes.txt").len(), 4);
    assert!(mnt.unmount().success());

    // From the grid alone: the old shares and packs, and the new ones.
    std::fs::remove_dir_all(home.file("cache")).unwrap();
    let mnt = home.mount(&[]);
    assert_eq!(
        std::fs::read(mnt.file("docs/notes.txt")).unwrap(),
        b"fourth, by the new build\n"
    );
    assert!(std::fs::read(mnt.file("docs/new.bin")).unwrap() == big);
    for (path, sha) in FILES.iter().skip(1) {
        assert_eq!(sha256_hex(&std::fs::read(mnt.file(path)).unwrap()), *sha, "{path}");
    }
    assert!(mnt.unmount().success());
    for path in ["/big.bin", "/docs/deep/small.bin", "/docs/new.bin"] {
        home.ok(&["check", path]);
    }
    // A server lost (s5 held share 0 of `big.bin`): its old shares still
    // rebuild it, through Reed-Solomon.
    std::fs::remove_dir_all(home.server_dir("s5")).unwrap();
    assert_eq!(sha256_hex(&home.get_bytes("/big.bin").unwrap()), FILES[3].1);
}
