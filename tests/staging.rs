//! The mount's chunked staging cache against a reference model (a Vec<u8>),
//! on real files: working copies read what was written and survive a crash,
//! sealed versions never change, and sealing shares unchanged chunks instead
//! of copying them.

use cairn::codec::FileCap;
use cairn::stage::chunks::{SealedVersion, WorkingCopy};
use cairn::stage::sums;
use proptest::prelude::*;

const CHUNK: u64 = 64;

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        len: usize,
        byte: u8,
    },
    Truncate(u64),
    /// Single bytes written one by one all over one chunk, more writes than
    /// a partial chunk logs before it is filled from its base.
    Scribble {
        chunk: u64,
        byte: u8,
    },
    /// fsync: syncs what was written since the last one, whatever was
    /// truncated away in between.
    Fsync,
    /// Seal the working copy as a version and open a new one over it.
    SealAndReopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..6 * CHUNK, 1usize..3 * CHUNK as usize, any::<u8>()).prop_map(|(offset, len, byte)| Op::Write { offset, len, byte }),
        1 => (0u64..6 * CHUNK).prop_map(Op::Truncate),
        1 => (0u64..6, any::<u8>()).prop_map(|(chunk, byte)| Op::Scribble { chunk, byte }),
        1 => Just(Op::Fsync),
        1 => Just(Op::SealAndReopen),
    ]
}

fn read_all(read_at: impl Fn(u64, &mut [u8]) -> std::io::Result<usize>, size: u64) -> Vec<u8> {
    // Odd-sized reads cross chunk boundaries at every alignment.
    let mut out = Vec::new();
    let mut buf = vec![0u8; 37];
    loop {
        let n = read_at(out.len() as u64, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    assert_eq!(out.len() as u64, size);
    out
}

/// A home with the embedded default grid's server directories made.
fn embedded_grid() -> (tempfile::TempDir, cairn::config::Config) {
    let home = tempfile::tempdir().unwrap();
    let config = cairn::config::Config::embedded_default(home.path());
    for s in &config.servers {
        std::fs::create_dir_all(s.path.as_ref().unwrap()).unwrap();
    }
    (home, config)
}

/// Seals with nothing to record.
fn seal(work: WorkingCopy, dir: std::path::PathBuf) -> SealedVersion {
    work.seal(dir, |_| Ok::<(), std::io::Error>(()))
        .map_err(|failed| failed.1)
        .unwrap()
}

proptest! {
    // CAIRN_MODEL_CASES: fewer under wine (integration/windows-check), whose file I/O is slow.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("CAIRN_MODEL_CASES").map_or(200, |v| v.parse().expect("CAIRN_MODEL_CASES: a number"))
    ))]

    #[test]
    fn matches_a_reference_model_and_sealed_versions_never_change(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut model: Vec<u8> = Vec::new();
        let mut sealed: Vec<(SealedVersion, Vec<u8>)> = Vec::new();
        let mut next_dir = 0;
        let mut fresh = || { next_dir += 1; dir.path().join(format!("d{next_dir}")) };
        let mut work = WorkingCopy::create(fresh(), None, CHUNK).unwrap();
        for op in ops {
            match op {
                Op::Write { offset, len, byte } => {
                    work.write_at(offset, &vec![byte; len]).unwrap();
                    let end = offset as usize + len;
                    if model.len() < end { model.resize(end, 0); }
                    model[offset as usize..end].fill(byte);
                }
                Op::Truncate(size) => {
                    work.truncate(size).unwrap();
                    model.resize(size as usize, 0);
                }
                Op::Scribble { chunk, byte } => {
                    for i in 0..70 {
                        let at = chunk * CHUNK + (i * 7) % CHUNK;
                        work.write_at(at, &[byte.wrapping_add(i as u8)]).unwrap();
                        if model.len() <= at as usize { model.resize(at as usize + 1, 0); }
                        model[at as usize] = byte.wrapping_add(i as u8);
                    }
                }
                Op::Fsync => work.fsync().unwrap(),
                Op::SealAndReopen => {
                    let version = seal(work, fresh());
                    prop_assert_eq!(read_all(|o, b| version.read_at(o, b), version.size), model.clone());
                    // Each chunk's sum, kept up as it was written (or copied
                    // from the base), is that of the chunk sealed.
                    for index in 0..version.size.div_ceil(CHUNK) {
                        let bytes = std::fs::read(version.locate(index).unwrap().held.unwrap()).unwrap();
                        prop_assert_eq!(sums::recorded(&version.dir, index).unwrap(), Some(sums::sum_of(&bytes)), "chunk {}", index);
                    }
                    work = WorkingCopy::create(fresh(), Some(version.clone()), CHUNK).unwrap();
                    sealed.push((version, model.clone()));
                }
            }
            prop_assert_eq!(work.size(), model.len() as u64);
            prop_assert_eq!(read_all(|o, b| work.read_at(o, b), work.size()), model.clone());
            // A crash now loses nothing: the copy rebuilt from disk reads the same.
            let recovered = WorkingCopy::recover(work.dir().to_owned(), CHUNK).unwrap();
            prop_assert_eq!(recovered.size(), model.len() as u64);
            prop_assert_eq!(read_all(|o, b| recovered.read_at(o, b), recovered.size()), model.clone());
        }
        for (version, content) in &sealed {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut version.reader(), &mut bytes).unwrap();
            prop_assert_eq!(&bytes, content, "a sealed version changed");
        }
        // Settled oldest first, no version needs another: each survives the
        // removal of every older one (a superseded version is freed so).
        for (version, _) in &sealed {
            version.settle(&|_| false).unwrap();
            prop_assert!(version.layer().unwrap().is_none(), "a settled version holding every chunk has no layer");
        }
        for (i, (version, _)) in sealed.iter().enumerate() {
            std::fs::remove_dir_all(&version.dir).unwrap();
            for (later, content) in &sealed[i + 1..] {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut later.reader(), &mut bytes).unwrap();
                prop_assert_eq!(&bytes, content, "a version read through one removed after settling");
            }
        }
    }
}

/// Found in review: versions sealed one over another with no settle in
/// between (a long write-back delay, one long upload) must not read
/// through ever more layers. Each seal names where its base takes a chunk
/// from, so a read goes one layer deep however many seals come between.
#[test]
fn many_seals_without_a_settle_read_one_layer_deep() {
    let dir = tempfile::tempdir().unwrap();
    let mut work = WorkingCopy::create(dir.path().join("w0"), None, CHUNK).unwrap();
    work.write_at(0, &[1; 8 * CHUNK as usize]).unwrap();
    let mut version = seal(work, dir.path().join("v0"));
    let mut model = vec![1u8; 8 * CHUNK as usize];
    for i in 1..100u64 {
        let mut work = WorkingCopy::create(dir.path().join(format!("w{i}")), Some(version.clone()), CHUNK).unwrap();
        let at = (i % 7) * CHUNK + 3;
        work.write_at(at, &[i as u8; 5]).unwrap();
        model[at as usize..at as usize + 5].fill(i as u8);
        version = seal(work, dir.path().join(format!("v{i}")));
        for index in 0..8 {
            assert!(
                version.locate(index).unwrap().chain.len() <= 2,
                "seal {i}, chunk {index}"
            );
        }
    }
    assert_eq!(read_all(|o, b| version.read_at(o, b), version.size), model);
}

/// A layer file is local state: one naming a directory outside the cache,
/// chunks past either version, or garbage is refused as damage when the
/// chunk is read, never followed and never read as zeros.
#[test]
fn a_damaged_or_hostile_layer_is_refused_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let versions = dir.path().join("versions");
    std::fs::create_dir(&versions).unwrap();
    let mut work = WorkingCopy::create(dir.path().join("w1"), None, CHUNK).unwrap();
    work.write_at(0, &[3; 4 * CHUNK as usize]).unwrap();
    let v1 = seal(work, versions.join("1.1"));
    let mut work = WorkingCopy::create(dir.path().join("w2"), Some(v1.clone()), CHUNK).unwrap();
    work.write_at(0, b"x").unwrap();
    let v2 = seal(work, versions.join("1.2"));
    assert_eq!(v2.read_at(CHUNK, &mut [0; 4]).unwrap(), 4, "through its layer");
    let layer = v2.dir.join("layer");
    let size = 4 * CHUNK;
    for hostile in [
        format!(r#"[{{"name":"../../etc","size":{size},"chunks":[[1,4]]}}]"#),
        format!(r#"[{{"name":"1.2","size":{size},"chunks":[[1,4]]}}]"#),
        format!(r#"[{{"name":"1.1","size":{size},"chunks":[[1,9]]}}]"#),
        format!(r#"[{{"name":"1.1","size":{CHUNK},"chunks":[[1,4]]}}]"#),
        "not json".to_owned(),
    ] {
        std::fs::write(&layer, &hostile).unwrap();
        let err = v2.read_at(CHUNK, &mut [0; 4]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{hostile}: {err}");
    }
}

#[test]
fn a_chunk_altered_in_place_is_an_error_for_readers_and_the_uploader() {
    let dir = tempfile::tempdir().unwrap();
    let mut work = WorkingCopy::create(dir.path().join("w"), None, CHUNK).unwrap();
    work.write_at(0, &[7; 3 * CHUNK as usize]).unwrap();
    let v = seal(work, dir.path().join("v"));
    // Same length, one byte changed: only the sum can tell.
    let chunk = v.chunk_path(1);
    let mut bytes = std::fs::read(&chunk).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&chunk, &bytes).unwrap();
    let err = v.read_at(CHUNK, &mut [0; 8]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    let err = std::io::Read::read_to_end(&mut v.reader(), &mut Vec::new()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    // A working copy over it does not carry the damage into the next
    // version: the write into it (a partial chunk) succeeds, its bytes read
    // back, the rest of the chunk is an error, and so is the seal.
    let mut next = WorkingCopy::create(dir.path().join("w2"), Some(v.clone()), CHUNK).unwrap();
    next.write_at(CHUNK + 1, b"x").unwrap();
    let mut one = [0; 1];
    next.read_at(CHUNK + 1, &mut one).unwrap();
    assert_eq!(&one, b"x");
    assert!(next.read_at(CHUNK, &mut [0; 8]).is_err());
    let failed = next
        .seal(dir.path().join("v2"), |_| Ok::<(), std::io::Error>(()))
        .expect_err("sealing over a damaged chunk");
    assert_eq!(failed.1.kind(), std::io::ErrorKind::InvalidData, "{}", failed.1);
    // Chunks with no sum (from a cairn that kept none) are read as before.
    std::fs::remove_file(v.dir.join(sums::SUMS_FILE)).unwrap();
    assert_eq!(v.read_at(CHUNK + 10, &mut [0; 1]).unwrap(), 1);
}

#[test]
fn a_small_edit_of_a_large_file_stores_one_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = 1 << 20;
    let mut work = WorkingCopy::create(dir.path().join("w1"), None, chunk).unwrap();
    let data: Vec<u8> = (0..64 * chunk).map(|i| (i % 251) as u8).collect();
    work.write_at(0, &data).unwrap();
    let v1 = seal(work, dir.path().join("v1"));

    // Reopen, write 4 KiB in the middle, seal again: the new version's
    // directory holds that one chunk (O(changed), not O(file)) and reads
    // the rest through its layer.
    let mut work = WorkingCopy::create(dir.path().join("w2"), Some(v1.clone()), chunk).unwrap();
    work.write_at(30 * chunk + 100, &[0xAA; 4096]).unwrap();
    let v2 = seal(work, dir.path().join("v2"));
    let held: Vec<String> = std::fs::read_dir(&v2.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<u64>().is_ok())
        .collect();
    assert_eq!(held, vec!["30".to_owned()]);
    assert!(v2.layer().unwrap().is_some());
    let mut expected = data.clone();
    expected[(30 * chunk + 100) as usize..][..4096].fill(0xAA);
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut v2.reader(), &mut got).unwrap();
    assert!(got == expected, "v2 content through its layer");

    // Settled, it shares the base's chunks by hard link and needs it no more.
    v2.settle(&|_| false).unwrap();
    assert!(v2.layer().unwrap().is_none());
    // Stable std on Windows has no file index to compare.
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let mut shared = 0;
        for i in 0..64 {
            let a = std::fs::metadata(v1.dir.join(i.to_string())).unwrap();
            let b = std::fs::metadata(v2.dir.join(i.to_string())).unwrap();
            if a.ino() == b.ino() {
                shared += 1;
            }
        }
        assert_eq!(shared, 63, "every chunk but the edited one is shared");
    }
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut v2.reader(), &mut got).unwrap();
    assert!(got == expected, "v2 content");
    let mut old = Vec::new();
    std::io::Read::read_to_end(&mut v1.reader(), &mut old).unwrap();
    assert!(old == data, "v1 unchanged");
    std::fs::remove_dir_all(&v1.dir).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut v2.reader(), &mut got).unwrap();
    assert!(got == expected, "v2 content without its base");
}

#[test]
fn a_sealed_version_uploads_and_reads_back_from_the_grid() {
    use cairn::{download, grid::Grid, upload};
    use std::sync::Arc;

    let (home, config) = embedded_grid();
    let chunk = config.grid.segment_size as u64;
    let mut work = WorkingCopy::create(home.path().join("w"), None, chunk).unwrap();
    let data: Vec<u8> = (0..3 * chunk + 777).map(|i| (i * 7 % 256) as u8).collect();
    work.write_at(0, &data).unwrap();
    let version = seal(work, home.path().join("v"));

    let grid = Arc::new(Grid::from_config(&config, home.path()).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let source = upload::Source {
        reader: Box::new(version.reader()),
        size: version.size,
    };
    let report = rt
        .block_on(upload::upload(
            &grid,
            config.params(),
            config.grid.happy,
            source,
            [3; 16],
            Arc::new(()),
        ))
        .unwrap();
    assert_eq!(report.placed.len(), 5);
    let out = home.path().join("out");
    rt.block_on(download::download_to_file(
        grid,
        FileCap::Whole(report.cap),
        &out,
        Arc::new(()),
    ))
    .unwrap();
    assert!(std::fs::read(out).unwrap() == data);
}

/// Small sealed versions of `sizes`, packed and uploaded to an embedded
/// grid: what the mount's pack upload does, without the mount.
struct UploadedPack {
    home: tempfile::TempDir,
    config: cairn::config::Config,
    grid: std::sync::Arc<cairn::grid::Grid>,
    rt: tokio::runtime::Runtime,
    pack: cairn::codec::Capability,
    members: Vec<cairn::upload::pack::Member>,
    contents: Vec<Vec<u8>>,
}

fn uploaded_pack(sizes: &[usize]) -> UploadedPack {
    use cairn::{grid::Grid, upload};
    use std::sync::Arc;

    let (home, config) = embedded_grid();
    let chunk = config.grid.segment_size as u64;
    let mut versions = Vec::new();
    let mut contents = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let mut work = WorkingCopy::create(home.path().join(format!("w{i}")), None, chunk).unwrap();
        let data: Vec<u8> = (0..*size).map(|j| (j * 13 + i) as u8).collect();
        work.write_at(0, &data).unwrap();
        versions.push(seal(work, home.path().join(format!("v{i}"))));
        contents.push(data);
    }
    let keys = (0..versions.len()).map(|i| [i as u8 + 1; 16]);
    let packed = upload::pack::assemble(versions.iter().zip(keys).map(|(v, k)| (v.reader(), v.size, k)));
    let grid = Arc::new(Grid::from_config(&config, home.path()).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let source = upload::Source {
        size: packed.bytes.len() as u64,
        reader: Box::new(std::io::Cursor::new(packed.bytes)),
    };
    let report = rt
        .block_on(upload::upload(
            &grid,
            config.params(),
            config.grid.happy,
            source,
            [5; 16],
            Arc::new(()),
        ))
        .unwrap();
    UploadedPack {
        home,
        config,
        grid,
        rt,
        pack: report.cap,
        members: packed.members.into_iter().map(Result::unwrap).collect(),
        contents,
    }
}

impl UploadedPack {
    fn member_cap(&self, i: usize) -> FileCap {
        FileCap::Packed {
            pack: self.pack.clone(),
            offset: self.members[i].offset,
            len: self.members[i].len,
            member_key: Some(self.members[i].key),
        }
    }
}

#[test]
fn small_sealed_versions_upload_as_one_pack_and_read_back_each() {
    use cairn::download;
    use std::sync::Arc;

    // Sizes that straddle the pack's segment boundaries, and an empty file.
    let chunk = cairn::config::DEFAULT_SEGMENT_SIZE as usize;
    let up = uploaded_pack(&[100, 0, chunk - 50, 3000, 700_000]);
    for (i, (member, data)) in up.members.iter().zip(&up.contents).enumerate() {
        let cap: FileCap = up.member_cap(i).to_string().parse().unwrap();
        let out = up.home.path().join(format!("out{}", member.offset));
        let sha = up
            .rt
            .block_on(download::download_to_file(up.grid.clone(), cap, &out, Arc::new(())))
            .unwrap();
        assert!(std::fs::read(&out).unwrap() == *data, "member at {}", member.offset);
        assert_eq!(sha, member.sha256);
    }
}

#[test]
fn files_side_by_side_in_a_pack_segment_fetch_it_once() {
    use cairn::download::{FileReader, RecentSegments};

    let up = uploaded_pack(&[3000, 5000, 7000]);
    let chunk = up.config.grid.segment_size as u64;
    let reader = up
        .rt
        .block_on(FileReader::open(up.grid.clone(), up.member_cap(0)))
        .unwrap();
    let recent = RecentSegments::new(8);
    let first = up.rt.block_on(reader.read_chunk(0, chunk, &recent));
    assert_eq!(*first.unwrap().bytes, up.contents[0]);
    // Every share gone from every server (real files removed): the other
    // files of that segment can now come only from what was just decoded,
    // through readers sharing the pack's.
    for server in &up.config.servers {
        let dir = server.path.as_ref().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::create_dir_all(dir).unwrap();
    }
    for i in 1..3 {
        let member = reader.sharing(&up.member_cap(i)).expect("in the same pack");
        let again = up.rt.block_on(member.read_chunk(0, chunk, &recent));
        assert_eq!(*again.unwrap().bytes, up.contents[i], "member {i}");
    }
    let member = reader.sharing(&up.member_cap(1)).unwrap();
    let uncached = up.rt.block_on(member.read_chunk(0, chunk, &RecentSegments::new(1)));
    assert!(uncached.is_err(), "the shares really are gone");
}

#[test]
fn an_fsync_taken_before_a_seal_still_syncs_after_it() {
    // The daemon takes what to sync under its lock and syncs after: a seal
    // in between renames or links the copy's chunks away. Both ways (a few
    // chunks: each file; many: the staging file system) must still work.
    for chunks in [3u64, 100] {
        let dir = tempfile::tempdir().unwrap();
        let mut work = WorkingCopy::create(dir.path().join("w"), None, CHUNK).unwrap();
        work.write_at(0, &vec![5; (chunks * CHUNK) as usize]).unwrap();
        let pending = work.take_sync().unwrap();
        let v = seal(work, dir.path().join("v"));
        assert!(
            !dir.path().join("w").exists(),
            "sealed in place: the copy's directory is gone"
        );
        pending.run().unwrap();
        assert_eq!(
            read_all(|o, b| v.read_at(o, b), v.size),
            vec![5; (chunks * CHUNK) as usize]
        );
    }
}

/// A working copy over a version of `len` bytes of 7, sealed in `dir`.
fn over_a_sealed_base(dir: &std::path::Path, len: usize) -> (SealedVersion, WorkingCopy) {
    let mut work = WorkingCopy::create(dir.join("w1"), None, CHUNK).unwrap();
    work.write_at(0, &vec![7; len]).unwrap();
    let v1 = seal(work, dir.join("v1"));
    let work = WorkingCopy::create(dir.join("w2"), Some(v1.clone()), CHUNK).unwrap();
    (v1, work)
}

/// Shrunk from the model (a write after a truncation logged into the state
/// the truncation replaced), with a write the truncation keeps: partial
/// chunks, one cut by a truncation, come back from a crash reading the same.
#[test]
fn partial_chunks_cut_by_a_truncation_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut work) = over_a_sealed_base(dir.path(), 321);
    work.write_at(139, &[0]).unwrap();
    work.write_at(130, &[5]).unwrap();
    work.truncate(139).unwrap();
    work.write_at(0, &[1]).unwrap();
    let mut model = vec![7u8; 139];
    model[0] = 1;
    model[130] = 5;
    let recovered = WorkingCopy::recover(work.dir().to_owned(), CHUNK).unwrap();
    assert_eq!(read_all(|o, b| recovered.read_at(o, b), recovered.size()), model);
    let v2 = seal(recovered, dir.path().join("v2"));
    assert_eq!(read_all(|o, b| v2.read_at(o, b), v2.size), model);
}

/// A kill -9 between a write's bytes reaching a partial chunk and its log
/// record (simulated: the bytes written into `N.part` by hand): past the
/// base's end they show, as any write that reached a chunk does, and the
/// sealed chunk's sum is of what it holds, so it reads and uploads.
#[test]
fn an_unlogged_write_into_a_partial_chunk_seals_with_a_true_sum() {
    use cairn::sys::PositionalIo;
    let dir = tempfile::tempdir().unwrap();
    let (_, mut work) = over_a_sealed_base(dir.path(), 100);
    work.write_at(CHUNK, &[1; 10]).unwrap();
    let part = std::fs::OpenOptions::new()
        .write(true)
        .open(work.dir().join("1.part"))
        .unwrap();
    part.write_all_at(&[2; 10], 50).unwrap();
    let mut model = vec![7u8; 100];
    model[64..74].fill(1);
    model.resize(124, 0);
    model[114..124].fill(2);
    let recovered = WorkingCopy::recover(work.dir().to_owned(), CHUNK).unwrap();
    assert_eq!(read_all(|o, b| recovered.read_at(o, b), recovered.size()), model);
    let v2 = seal(recovered, dir.path().join("v2"));
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut v2.reader(), &mut bytes).unwrap();
    assert_eq!(bytes, model);
}

/// A partial chunk whose fill fails (its base chunk damaged) keeps failing
/// the writes that would fill it, and its log never holds more than a
/// partial chunk may: recovery reads the copy, not damage.
#[test]
fn a_partial_chunk_that_cannot_be_filled_never_overflows_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let (v1, mut work) = over_a_sealed_base(dir.path(), 2 * CHUNK as usize);
    let mut bytes = std::fs::read(v1.chunk_path(1)).unwrap();
    bytes[0] ^= 1;
    std::fs::write(v1.chunk_path(1), &bytes).unwrap();
    let results: Vec<bool> = (0..70)
        .map(|i| work.write_at(CHUNK + (2 * i) % CHUNK, &[1]).is_ok())
        .collect();
    assert!(results[..63].iter().all(|ok| *ok), "{results:?}");
    assert!(
        results[63..].iter().all(|ok| !ok),
        "the fill of a damaged chunk: {results:?}"
    );
    WorkingCopy::recover(work.dir().to_owned(), CHUNK).unwrap();
}

/// A power loss can keep a partial chunk's log record and lose the bytes
/// it names (simulated: a record appended by hand for bytes never
/// written, past the file's end or in a hole of it): recovery calls that
/// damage (the copy is set aside), never reads zeros as the writer's bytes.
#[test]
fn a_logged_write_whose_bytes_were_lost_is_damage_at_recovery() {
    let chunk = 1 << 20;
    // Holes are seen on Linux only (SEEK_HOLE); past the end, everywhere.
    let cases = [(chunk - 4, chunk), (100, 200)];
    for (start, end) in cases.into_iter().take(if cfg!(target_os = "linux") { 2 } else { 1 }) {
        let dir = tempfile::tempdir().unwrap();
        let mut work = WorkingCopy::create(dir.path().join("w1"), None, chunk).unwrap();
        work.write_at(0, &vec![7; 2 * chunk as usize]).unwrap();
        let v1 = seal(work, dir.path().join("v1"));
        let mut work = WorkingCopy::create(dir.path().join("w2"), Some(v1), chunk).unwrap();
        // Into chunk 1, past its first block: that block is a hole.
        work.write_at(chunk + 8192, &[1; 4]).unwrap();
        WorkingCopy::recover(work.dir().to_owned(), chunk).expect("as written, it recovers");
        let mut record = Vec::new();
        for v in [1u64, start, end] {
            record.extend_from_slice(&v.to_le_bytes());
        }
        let state = work.dir().join("state");
        let mut state = std::fs::OpenOptions::new().append(true).open(state).unwrap();
        std::io::Write::write_all(&mut state, &record).unwrap();
        let err = WorkingCopy::recover(work.dir().to_owned(), chunk).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{start}..{end}: {err}");
    }
}
