//! Checkpoints: a device's own records up to some number, compacted into
//! one [`State`] and stored as an ordinary version, so a machine that
//! joins (or fell far behind) reads one version per device instead of
//! every record, and old records can leave the servers.
//!
//! A checkpoint holds only its device's operations, so it is that
//! device's word as much as its signed records are: its head (signed)
//! names it by capability (which pins its bytes), and a reader refuses one
//! with any entry of another device or of a later record
//! ([`State::checked_as`]). States join exactly, so the checkpoints of
//! every device, and the records after them, make the same state as all
//! the records (docs/SEVERAL_MACHINES.md, "Checkpoints").
//!
//! The rules of when to make one, when to read one and what to keep are
//! plain functions here; the room that runs them is `vfs::sync`.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sync::log::{Checkpoint, Head, Link};
use crate::sync::merge::{DeviceId, State};

pub mod join;

/// The checkpoint format this cairn writes and reads (docs/FORMAT.md).
pub const FORMAT: u32 = 1;
/// The largest checkpoint made or read (about 800,000 files; below
/// SQLite's largest value, where checkpoints read are kept): a capability
/// naming more is refused before anything is fetched.
pub const MAX_BYTES: u64 = 512 << 20;
/// A machine this many records behind a device reads its checkpoint
/// rather than the records (each record is one more round trip).
pub const SKIP_RECORDS: u64 = 64;

const NS_PER_DAY: i64 = 86_400 * 1_000_000_000;

/// `S` is `&State` when sealing (no copy of the state is made) and
/// `State` when opening.
#[derive(Serialize, Deserialize)]
struct Body<S> {
    format: u32,
    device: String,
    seq: u64,
    #[serde(with = "crate::sync::log::hex_link")]
    link: Link,
    state: S,
}

/// Writes the bytes of `device`'s checkpoint at its record `seq` (whose
/// link is `link`) to `out`, as they are made: a checkpoint is as large as
/// the state, which is not held a second time as bytes. `state` must be
/// of that device's records up to `seq` alone.
pub fn seal_to(out: impl std::io::Write, device: DeviceId, seq: u64, link: Link, state: &State) -> std::io::Result<()> {
    let body = Body {
        format: FORMAT,
        device: format!("{device:032x}"),
        seq,
        link,
        state,
    };
    serde_json::to_writer(out, &body).map_err(std::io::Error::from)
}

/// The state in `bytes`, if it is the checkpoint its head named: of
/// `device` at `seq` with `link`, and only that device's.
pub fn open(bytes: &[u8], device: DeviceId, seq: u64, link: &Link) -> Result<State, String> {
    checked(serde_json::from_slice(bytes), device, seq, link)
}

/// [`open`], reading the bytes as they are parsed (a kept checkpoint, not
/// loaded whole first).
pub fn open_from(reader: impl std::io::Read, device: DeviceId, seq: u64, link: &Link) -> Result<State, String> {
    checked(serde_json::from_reader(reader), device, seq, link)
}

fn checked(body: serde_json::Result<Body<State>>, device: DeviceId, seq: u64, link: &Link) -> Result<State, String> {
    let body = body.map_err(|e| format!("not a checkpoint: {e}"))?;
    if body.format != FORMAT {
        return Err(format!("checkpoint format {} (this cairn reads {FORMAT})", body.format));
    }
    if body.device != format!("{device:032x}") || body.seq != seq || body.link != *link {
        return Err(format!(
            "the checkpoint is of device {} record {}, not the one its head names",
            body.device, body.seq
        ));
    }
    body.state.checked_as(device, seq)
}

/// Whether to make a checkpoint now: the device's records since its last
/// one hold `since` bytes, and that one was `last` bytes, made `age` ago
/// (none yet: `None`). At least `min` bytes and a tenth of the last, so a
/// machine joining reads at most a tenth more in records; and at most one
/// every [`SPACING`] unless the log has grown by the whole last one, so a
/// namespace published in one go (each checkpoint larger than the one
/// before) makes a few, not one per tenth.
pub fn due(since: u64, last: Option<(u64, Duration)>, min: u64) -> bool {
    match last {
        None => since >= min,
        Some((size, age)) => since >= min.max(size) || (since >= min.max(size / 10) && age >= SPACING),
    }
}

/// The least time between two checkpoints of a growing log.
pub const SPACING: Duration = Duration::from_secs(600);

/// Whether a machine that has merged `device` up to `merged` reads its
/// checkpoint at `checkpoint` instead of the records after `merged`: the
/// records are gone (up to `pruned`), or many.
pub fn read_instead(merged: u64, checkpoint: u64, pruned: u64) -> bool {
    checkpoint > merged && (merged < pruned || checkpoint - merged >= SKIP_RECORDS)
}

/// The checkpoint of a device to read, of those its head names: the
/// newest, or for a device revoked after its record `cut`, the newest not
/// past the cut (its later records must not count, and a checkpoint
/// cannot be cut).
pub fn pick(head: &Head, cut: Option<u64>) -> Option<&Checkpoint> {
    let body = &head.body;
    body.checkpoint
        .iter()
        .chain(&body.older)
        // Of a record the head has (a head naming more is its device's
        // bug or forgery: not a reason to skip records).
        .filter(|c| (1..=head.seq).contains(&c.seq))
        .find(|c| cut.is_none_or(|cut| c.seq <= cut))
}

/// What retention keeps of a device's own checkpoints.
#[derive(Debug, PartialEq, Eq)]
pub struct Retained {
    pub keep: BTreeSet<u64>,
    /// Its records 2 to this one may leave the servers.
    pub prune_to: u64,
}

/// Which of a device's own checkpoints `(seq, made at)` to keep: the
/// newest, the newest of each day younger than `keep_days`, and the
/// newest older than that (the anchor). Records up to the anchor may leave
/// the servers (all but record 1, which makes the device's key known), so
/// every record of the last `keep_days` stays, with a checkpoint a day
/// before it: a revocation of that age is exact ([`pick`]).
pub fn retain(checkpoints: &[(u64, i64)], now_ns: i64, keep_days: u32) -> Retained {
    let mut out = Retained {
        keep: BTreeSet::new(),
        prune_to: 0,
    };
    let mut days = BTreeSet::new();
    let mut newest_first = checkpoints.to_vec();
    newest_first.sort_by(|a, b| b.cmp(a));
    for (i, (seq, at)) in newest_first.into_iter().enumerate() {
        let age = (now_ns - at).max(0) / NS_PER_DAY;
        let first_of_day = days.insert(age);
        let anchor = age >= keep_days as i64 && out.prune_to == 0;
        if anchor {
            out.prune_to = seq;
        }
        if i == 0 || anchor || (age < keep_days as i64 && first_of_day) {
            out.keep.insert(seq);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::merge::{self, Attrs, Kind, Op, Record};

    pub(super) fn seal(device: DeviceId, seq: u64, link: Link, state: &State) -> Vec<u8> {
        let mut bytes = Vec::new();
        seal_to(&mut bytes, device, seq, link, state).unwrap();
        bytes
    }

    pub(super) fn record(device: DeviceId, seq: u64, ops: Vec<Op>) -> Record {
        Record {
            device,
            seq,
            seen: Default::default(),
            ops: ops.into_iter().map(|op| (seq * 10, op)).collect(),
        }
    }

    pub(super) fn create(fid: u128, name: &str) -> Op {
        Op::Create {
            fid,
            kind: Kind::File,
            parent: merge::ROOT,
            name: name.into(),
            attrs: Attrs::default(),
        }
    }

    #[test]
    fn a_checkpoint_opens_only_as_the_one_its_head_names() {
        let records = [
            record(7, 1, vec![Op::Enroll { name: "laptop".into() }]),
            record(7, 2, vec![create(5, "a"), create(6, "b")]),
        ];
        let state = merge::merge(&records);
        let bytes = seal(7, 2, [1; 32], &state);
        assert_eq!(open(&bytes, 7, 2, &[1; 32]), Ok(state.clone()));
        assert_eq!(open_from(&bytes[..], 7, 2, &[1; 32]), Ok(state.clone()));
        assert!(open(&bytes, 8, 2, &[1; 32]).is_err(), "another device");
        assert!(open(&bytes, 7, 3, &[1; 32]).is_err(), "another number");
        assert!(open(&bytes, 7, 2, &[2; 32]).is_err(), "another link");
        assert!(open(&bytes[1..], 7, 2, &[1; 32]).is_err());
        let newer = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("\"format\":1", "\"format\":2");
        assert!(open(newer.as_bytes(), 7, 2, &[1; 32]).unwrap_err().contains("format 2"));
        // An entry of another device's, or of a later record, makes the
        // whole checkpoint refused: a device vouches only for its own.
        let with_other = merge::merge(records.iter().chain([&record(9, 1, vec![create(8, "c")])]));
        assert!(open(&seal(7, 2, [1; 32], &with_other), 7, 2, &[1; 32]).is_err());
        let with_later = merge::merge(records.iter().chain([&record(7, 3, vec![create(8, "c")])]));
        assert!(open(&seal(7, 2, [1; 32], &with_later), 7, 2, &[1; 32]).is_err());
        // A name no record could carry, or a create that came from
        // elsewhere (where `render` would put it back).
        let text = String::from_utf8(bytes).unwrap();
        let bad = text.replace("\"a\"", "\"..\"");
        assert!(open(bad.as_bytes(), 7, 2, &[1; 32]).unwrap_err().contains("\"..\""));
        let moved = text.replacen("[0,\"a\"]", "[0,\"..\"]", 1);
        assert_ne!(moved, text);
        assert!(open(moved.as_bytes(), 7, 2, &[1; 32])
            .unwrap_err()
            .contains("came from elsewhere"));
        let makes_root = text.replacen("[5,[{", "[0,[{", 1);
        assert_ne!(makes_root, text);
        assert!(open(makes_root.as_bytes(), 7, 2, &[1; 32])
            .unwrap_err()
            .contains("root"));
    }

    #[test]
    fn checkpoints_of_every_device_and_the_records_after_make_the_whole_state() {
        let a = [
            record(1, 1, vec![Op::Enroll { name: "a".into() }]),
            record(1, 2, vec![create(10, "x")]),
            record(1, 3, vec![Op::Delete { fid: 10 }]),
        ];
        let b = [
            record(2, 1, vec![Op::Enroll { name: "b".into() }]),
            record(2, 2, vec![create(11, "y")]),
            record(2, 3, vec![Op::Revoke { device: 1, after: 2 }]),
        ];
        let all = merge::merge(a.iter().chain(&b));
        let mut joined = merge::merge(&a[..2]);
        joined.join(merge::merge(&b[..2]));
        for r in [&a[2], &b[2]] {
            if !joined.apply(r) {
                let mut again = joined.restarted();
                again.join(merge::merge(&a[..2]));
                again.join(merge::merge(&b[..2]));
                for r in [&a[2], &b[2]] {
                    let _ = again.apply(r);
                }
                joined = again;
            }
        }
        assert_eq!(merge::render(&joined), merge::render(&all));
    }

    #[test]
    fn checkpoints_come_when_the_log_has_grown_by_a_tenth_or_doubled() {
        let (mib, later, soon) = (1 << 20, SPACING, Duration::from_secs(5));
        assert!(!due(100, None, mib));
        assert!(due(mib, None, mib));
        assert!(!due(2 * mib, Some((40 * mib, later)), mib));
        assert!(due(4 * mib, Some((40 * mib, later)), mib));
        assert!(!due(4 * mib, Some((40 * mib, soon)), mib), "not twice in ten minutes");
        assert!(due(40 * mib, Some((40 * mib, soon)), mib), "unless the log doubled");
        assert!(due(mib, Some((100, soon)), mib));
    }

    #[test]
    fn a_checkpoint_is_read_when_records_are_gone_or_many() {
        assert!(!read_instead(10, 10, 0));
        assert!(!read_instead(10, 20, 0));
        assert!(read_instead(10, 20, 11));
        assert!(read_instead(0, SKIP_RECORDS, 0));
        assert!(
            !read_instead(30, 20, 25),
            "the checkpoint is older than what was merged"
        );
    }

    #[test]
    fn a_revoked_device_is_read_from_a_checkpoint_before_its_cut() {
        let cp = |seq| Checkpoint {
            seq,
            link: [0; 32],
            cap: String::new(),
        };
        let head = Head {
            device: 1,
            seq: 35,
            link: [0; 32],
            time_ns: 0,
            body: crate::sync::log::HeadBody {
                checkpoint: Some(cp(30)),
                older: vec![cp(20), cp(10)],
                pruned: 10,
            },
        };
        assert_eq!(pick(&head, None).map(|c| c.seq), Some(30));
        assert_eq!(pick(&head, Some(30)).map(|c| c.seq), Some(30));
        assert_eq!(pick(&head, Some(25)).map(|c| c.seq), Some(20));
        assert_eq!(pick(&head, Some(5)), None);
        let ahead = Head { seq: 25, ..head };
        assert_eq!(
            pick(&ahead, None).map(|c| c.seq),
            Some(20),
            "none past the head's record"
        );
    }

    #[test]
    fn retention_keeps_the_newest_one_a_day_and_one_older() {
        let day = NS_PER_DAY;
        let now = 100 * day;
        // Made at: 50 and 40 days ago, yesterday (two), today (three).
        let cps = [
            (5, now - 50 * day),
            (10, now - 40 * day),
            (50, now - day - 10),
            (60, now - day - 5),
            (70, now - 3),
            (80, now - 2),
            (99, now - 1),
        ];
        let kept = |k: &[u64], prune_to| Retained {
            keep: k.iter().copied().collect(),
            prune_to,
        };
        assert_eq!(retain(&cps, now, 30), kept(&[10, 60, 99], 10));
        assert_eq!(retain(&cps, now, 0), kept(&[99], 99), "nothing kept back");
        assert_eq!(
            retain(&cps[2..], now, 30),
            kept(&[60, 99], 0),
            "no record is old enough to go"
        );
        assert_eq!(
            retain(&cps[..1], now, 30),
            kept(&[5], 5),
            "the newest stays, however old"
        );
    }
}
