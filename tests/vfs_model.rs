//! The file system core without the kernel: random operation sequences
//! against a reference model, then the same content read back from the grid
//! alone after the cache is deleted. The model is names (in the root and in
//! one subdirectory) bound to files, files to bytes, and up to three open
//! handles that follow their file through renames and unlinks; several
//! names may be bound to one file (hard links); operations include
//! interleaved writes through several handles to one file and writers on
//! several threads at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cairn::config::Config;
use cairn::vfs::{Caller, SetAttr, Vfs, VfsError, VfsOptions};
use proptest::prelude::*;

const ROOT: u64 = 1;
/// The subdirectory the last two paths live in.
const DIR: &str = "e";
const PATHS: [&str; 6] = ["a", "b", "c", "d", "e/x", "e/y"];
const SLOTS: usize = 3;
const CALLER: Caller = Caller { uid: 0, gid: 0 };

#[derive(Debug, Clone)]
enum Op {
    /// Open (or create), write, close.
    Write {
        name: usize,
        offset: u64,
        len: usize,
        byte: u8,
    },
    Truncate {
        name: usize,
        size: u64,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Unlink {
        name: usize,
    },
    /// link(2): `to` becomes a further name of `from`'s file.
    Link {
        from: usize,
        to: usize,
    },
    Mkdir,
    Rmdir,
    /// Open an existing file for writing into a handle slot.
    Open {
        slot: usize,
        name: usize,
    },
    /// A write through an open handle, not closed after.
    HandleWrite {
        slot: usize,
        offset: u64,
        len: usize,
        byte: u8,
    },
    HandleRead {
        slot: usize,
        offset: u64,
        len: u32,
    },
    Close {
        slot: usize,
    },
    /// Writes to distinct files, each on its own thread, at once.
    Parallel(Vec<(usize, u64, usize, u8)>),
    Sync,
}

fn op() -> impl Strategy<Value = Op> {
    let name = 0..PATHS.len();
    let slot = 0..SLOTS;
    prop_oneof![
        5 => (name.clone(), 0u64..3_000_000, 1usize..1_500_000, any::<u8>())
            .prop_map(|(name, offset, len, byte)| Op::Write { name, offset, len, byte }),
        1 => (name.clone(), 0u64..3_000_000).prop_map(|(name, size)| Op::Truncate { name, size }),
        1 => (name.clone(), name.clone()).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => name.clone().prop_map(|name| Op::Unlink { name }),
        1 => (name.clone(), name.clone()).prop_map(|(from, to)| Op::Link { from, to }),
        1 => Just(Op::Mkdir),
        1 => Just(Op::Rmdir),
        2 => (slot.clone(), name.clone()).prop_map(|(slot, name)| Op::Open { slot, name }),
        3 => (slot.clone(), 0u64..3_000_000, 1usize..600_000, any::<u8>())
            .prop_map(|(slot, offset, len, byte)| Op::HandleWrite { slot, offset, len, byte }),
        2 => (slot.clone(), 0u64..3_500_000, 1u32..1_500_000)
            .prop_map(|(slot, offset, len)| Op::HandleRead { slot, offset, len }),
        2 => slot.prop_map(|slot| Op::Close { slot }),
        1 => prop::collection::vec((name, 0u64..2_000_000, 1usize..1_000_000, any::<u8>()), 2..4).prop_map(Op::Parallel),
        1 => Just(Op::Sync),
    ]
}

/// What the core must hold.
#[derive(Default)]
struct Model {
    dir: bool,
    names: BTreeMap<&'static str, usize>,
    files: HashMap<usize, Vec<u8>>,
    next_file: usize,
    handles: [Option<(usize, u64)>; SLOTS],
}

impl Model {
    /// Whether `path`'s parent directory exists.
    fn reachable(&self, path: &str) -> bool {
        self.dir || !path.starts_with(DIR)
    }

    fn write(&mut self, file: usize, offset: u64, len: usize, byte: u8) {
        let data = self.files.get_mut(&file).unwrap();
        let end = offset as usize + len;
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset as usize..end].fill(byte);
    }

    /// The file at `path`, made empty if new.
    fn file_at(&mut self, path: &'static str) -> usize {
        if let Some(f) = self.names.get(path) {
            return *f;
        }
        self.next_file += 1;
        self.files.insert(self.next_file, Vec::new());
        self.names.insert(path, self.next_file);
        self.next_file
    }
}

fn open_vfs(home: &std::path::Path, rt: &tokio::runtime::Runtime) -> Arc<Vfs> {
    let config = Config::load(&home.join("config.toml")).unwrap();
    let vfs = Vfs::new(
        VfsOptions {
            home: home.to_owned(),
            writeback_delay: Duration::ZERO,
            read_only: false,
            cache_max_bytes: u64::MAX,
        },
        &config,
        rt.handle().clone(),
    )
    .unwrap();
    rt.spawn(vfs.clone().run_uploads());
    vfs
}

/// The parent inode and last name of `path`.
fn parent_of(vfs: &Vfs, path: &str) -> Result<(u64, String), VfsError> {
    match path.split_once('/') {
        Some((dir, name)) => Ok((vfs.lookup(ROOT, dir)?.ino, name.to_string())),
        None => Ok((ROOT, path.to_string())),
    }
}

fn lookup(vfs: &Vfs, path: &str) -> Result<cairn::vfs::Attr, VfsError> {
    let (parent, name) = parent_of(vfs, path)?;
    vfs.lookup(parent, &name)
}

/// Up to `len` bytes at `offset` through handle `fh`.
fn read_at(vfs: &Vfs, fh: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut buf = vec![0; len as usize];
    let n = vfs.read(fh, offset, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

fn read_handle(vfs: &Vfs, fh: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let chunk = read_at(vfs, fh, out.len() as u64, 1 << 20);
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    out
}

fn read_all(vfs: &Vfs, path: &str) -> Option<Vec<u8>> {
    let attr = lookup(vfs, path).ok()?;
    let fh = vfs.open(attr.ino, false, false).unwrap();
    let out = read_handle(vfs, fh);
    vfs.release(fh).unwrap();
    assert_eq!(out.len() as u64, attr.size, "{path}: size in attributes");
    Some(out)
}

/// Open (or create) `path`, write, close: what `Op::Write` does.
fn write_file(vfs: &Vfs, path: &str, offset: u64, len: usize, byte: u8) {
    let fh = match lookup(vfs, path) {
        Ok(a) => vfs.open(a.ino, true, false).unwrap(),
        Err(_) => {
            let (parent, name) = parent_of(vfs, path).unwrap();
            vfs.create(parent, &name, 0o644, CALLER).unwrap().1
        }
    };
    vfs.write(fh, offset, &vec![byte; len]).unwrap();
    vfs.flush(fh).unwrap();
    vfs.release(fh).unwrap();
}

fn check(vfs: &Vfs, model: &Model) -> Result<(), TestCaseError> {
    for path in PATHS {
        let got = read_all(vfs, path);
        let want = model.names.get(path).map(|f| &model.files[f]);
        prop_assert!(got.as_ref() == want, "{} differs from the model", path);
        if let Some(file) = model.names.get(path) {
            let names = model.names.values().filter(|f| *f == file).count();
            prop_assert_eq!(lookup(vfs, path).unwrap().nlink as usize, names, "{}: link count", path);
        }
    }
    for (file, fh) in model.handles.iter().flatten() {
        prop_assert!(
            read_handle(vfs, *fh) == model.files[file],
            "an open handle reads other bytes"
        );
    }
    let listed = |ino| vfs.readdir(ino, 2).unwrap().len();
    let in_root = model.names.keys().filter(|p| !p.contains('/')).count() + model.dir as usize;
    prop_assert_eq!(listed(ROOT), in_root);
    if model.dir {
        let in_dir = model.names.keys().filter(|p| p.contains('/')).count();
        prop_assert_eq!(listed(vfs.lookup(ROOT, DIR).unwrap().ino), in_dir);
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Applies one operation to the core and the model.
fn apply(vfs: &Arc<Vfs>, rt: &tokio::runtime::Runtime, model: &mut Model, op: Op) -> Result<(), TestCaseError> {
    match op {
        Op::Write {
            name,
            offset,
            len,
            byte,
        } => {
            let path = PATHS[name];
            if model.reachable(path) {
                write_file(vfs, path, offset, len, byte);
                let file = model.file_at(path);
                model.write(file, offset, len, byte);
            }
        }
        Op::Truncate { name, size } => {
            let path = PATHS[name];
            if let Some(&file) = model.names.get(path) {
                let ino = lookup(vfs, path).unwrap().ino;
                let set = SetAttr {
                    size: Some(size),
                    ..Default::default()
                };
                vfs.setattr(ino, set).unwrap();
                model.files.get_mut(&file).unwrap().resize(size as usize, 0);
            }
        }
        Op::Rename { from, to } => {
            let (from, to) = (PATHS[from], PATHS[to]);
            if model.names.contains_key(from) && model.reachable(to) {
                let (p1, n1) = parent_of(vfs, from).unwrap();
                let (p2, n2) = parent_of(vfs, to).unwrap();
                vfs.rename(p1, &n1, p2, &n2, false).unwrap();
                // Two names of one file: rename(2) changes nothing.
                if model.names.get(from) != model.names.get(to) {
                    let file = model.names.remove(from).unwrap();
                    model.names.insert(to, file);
                }
            }
        }
        Op::Unlink { name } => {
            let path = PATHS[name];
            let done = parent_of(vfs, path).and_then(|(p, n)| vfs.unlink(p, &n)).is_ok();
            prop_assert_eq!(done, model.names.remove(path).is_some());
        }
        Op::Link { from, to } => {
            let (from, to) = (PATHS[from], PATHS[to]);
            if let Some(&file) = model.names.get(from).filter(|_| model.reachable(to)) {
                let (parent, name) = parent_of(vfs, to).unwrap();
                let made = vfs.link(lookup(vfs, from).unwrap().ino, parent, &name);
                prop_assert_eq!(made.is_ok(), !model.names.contains_key(to), "link {} {}", from, to);
                model.names.entry(to).or_insert(file);
            }
        }
        Op::Mkdir => {
            prop_assert_eq!(vfs.mkdir(ROOT, DIR, 0o755, CALLER).is_ok(), !model.dir);
            model.dir = true;
        }
        Op::Rmdir => {
            let empty = !model.names.keys().any(|p| p.contains('/'));
            prop_assert_eq!(vfs.rmdir(ROOT, DIR).is_ok(), model.dir && empty, "rmdir");
            model.dir &= !empty;
        }
        Op::Open { slot, name } => {
            let path = PATHS[name];
            if let (None, Some(&file)) = (model.handles[slot], model.names.get(path)) {
                let fh = vfs.open(lookup(vfs, path).unwrap().ino, true, false).unwrap();
                model.handles[slot] = Some((file, fh));
            }
        }
        Op::HandleWrite {
            slot,
            offset,
            len,
            byte,
        } => {
            if let Some((file, fh)) = model.handles[slot] {
                vfs.write(fh, offset, &vec![byte; len]).unwrap();
                model.write(file, offset, len, byte);
            }
        }
        Op::HandleRead { slot, offset, len } => {
            if let Some((file, fh)) = model.handles[slot] {
                let data = &model.files[&file];
                let from = (offset as usize).min(data.len());
                let to = (offset as usize + len as usize).min(data.len());
                prop_assert!(
                    read_at(vfs, fh, offset, len) == data[from..to],
                    "a read through a handle"
                );
            }
        }
        Op::Close { slot } => {
            if let Some((_, fh)) = model.handles[slot].take() {
                vfs.flush(fh).unwrap();
                vfs.release(fh).unwrap();
            }
        }
        Op::Parallel(writes) => {
            // Distinct files: two names of one file are one file.
            let mut seen = std::collections::HashSet::new();
            let writes: Vec<_> = writes
                .into_iter()
                .filter(|w| model.reachable(PATHS[w.0]) && seen.insert(model.names.get(PATHS[w.0]).ok_or(w.0)))
                .collect();
            std::thread::scope(|s| {
                for &(name, offset, len, byte) in &writes {
                    s.spawn(move || write_file(vfs, PATHS[name], offset, len, byte));
                }
            });
            for (name, offset, len, byte) in writes {
                let file = model.file_at(PATHS[name]);
                model.write(file, offset, len, byte);
            }
        }
        Op::Sync => {
            rt.block_on(vfs.sync(None)).unwrap();
        }
    }
    Ok(())
}

/// Runs `ops` on a core and on the model, comparing after each; then
/// reads everything back from the grid alone.
fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let home = tempfile::tempdir().unwrap();
    Config::embedded_default(home.path()).write_new(home.path()).unwrap();
    let rt = runtime();
    let vfs = open_vfs(home.path(), &rt);
    let mut model = Model::default();
    for op in ops {
        apply(&vfs, &rt, &mut model, op)?;
        check(&vfs, &model)?;
    }
    for slot in 0..SLOTS {
        apply(&vfs, &rt, &mut model, Op::Close { slot })?;
    }
    rt.block_on(vfs.sync(None)).unwrap();
    drop(vfs);
    drop(rt);

    // The grid alone: a new core over the same catalog, no cache.
    std::fs::remove_dir_all(home.path().join("cache")).unwrap();
    let rt = runtime();
    let vfs = open_vfs(home.path(), &rt);
    check(&vfs, &model)?;
    Ok(())
}

proptest! {
    // CAIRN_MODEL_CASES: fewer under wine (integration/windows-check), whose file I/O is slow.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("CAIRN_MODEL_CASES").map_or(32, |v| v.parse().expect("CAIRN_MODEL_CASES: a number"))
    ))]

    #[test]
    fn the_core_matches_a_model_and_the_grid_alone_restores_it(ops in prop::collection::vec(op(), 1..24)) {
        run(ops)?;
    }
}

/// Shrunk from a failure of the model test: a file deleted while its
/// version uploaded. The upload read the freed chunks (as zeros before
/// the strict chunk reads; as an error after) and `sync` waited on a
/// version nobody needed; uploads of deleted files are now dropped.
#[test]
fn a_file_deleted_while_its_version_uploads_is_dropped_not_uploaded() {
    use Op::*;
    let ops = vec![
        Sync,
        Truncate { name: 1, size: 205287 },
        Truncate { name: 1, size: 2565347 },
        Write {
            name: 2,
            offset: 1455170,
            len: 72088,
            byte: 115,
        },
        Unlink { name: 0 },
        Write {
            name: 1,
            offset: 628387,
            len: 777745,
            byte: 188,
        },
        Sync,
        Sync,
        Write {
            name: 2,
            offset: 1656358,
            len: 853141,
            byte: 191,
        },
        Write {
            name: 0,
            offset: 2090747,
            len: 1015387,
            byte: 36,
        },
        Unlink { name: 2 },
        Unlink { name: 0 },
        Write {
            name: 2,
            offset: 1136969,
            len: 131592,
            byte: 165,
        },
    ];
    run(ops).unwrap();
}

/// Shrunk from a failure of the model test while sealing moved off the
/// core's lock: a new file's copy, sealed in place, was queued when its
/// version was recorded, before its directory was renamed into place, and
/// `sync` uploaded it from a directory not there yet ("chunk 0 of the
/// sealed version is missing"). A version is now queued after the rename.
#[test]
fn a_version_sealed_in_place_is_queued_only_once_its_directory_is_there() {
    use Op::*;
    let ops = vec![
        Write {
            name: 1,
            offset: 2248606,
            len: 580155,
            byte: 245,
        },
        Rmdir,
        Open { slot: 2, name: 1 },
        Open { slot: 0, name: 1 },
        Sync,
        Open { slot: 2, name: 0 },
        HandleWrite {
            slot: 1,
            offset: 2237759,
            len: 283598,
            byte: 138,
        },
        Close { slot: 0 },
        Sync,
        Parallel(vec![
            (2, 1224762, 550704, 66),
            (3, 963937, 210666, 47),
            (0, 918292, 884272, 176),
        ]),
    ];
    run(ops).unwrap();
}

/// Shrunk from a failure of the model test (session 19): a truncate
/// sealed a version while the uploader freed an older one that the
/// newer one's base took a chunk from. The seal names where its base
/// takes an unchanged chunk, not the base itself, and read the base's
/// layer before the uploader settled it; the uploader had settled the
/// file's versions without the new one and freed the older one, so the
/// new version named a directory gone ("staged chunk 0 is missing and
/// the version is not on the grid"). The uploader now settles and frees
/// under the file's copy lock. It failed about 1 run in 8 before, so it
/// runs many rounds.
#[test]
fn a_seal_beside_the_uploader_freeing_an_older_version_keeps_every_chunk() {
    use Op::*;
    let ops = vec![
        Parallel(vec![
            (4, 1483605, 528980, 232),
            (4, 1401991, 192230, 106),
            (0, 367418, 204070, 41),
        ]),
        Sync,
        Open { slot: 1, name: 3 },
        Write {
            name: 2,
            offset: 2981242,
            len: 1117814,
            byte: 56,
        },
        Truncate { name: 0, size: 2079335 },
        Parallel(vec![
            (2, 472720, 453328, 14),
            (3, 961908, 23218, 168),
            (0, 1906868, 129829, 221),
        ]),
        Truncate { name: 0, size: 2941408 },
        HandleWrite {
            slot: 2,
            offset: 1472656,
            len: 17097,
            byte: 27,
        },
    ];
    for _ in 0..24 {
        run(ops.clone()).unwrap();
    }
}

/// Files in `cache/versions` and `cache/work` that belong to `ino`.
fn cached_of(home: &std::path::Path, ino: u64) -> Vec<String> {
    let mut left = Vec::new();
    for (dir, sep) in [("versions", '.'), ("work", '-')] {
        for entry in std::fs::read_dir(home.join("cache").join(dir)).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if name.split_once(sep).is_some_and(|(i, _)| i == ino.to_string()) {
                left.push(format!("{dir}/{name}"));
            }
        }
    }
    left
}

/// Found in review of the lock per open file: a file deleted while its
/// last release seals it (sealing links its chunks without the core's
/// lock), with a reader of it closing at the same moment. The reader's
/// release took the deleted file's entry away under the seal, which then
/// panicked holding the core's lock; without a reader, the seal recorded
/// and uploaded a version of a file already gone. Whoever lets a deleted
/// file go last now frees it, and a seal records nothing for it. Timing
/// decides how the calls overlap, so it runs many rounds.
#[test]
fn a_file_deleted_while_its_last_release_seals_leaves_nothing_behind() {
    let home = tempfile::tempdir().unwrap();
    Config::embedded_default(home.path()).write_new(home.path()).unwrap();
    let rt = runtime();
    let vfs = open_vfs(home.path(), &rt);
    for round in 0..24u64 {
        // A sealed base of 16 chunks: the next seal links every one.
        write_file(&vfs, "a", 0, 16 << 20, 1);
        let ino = lookup(&vfs, "a").unwrap().ino;
        let writer = vfs.open(ino, true, false).unwrap();
        let reader = (round % 2 == 0).then(|| vfs.open(ino, false, false).unwrap());
        vfs.write(writer, round * 4096, &[2; 4096]).unwrap();
        let sealer = {
            let vfs = vfs.clone();
            std::thread::spawn(move || vfs.release(writer))
        };
        vfs.unlink(ROOT, "a").unwrap();
        if let Some(reader) = reader {
            vfs.release(reader).unwrap();
        }
        sealer.join().unwrap().unwrap();
        rt.block_on(vfs.sync(None)).unwrap();
        assert!(lookup(&vfs, "a").is_err());
        assert_eq!(cached_of(home.path(), ino), Vec::<String>::new(), "round {round}");
    }
}

/// The catalog's writer stalls (here another connection holds SQLite's
/// write lock, as a WAL append stuck behind the kernel's writeback would):
/// a create waits, holding the core's catalog lock, while stat, lookup,
/// listing and xattr reads of the namespace still answer at once. (An open
/// waits: it counts its handle under that lock, against a racing unlink.)
#[test]
fn reads_of_the_namespace_do_not_wait_for_a_stalled_catalog_writer() {
    let home = tempfile::tempdir().unwrap();
    Config::embedded_default(home.path()).write_new(home.path()).unwrap();
    let rt = runtime();
    let vfs = open_vfs(home.path(), &rt);
    write_file(&vfs, "a", 0, 1000, 7);
    let a = lookup(&vfs, "a").unwrap().ino;
    let blocker = rusqlite::Connection::open(home.path().join("catalog.db")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let creator = {
        let vfs = vfs.clone();
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let made = vfs.create(ROOT, "b", 0o644, CALLER);
            (made.map(|(_, fh)| vfs.release(fh)), started.elapsed())
        })
    };
    // The create is in, waiting on SQLite's lock under the core's.
    std::thread::sleep(Duration::from_millis(300));
    let reads = std::time::Instant::now();
    assert_eq!(vfs.getattr(a).unwrap().size, 1000);
    assert_eq!(vfs.lookup(ROOT, "a").unwrap().ino, a);
    assert!(vfs
        .readdir(ROOT, 0)
        .unwrap()
        .iter()
        .any(|(ino, _, _, name)| *ino == a && name == "a"));
    assert!(vfs
        .readdir_plus(ROOT, 0)
        .unwrap()
        .iter()
        .any(|(_, name, attr)| name == "a" && attr.size == 1000));
    assert!(vfs
        .listxattr(a, CALLER)
        .unwrap()
        .iter()
        .any(|n| n == "user.cairn.state"));
    let took = reads.elapsed();
    blocker.execute_batch("COMMIT").unwrap();
    let (made, create_took) = creator.join().unwrap();
    made.unwrap().unwrap();
    assert!(
        create_took >= Duration::from_millis(300),
        "the create did not wait: {create_took:?}"
    );
    // Waiting would take the writer's 10 s busy timeout.
    assert!(
        took < Duration::from_secs(3),
        "reads waited {took:?} for the catalog's writer"
    );
    assert!(lookup(&vfs, "b").is_ok());
}
