//! How several machines' changes to one namespace merge: a pure function,
//! the same on every machine whatever order the changes reach it in.
//!
//! Each machine (a device) logs its operations in records. An operation's
//! [`Ts`] orders it among all operations of all devices; a record also says
//! how far its device had merged every other device's log
//! ([`Record::seen`]), which is what "the device had seen this" means
//! below. A [`State`] is the union of every operation received (sets, and
//! each node's latest location per device), so records joined in any
//! order, twice, or through another state give the same state. [`render`]
//! turns a state into the tree by these rules (docs/SEVERAL_MACHINES.md):
//!
//! - **Edits**: the versions of a file form a tree by the version each was
//!   made from. From every version, its earliest child (by `Ts`) continues
//!   the file; each other child starts a branch, shown beside the file as
//!   a conflict copy (its own node, [`derived`]). Writing to a conflict
//!   copy extends its branch.
//! - **Deletes** remove what their author had seen: a node dies only when
//!   a delete of it had every one of its versions in its past, so an edit
//!   the deleter had not seen keeps the file. A directory dies only when
//!   deleted and left with no live child.
//! - **Locations**: a node's latest move (by `Ts`, any device) wins. A move
//!   into something that is not a directory falls back to where the node
//!   came from, then to the root; a move that closes a cycle of
//!   directories falls back the same way, the latest move of the cycle
//!   first.
//! - **Names**: in a directory, the earliest claim (the move or create that
//!   put the node there) keeps a name; later ones are renamed
//!   `STEM (conflict from DEVICE YYYY-MM-DD HH.MM)EXT`, by the claiming
//!   device's name and the claim's time (UTC), numbered if that is taken.
//!
//! - **Directories made twice**: concurrent `mkdir`s of one name in one
//!   directory (neither device had seen the other's) are one directory.
//!
//! - **Attributes**: a node's latest (by `Ts`) attribute write wins; a
//!   conflict copy shows its origin's until it is given its own.
//! - **Extended attributes**: each name's latest write (a set or a
//!   removal) wins.
//! - Versions and creates carry what other machines need to show them
//!   (the content's capability, a symlink's target).
//!
//! - **Revocation**: a device's write access revoked after its record N
//!   ([`Op::Revoke`]) makes its later records count for nothing, as if
//!   never written; what it wrote up to N stays. Revocations count in
//!   `Ts` order, and one made in a record its own device no longer counts
//!   (revoked before it) counts for nothing, so of two machines revoking
//!   each other the earlier revocation stands.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

pub use crate::catalog::Kind;

/// A machine using the drive.
pub type DeviceId = u128;
/// A node (file, directory, symlink), the same on every machine.
pub type Fid = u128;
/// A version of a file, the same on every machine.
pub type Vid = u128;
/// The root directory.
pub const ROOT: Fid = 0;
/// Where a node with no name of its own sits: a file whose first name was
/// removed while further names (hard links) of it remain. A node lives
/// there only while a link names it; a move there otherwise falls back, as
/// a move into a file does.
pub const NAMELESS: Fid = u128::MAX;
/// The name a node at [`NAMELESS`] is logged with (any would do; one, so
/// that machines agree and log no moves back and forth).
pub const NAMELESS_NAME: &str = "nameless";

/// An operation's place in the order of all operations: hybrid logical
/// time first, then who and where in its log (so no two are equal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Ts {
    pub hlc: u64,
    pub device: DeviceId,
    pub seq: u64,
    pub idx: u32,
}

/// A node's attributes, as one value: the latest write of any device wins
/// (a create's attributes count as its first write).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Attrs {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    /// A symlink's target, a device node's number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Where a version's bytes are and what they are, for the machines that
/// did not make it.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Content {
    pub cap: String,
    pub size: u64,
    pub sha256: String,
}

/// Logged as JSON (docs/FORMAT.md, "Device logs"): ids are integers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The device's name, as conflict copies show it.
    Enroll { name: String },
    Create {
        fid: Fid,
        kind: Kind,
        parent: Fid,
        name: String,
        attrs: Attrs,
    },
    /// rename(2). Replacing a name is a `Delete` of what was there and a
    /// `Move`.
    Move {
        fid: Fid,
        parent: Fid,
        name: String,
        from: (Fid, String),
    },
    /// unlink, rmdir: of the node as its author had seen it.
    Delete { fid: Fid },
    /// Closed content of file `fid`, made from version `base`.
    Version {
        fid: Fid,
        vid: Vid,
        base: Option<Vid>,
        content: Content,
    },
    /// chmod, chown, utimes: every attribute at once.
    Attrs { fid: Fid, attrs: Attrs },
    /// An extended attribute set, or removed (`None`).
    Xattr {
        fid: Fid,
        name: String,
        value: Option<Vec<u8>>,
    },
    /// `device`'s write access revoked: its records after `after` do not
    /// count.
    Revoke { device: DeviceId, after: u64 },
}

/// Longest name an operation may carry: 255 UTF-16 units of a Windows
/// name, 4 bytes each at most in UTF-8.
pub const MAX_NAME: usize = 1020;
/// Longest symlink target (Linux's PATH_MAX) and extended attribute value
/// (XATTR_SIZE_MAX).
const MAX_TARGET: usize = 4096;
const MAX_XATTR_VALUE: usize = 64 << 10;

/// Whether `op` is one a machine of this drive could have logged: every
/// name one a file system could hold, extended attributes only in the
/// `user.` namespace (the only one a mount stores), sizes within bounds.
/// A record with another is refused whole (its signer holds the root
/// capability, so this is what a bug or a hostile holder would send).
pub fn check(op: &Op) -> Result<(), String> {
    match op {
        Op::Enroll { name: n } => check_name(n),
        Op::Create {
            name: n,
            attrs: a,
            kind: Kind::Link,
            ..
        } if linked(a).is_none() => Err(format!("a hard link {n:?} naming no node")),
        Op::Create { name: n, attrs: a, .. } => check_name(n).and(check_attrs(a)),
        Op::Move { name: n, from, .. } => check_name(n).and(check_name(&from.1)),
        Op::Attrs { attrs: a, .. } => check_attrs(a),
        Op::Xattr { name: n, value, .. } => check_xattr(n, value),
        Op::Delete { .. } | Op::Version { .. } | Op::Revoke { .. } => Ok(()),
    }
}

/// The node a hard link ([`Kind::Link`]) names: its `target`, the node's
/// id in decimal.
pub fn linked(attrs: &Attrs) -> Option<Fid> {
    attrs.target.as_deref()?.parse().ok()
}

fn check_name(n: &str) -> Result<(), String> {
    match n {
        "" | "." | ".." => Err(format!("the name {n:?}")),
        _ if n.len() > MAX_NAME => Err(format!("a name of {} bytes", n.len())),
        _ if n.contains(['/', '\0']) => Err(format!("the name {n:?} (a slash or NUL)")),
        _ => Ok(()),
    }
}

fn check_attrs(a: &Attrs) -> Result<(), String> {
    match &a.target {
        Some(t) if t.len() > MAX_TARGET || t.contains('\0') => Err("a symlink target too long or with NUL".into()),
        _ => Ok(()),
    }
}

fn check_xattr(n: &str, value: &XattrValue) -> Result<(), String> {
    if !n.starts_with("user.") || n.len() > 255 || n.contains('\0') {
        Err(format!("the extended attribute {n:?} (only user.*)"))
    } else if value.as_ref().is_some_and(|v| v.len() > MAX_XATTR_VALUE) {
        Err(format!("an extended attribute value over {MAX_XATTR_VALUE} bytes"))
    } else {
        Ok(())
    }
}

/// How far a device had merged each other device's log: the highest
/// record number of each.
pub type Seen = BTreeMap<DeviceId, u64>;

/// One record of a device's log: its operations with their hybrid times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub device: DeviceId,
    pub seq: u64,
    /// What the device had merged *before its first operation here*: a
    /// device must log its own changes before it merges others' records,
    /// or its deletes would claim to have seen what arrived after them.
    pub seen: Seen,
    pub ops: Vec<(u64, Op)>,
}

impl Record {
    /// Each operation with its place in the order of all.
    fn stamped(&self) -> impl Iterator<Item = (Ts, &Op)> {
        self.ops.iter().enumerate().map(|(idx, (hlc, op))| {
            let ts = Ts {
                hlc: *hlc,
                device: self.device,
                seq: self.seq,
                idx: idx as u32,
            };
            (ts, op)
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Loc {
    parent: Fid,
    name: String,
    from: (Fid, String),
}

/// An extended attribute's value, or `None` once removed.
pub type XattrValue = Option<Vec<u8>>;

/// A version's file, the version it was made from, and what it holds.
pub type VersionOf = (Fid, Option<Vid>, Content);

/// Everything known of the namespace: a join-semilattice (see the module).
/// Serialised in checkpoints (docs/FORMAT.md): each table as a list of
/// pairs, since JSON keys are strings.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct State {
    #[serde(with = "pairs")]
    names: BTreeMap<DeviceId, (Ts, String)>,
    /// With what its device had seen: two `mkdir`s of one name neither
    /// had seen are one directory.
    #[serde(with = "pairs")]
    creates: BTreeMap<Fid, (Ts, (Loc, Kind, Seen))>,
    /// Each node's latest location per device.
    #[serde(with = "pairs")]
    locs: BTreeMap<(Fid, DeviceId), (Ts, Loc)>,
    #[serde(with = "pairs")]
    deletes: BTreeMap<(Fid, Ts), Seen>,
    #[serde(with = "pairs")]
    versions: BTreeMap<Vid, (Ts, VersionOf)>,
    /// Each node's latest attributes per device.
    #[serde(with = "pairs")]
    attrs: BTreeMap<(Fid, DeviceId), (Ts, Attrs)>,
    /// Each extended attribute's latest value per device.
    #[serde(with = "pairs")]
    xattrs: BTreeMap<(Fid, String, DeviceId), (Ts, XattrValue)>,
    /// Every revocation heard, from any record, even one that does not
    /// count itself: whether it does depends on the others.
    #[serde(with = "pairs")]
    revokes: BTreeMap<Ts, (DeviceId, u64)>,
    /// What they cut ([`cutoffs`]): each revoked device's last record that
    /// counts. Not stored: made again from `revokes`.
    #[serde(skip)]
    cut: BTreeMap<DeviceId, u64>,
}

/// A map as a list of (key, value) pairs.
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, K: Serialize, V: Serialize>(map: &BTreeMap<K, V>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// Each revoked device's last record that counts: revocations in `Ts`
/// order, each counting unless made in a record of its device that an
/// earlier one cut off; the lowest cut of a device wins.
pub fn cutoffs(revokes: &BTreeMap<Ts, (DeviceId, u64)>) -> BTreeMap<DeviceId, u64> {
    let mut cut: BTreeMap<DeviceId, u64> = BTreeMap::new();
    for (ts, (device, after)) in revokes {
        if cut.get(&ts.device).is_some_and(|last| ts.seq > *last) {
            continue;
        }
        let last = cut.entry(*device).or_insert(*after);
        *last = (*last).min(*after);
    }
    cut
}

/// Keeps the entry of `map` at `key` with the smaller (`first`) or larger
/// `Ts`: the one rule that makes every table of [`State`] order-free. Two
/// entries at one `Ts` (only a forked or forged log makes them) keep the
/// smaller value, whichever came first.
fn keep<K: Ord, V: Clone + Ord>(map: &mut BTreeMap<K, (Ts, V)>, key: K, ts: Ts, value: &V, first: bool) {
    if map.get(&key).is_none_or(|old| replaces(old, ts, value, first)) {
        map.insert(key, (ts, value.clone()));
    }
}

/// Whether `value` at `ts` replaces `old` under [`keep`]'s rule.
fn replaces<V: Ord>(old: &(Ts, V), ts: Ts, value: &V, first: bool) -> bool {
    match old.0.cmp(&ts) {
        std::cmp::Ordering::Equal => *value < old.1,
        later => (later == std::cmp::Ordering::Greater) == first,
    }
}

/// A delete heard of twice with different pasts (a forked log): the past
/// both agree on, so neither claims more than it saw.
fn add_delete(deletes: &mut BTreeMap<(Fid, Ts), Seen>, key: (Fid, Ts), seen: &Seen) {
    match deletes.get_mut(&key) {
        Some(had) => Deletes::join(had, seen),
        None => {
            deletes.insert(key, seen.clone());
        }
    }
}

/// One table of a [`State`], as the state joins and checks it entry by
/// entry: `State::join` and `State::checked_as` go through these, and so
/// does a checkpoint joined as it streams (`checkpoint::join`), which
/// holds no table whole.
pub trait Table {
    /// Its name in a checkpoint.
    const NAME: &'static str;
    type K: Ord + Clone + serde::Serialize + serde::de::DeserializeOwned + 'static;
    type V: Clone + serde::Serialize + serde::de::DeserializeOwned + 'static;
    fn of(state: &State) -> &BTreeMap<Self::K, Self::V>;
    fn of_mut(state: &mut State) -> &mut BTreeMap<Self::K, Self::V>;
    /// `had` and `other`, two entries under one key, joined into `had`.
    fn join(had: &mut Self::V, other: &Self::V);
    /// Whether a state of `device`'s records up to `seq` alone could hold
    /// this entry, and a record could have carried it ([`check`]).
    fn check(key: &Self::K, value: &Self::V, device: DeviceId, seq: u64) -> Result<(), String>;
}

/// An entry's stamp, of `device`'s records up to `seq`.
fn stamped_by(ts: &Ts, device: DeviceId, seq: u64) -> Result<(), String> {
    match ts.device != device || ts.seq > seq || ts.seq == 0 {
        true => Err(format!("an entry of device {:032x} record {}", ts.device, ts.seq)),
        false => Ok(()),
    }
}

fn kept_under(author: DeviceId, device: DeviceId) -> Result<(), String> {
    match author == device {
        true => Ok(()),
        false => Err("an entry kept under another device".into()),
    }
}

fn not_root(fid: Fid) -> Result<(), String> {
    match fid == ROOT {
        true => Err("the root made or moved".into()),
        false => Ok(()),
    }
}

/// The tables kept under [`keep`]'s rule: (unit type, field, key, value,
/// whether the first wins, the check of an entry).
macro_rules! kept_tables {
    ($(($table:ident, $field:ident, $k:ty, $v:ty, $first:expr, |$key:ident, $value:ident, $device:ident| $check:expr)),* $(,)?) => {$(
        pub struct $table;
        impl Table for $table {
            const NAME: &'static str = stringify!($field);
            type K = $k;
            type V = (Ts, $v);
            fn of(state: &State) -> &BTreeMap<$k, (Ts, $v)> {
                &state.$field
            }
            fn of_mut(state: &mut State) -> &mut BTreeMap<$k, (Ts, $v)> {
                &mut state.$field
            }
            fn join(had: &mut (Ts, $v), other: &(Ts, $v)) {
                if replaces(had, other.0, &other.1, $first) {
                    *had = other.clone();
                }
            }
            fn check($key: &$k, (ts, $value): &(Ts, $v), $device: DeviceId, seq: u64) -> Result<(), String> {
                stamped_by(ts, $device, seq)?;
                $check
            }
        }
    )*};
}

kept_tables!(
    (Names, names, DeviceId, String, false, |key, name, device| kept_under(
        *key, device
    )
    .and(check_name(name))),
    (
        Creates,
        creates,
        Fid,
        (Loc, Kind, Seen),
        true,
        |key, create, _device| {
            let loc = &create.0;
            not_root(*key)?;
            // As a create makes it: it came from where it was made.
            if loc.from != (loc.parent, loc.name.clone()) {
                return Err(format!("a create of {:?} that came from elsewhere", loc.name));
            }
            check_name(&loc.name)
        }
    ),
    (Locs, locs, (Fid, DeviceId), Loc, false, |key, loc, device| {
        kept_under(key.1, device)?;
        not_root(key.0)?;
        check_name(&loc.name).and(check_name(&loc.from.1))
    }),
    (Versions, versions, Vid, VersionOf, true, |_key, _version, _device| Ok(
        ()
    )),
    (AttrsOf, attrs, (Fid, DeviceId), Attrs, false, |key, attrs, device| {
        kept_under(key.1, device).and(check_attrs(attrs))
    }),
    (
        Xattrs,
        xattrs,
        (Fid, String, DeviceId),
        XattrValue,
        false,
        |key, value, device| kept_under(key.2, device).and(check_xattr(&key.1, value))
    ),
);

pub struct Deletes;
impl Table for Deletes {
    const NAME: &'static str = "deletes";
    type K = (Fid, Ts);
    type V = Seen;
    fn of(state: &State) -> &BTreeMap<(Fid, Ts), Seen> {
        &state.deletes
    }
    fn of_mut(state: &mut State) -> &mut BTreeMap<(Fid, Ts), Seen> {
        &mut state.deletes
    }
    /// Heard twice with different pasts (a forked log): the past both
    /// agree on, so neither claims more than it saw.
    fn join(had: &mut Seen, seen: &Seen) {
        had.retain(|device, s| match seen.get(device) {
            Some(other) => {
                *s = (*s).min(*other);
                true
            }
            None => false,
        })
    }
    fn check(key: &(Fid, Ts), _: &Seen, device: DeviceId, seq: u64) -> Result<(), String> {
        stamped_by(&key.1, device, seq)
    }
}

pub struct Revokes;
impl Table for Revokes {
    const NAME: &'static str = "revokes";
    type K = Ts;
    type V = (DeviceId, u64);
    fn of(state: &State) -> &BTreeMap<Ts, (DeviceId, u64)> {
        &state.revokes
    }
    fn of_mut(state: &mut State) -> &mut BTreeMap<Ts, (DeviceId, u64)> {
        &mut state.revokes
    }
    fn join(had: &mut (DeviceId, u64), other: &(DeviceId, u64)) {
        *had = *other;
    }
    fn check(key: &Ts, _: &(DeviceId, u64), device: DeviceId, seq: u64) -> Result<(), String> {
        stamped_by(key, device, seq)
    }
}

/// Something done to every table, one type at a time.
pub trait EachTable {
    type Error;
    fn table<T: Table>(&mut self) -> Result<(), Self::Error>;
}

/// Does `each` to every table, in a checkpoint's order.
pub fn each_table<E: EachTable>(each: &mut E) -> Result<(), E::Error> {
    each.table::<Names>()?;
    each.table::<Creates>()?;
    each.table::<Locs>()?;
    each.table::<Deletes>()?;
    each.table::<Versions>()?;
    each.table::<AttrsOf>()?;
    each.table::<Xattrs>()?;
    each.table::<Revokes>()
}

impl State {
    /// Adds a record. `false` if it brought a revocation that changes
    /// which records count: operations already merged may then not count,
    /// so the state must be made again, [`State::restarted`] and every
    /// record applied anew.
    #[must_use]
    pub fn apply(&mut self, record: &Record) -> bool {
        let mut revoked = false;
        for (ts, op) in record.stamped() {
            if let Op::Revoke { device, after } = op {
                revoked |= self.revokes.insert(ts, (*device, *after)).is_none();
            }
        }
        if revoked {
            let cut = cutoffs(&self.revokes);
            if cut != self.cut {
                self.cut = cut;
                return false;
            }
        }
        if !self.counts(record.device, record.seq) {
            return true;
        }
        for (ts, op) in record.stamped() {
            match op {
                Op::Revoke { .. } => {}
                Op::Enroll { name } => keep(&mut self.names, record.device, ts, name, false),
                // The root is made by no one and moves nowhere.
                Op::Create { fid: ROOT, .. } | Op::Move { fid: ROOT, .. } => {}
                Op::Create {
                    fid,
                    kind,
                    parent,
                    name,
                    attrs,
                } => {
                    let loc = Loc {
                        parent: *parent,
                        name: name.clone(),
                        from: (*parent, name.clone()),
                    };
                    // A node is created once: a second create of its id (a
                    // forger's) loses to the first.
                    keep(&mut self.creates, *fid, ts, &(loc, *kind, record.seen.clone()), true);
                    keep(&mut self.attrs, (*fid, record.device), ts, attrs, false);
                }
                Op::Attrs { fid, attrs } => keep(&mut self.attrs, (*fid, record.device), ts, attrs, false),
                Op::Xattr { fid, name, value } => {
                    keep(&mut self.xattrs, (*fid, name.clone(), record.device), ts, value, false)
                }
                Op::Move {
                    fid,
                    parent,
                    name,
                    from,
                } => {
                    let loc = Loc {
                        parent: *parent,
                        name: name.clone(),
                        from: from.clone(),
                    };
                    keep(&mut self.locs, (*fid, record.device), ts, &loc, false);
                }
                Op::Delete { fid } => add_delete(&mut self.deletes, (*fid, ts), &record.seen),
                Op::Version {
                    fid,
                    vid,
                    base,
                    content,
                } => keep(&mut self.versions, *vid, ts, &(*fid, *base, content.clone()), true),
            }
        }
        true
    }

    /// Whether record `seq` of `device` counts (its device was not
    /// revoked before it).
    pub fn counts(&self, device: DeviceId, seq: u64) -> bool {
        self.cut.get(&device).is_none_or(|last| seq <= *last)
    }

    /// For each device, its first record after `seen` with an operation
    /// on any of `fids`; `None` if one of them is not in the state at all
    /// (nothing can then be said of what waits).
    pub fn first_unseen(&self, fids: &BTreeSet<Fid>, seen: &Seen) -> Option<BTreeMap<DeviceId, u64>> {
        let mut first: BTreeMap<DeviceId, u64> = BTreeMap::new();
        let mut found: BTreeSet<Fid> = BTreeSet::new();
        let mut note = |fid: Fid, ts: &Ts| {
            if fids.contains(&fid) {
                found.insert(fid);
                if seen.get(&ts.device).is_none_or(|s| ts.seq > *s) {
                    let at = first.entry(ts.device).or_insert(ts.seq);
                    *at = (*at).min(ts.seq);
                }
            }
        };
        for (fid, (ts, _)) in &self.creates {
            note(*fid, ts);
        }
        let located = self.locs.iter().map(|((fid, _), (ts, _))| (fid, ts));
        for (fid, ts) in located.chain(self.attrs.iter().map(|((fid, _), (ts, _))| (fid, ts))) {
            note(*fid, ts);
        }
        for (fid, ts) in self.deletes.keys() {
            note(*fid, ts);
        }
        for (ts, (fid, ..)) in self.versions.values() {
            note(*fid, ts);
        }
        for ((fid, ..), (ts, _)) in &self.xattrs {
            note(*fid, ts);
        }
        (found.len() == fids.len()).then_some(first)
    }

    /// Each revoked device's last record that counts.
    pub fn revoked(&self) -> &BTreeMap<DeviceId, u64> {
        &self.cut
    }

    /// An empty state that knows every revocation this one does: every
    /// record applied to it again gives the state with only what counts.
    pub fn restarted(&self) -> State {
        State {
            revokes: self.revokes.clone(),
            cut: self.cut.clone(),
            ..State::default()
        }
    }

    /// The state of one device's records up to `seq` alone, as read from
    /// a checkpoint: refused unless every entry is that device's, from
    /// those records, and one a record could have carried ([`check`]); its
    /// cuts are made again from its revocations.
    pub fn checked_as(mut self, device: DeviceId, seq: u64) -> Result<State, String> {
        struct Check<'a>(&'a State, DeviceId, u64);
        impl EachTable for Check<'_> {
            type Error = String;
            fn table<T: Table>(&mut self) -> Result<(), String> {
                T::of(self.0)
                    .iter()
                    .try_for_each(|(k, v)| T::check(k, v, self.1, self.2))
            }
        }
        each_table(&mut Check(&self, device, seq))?;
        self.cut = cutoffs(&self.revokes);
        Ok(self)
    }

    /// The stamp of every entry.
    fn stamps(&self) -> impl Iterator<Item = &Ts> {
        (self.names.values().map(|(ts, _)| ts))
            .chain(self.creates.values().map(|(ts, _)| ts))
            .chain(self.locs.values().map(|(ts, _)| ts))
            .chain(self.deletes.keys().map(|(_, ts)| ts))
            .chain(self.versions.values().map(|(ts, _)| ts))
            .chain(self.attrs.values().map(|(ts, _)| ts))
            .chain(self.xattrs.values().map(|(ts, _)| ts))
            .chain(self.revokes.keys())
    }

    /// The latest hybrid time of any entry: a machine that read this state
    /// must never stamp a change before it.
    pub fn max_hlc(&self) -> u64 {
        self.stamps().map(|ts| ts.hlc).max().unwrap_or(0)
    }

    /// Everything `other` knows, added to this state. Exact for states
    /// that know the same revocations; otherwise apply the records again.
    pub fn join(&mut self, mut other: State) {
        // Entries moved, not copied: `other` may be a checkpoint of a
        // whole namespace.
        struct Join<'a>(&'a mut State, &'a mut State);
        impl EachTable for Join<'_> {
            type Error = std::convert::Infallible;
            fn table<T: Table>(&mut self) -> Result<(), Self::Error> {
                let into = T::of_mut(self.0);
                for (key, value) in std::mem::take(T::of_mut(self.1)) {
                    match into.entry(key) {
                        std::collections::btree_map::Entry::Occupied(mut had) => T::join(had.get_mut(), &value),
                        std::collections::btree_map::Entry::Vacant(slot) => {
                            slot.insert(value);
                        }
                    }
                }
                Ok(())
            }
        }
        let Ok(()) = each_table(&mut Join(self, &mut other));
        self.cut = cutoffs(&self.revokes);
    }

    /// The extended attributes of `fid`: each name's latest write, unless
    /// that removed it. `None` if it never had any.
    fn xattrs_of(&self, fid: Fid) -> Option<BTreeMap<String, Vec<u8>>> {
        let mut latest: BTreeMap<&str, &(Ts, XattrValue)> = BTreeMap::new();
        let from = (fid, String::new(), DeviceId::MIN);
        for ((f, name, _), v) in self.xattrs.range(from..) {
            if *f != fid {
                break;
            }
            if latest.get(name.as_str()).is_none_or(|old| old.0 < v.0) {
                latest.insert(name, v);
            }
        }
        (!latest.is_empty()).then(|| {
            latest
                .into_iter()
                .filter_map(|(name, (_, value))| Some((name.to_string(), value.clone()?)))
                .collect()
        })
    }

    /// Every device's name, as it enrolled.
    pub fn device_names(&self) -> BTreeMap<DeviceId, String> {
        self.names.iter().map(|(d, (_, n))| (*d, n.clone())).collect()
    }

    /// What version `vid` holds, if it is known.
    pub fn content(&self, vid: Vid) -> Option<&Content> {
        self.versions.get(&vid).map(|(_, (_, _, c))| c)
    }

    /// The latest attributes of `fid` by any device.
    fn attrs_of(&self, fid: Fid) -> Option<&(Ts, Attrs)> {
        self.attrs
            .range((fid, DeviceId::MIN)..=(fid, DeviceId::MAX))
            .map(|(_, v)| v)
            .max_by_key(|(ts, _)| *ts)
    }

    /// The name conflict copies give `device` (at most 64 bytes, so a
    /// conflict name always fits).
    fn device_name(&self, device: DeviceId) -> String {
        match self.names.get(&device) {
            Some((_, name)) => {
                let mut cut = name.len().min(64);
                while !name.is_char_boundary(cut) {
                    cut -= 1;
                }
                name[..cut].replace('/', "-")
            }
            None => format!("{:08x}", (device >> 96) as u32),
        }
    }
}

/// The state of `records`, in whatever order.
pub fn merge<'a>(records: impl IntoIterator<Item = &'a Record> + Clone) -> State {
    let mut state = State::default();
    let mut again = false;
    for r in records.clone() {
        again |= !state.apply(r);
    }
    if again {
        // Every revocation is known now: the second pass changes no cut.
        state = state.restarted();
        for r in records {
            let _ = state.apply(r);
        }
    }
    state
}

/// Whether the operation at `x` was in the past of the one at `at`, whose
/// device had merged `seen`.
fn in_past(x: &Ts, at: &Ts, seen: &Seen) -> bool {
    if x.device == at.device {
        return (x.seq, x.idx) < (at.seq, at.idx);
    }
    seen.get(&x.device).is_some_and(|&s| x.seq <= s)
}

/// The node of the branch of file `fid` that starts at version `root`: the
/// conflict copy's identity, the same on every machine.
pub fn derived(fid: Fid, root: Vid) -> Fid {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"cairn-v1-conflict-copy");
    h.update(fid.to_be_bytes());
    h.update(root.to_be_bytes());
    let d: [u8; 32] = h.finalize().into();
    // Never the root, never a node's own id by accident of a small hash.
    u128::from_be_bytes(d[..16].try_into().expect("16 bytes")) | 1 << 127
}

/// A node as the tree shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub parent: Fid,
    pub name: String,
    pub kind: Kind,
    /// The file's content: the newest version of its branch.
    pub content: Option<Vid>,
    /// The file whose versions this node shows (itself, or for a conflict
    /// copy the file it branched from): a write here is a version of it.
    pub origin: Fid,
    /// Its own latest, or for a conflict copy never given its own, its
    /// origin's.
    pub attrs: Attrs,
    /// Every version of its branch, oldest first (`content` is the last).
    pub history: Vec<Vid>,
    /// Extended attributes: its own, or for a conflict copy never given
    /// any, its origin's.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Directories made concurrently under its name that it stands for:
    /// a machine that has one of them has this directory.
    pub aliases: Vec<Fid>,
}

/// Every live node but the root.
pub type Tree = BTreeMap<Fid, Entry>;

/// A node before placement: where it claims to be, and what it holds.
/// Names are the state's own (render holds one of these per node).
struct Node<'a> {
    kind: Kind,
    origin: Fid,
    content: Option<Vid>,
    /// The versions it holds (a file's main branch, or a copy's branch).
    members: Vec<(Ts, Vid)>,
    /// Its location and the claim's time; `None` for a conflict copy never
    /// moved, which sits where its origin is, just after it.
    loc: Option<(Ts, Claimed<'a>)>,
    /// When its branch began (conflict copies).
    branched: Option<Ts>,
}

/// A [`Loc`] with its directories by their merged ids.
struct Claimed<'a> {
    parent: Fid,
    name: &'a str,
    from: (Fid, &'a str),
}

/// The versions of each file by branch: (file, branch root, or `None` for
/// the main branch) -> its versions, oldest first.
type Branches = BTreeMap<(Fid, Option<Vid>), Vec<(Ts, Vid)>>;

fn branches(state: &State) -> Branches {
    let mut by_file: BTreeMap<Fid, Vec<(Ts, Vid, Option<Vid>)>> = BTreeMap::new();
    for (vid, (ts, (fid, base, _))) in &state.versions {
        by_file.entry(*fid).or_default().push((*ts, *vid, *base));
    }
    let mut out = BTreeMap::new();
    for (fid, mut versions) in by_file {
        versions.sort();
        let known: BTreeSet<Vid> = versions.iter().map(|v| v.1).collect();
        let mut children: BTreeMap<Vid, Vec<(Ts, Vid)>> = BTreeMap::new();
        let mut roots = Vec::new();
        for &(ts, vid, base) in &versions {
            match base.filter(|b| known.contains(b) && *b != vid) {
                Some(b) => children.entry(b).or_default().push((ts, vid)),
                None => roots.push((ts, vid)),
            }
        }
        // Branch starts, oldest first: the main root, other roots, and every
        // child but the first of each version.
        let mut starts: Vec<(Ts, Vid)> = roots.clone();
        for kids in children.values() {
            starts.extend(kids.iter().skip(1));
        }
        starts.sort();
        let main = roots.first().map(|r| r.1);
        for (ts, root) in starts {
            let mut chain = vec![(ts, root)];
            let mut at = root;
            // A base cycle (only a forger makes one) ends where it repeats.
            let mut visited = BTreeSet::from([root]);
            while let Some(&(ts, next)) = children.get(&at).and_then(|k| k.first()) {
                if !visited.insert(next) {
                    break;
                }
                chain.push((ts, next));
                at = next;
            }
            let key = if Some(root) == main { None } else { Some(root) };
            out.insert((fid, key), chain);
        }
    }
    out
}

/// The tree `state` shows.
/// Concurrent `mkdir`s of one name in one directory (neither device had
/// seen the other's) are one directory: each maps to the smallest id of
/// its group. Parents are resolved first, so `mkdir -p a/b` on two
/// machines gives one `a/b`.
fn aliases(state: &State) -> BTreeMap<Fid, Fid> {
    let dirs: Vec<(Fid, Ts, &Loc, &Seen)> = state
        .creates
        .iter()
        .filter(|(_, (_, (_, kind, _)))| *kind == Kind::Dir)
        .map(|(fid, (ts, (loc, _, seen)))| (*fid, *ts, loc, seen))
        .collect();
    let concurrent =
        |a: &(Fid, Ts, &Loc, &Seen), b: &(Fid, Ts, &Loc, &Seen)| !in_past(&a.1, &b.1, b.3) && !in_past(&b.1, &a.1, a.3);
    let mut alias: BTreeMap<Fid, Fid> = BTreeMap::new();
    // Merging only ever joins groups, so this settles (at most once per
    // directory).
    for _ in 0..=dirs.len() {
        let canon = |f: Fid| *alias.get(&f).unwrap_or(&f);
        let mut groups: BTreeMap<(Fid, &str), Vec<usize>> = BTreeMap::new();
        for (i, d) in dirs.iter().enumerate() {
            groups
                .entry((canon(d.2.parent), d.2.name.as_str()))
                .or_default()
                .push(i);
        }
        let mut label: Vec<Fid> = dirs.iter().map(|d| d.0).collect();
        for members in groups.values() {
            let mut changed = true;
            while changed {
                changed = false;
                for (x, &i) in members.iter().enumerate() {
                    for &j in &members[x + 1..] {
                        let low = label[i].min(label[j]);
                        if concurrent(&dirs[i], &dirs[j]) && (label[i], label[j]) != (low, low) {
                            (label[i], label[j], changed) = (low, low, true);
                        }
                    }
                }
            }
        }
        let next: BTreeMap<Fid, Fid> = dirs
            .iter()
            .zip(label)
            .filter(|(d, l)| d.0 != *l)
            .map(|(d, l)| (d.0, l))
            .collect();
        if next == alias {
            break;
        }
        alias = next;
    }
    alias
}

pub fn render(state: &State) -> Tree {
    let alias = aliases(state);
    let canon = |f: Fid| *alias.get(&f).unwrap_or(&f);
    // The latest location claimed for each node, by any of its ids (of
    // claims with one time, which only a forger makes, the last).
    let mut claimed: BTreeMap<Fid, (Ts, &Loc)> = BTreeMap::new();
    let claims = state.locs.iter().map(|((fid, _), (ts, loc))| (fid, ts, loc));
    for (fid, ts, loc) in claims.chain(state.creates.iter().map(|(fid, (ts, (loc, ..)))| (fid, ts, loc))) {
        let latest = claimed.entry(canon(*fid)).or_insert((*ts, loc));
        if *ts >= latest.0 {
            *latest = (*ts, loc);
        }
    }
    let latest = |fid: Fid| {
        claimed.get(&fid).map(|&(ts, loc)| {
            let claim = Claimed {
                parent: canon(loc.parent),
                name: &loc.name,
                from: (canon(loc.from.0), &loc.from.1),
            };
            (ts, claim)
        })
    };
    let mut nodes: BTreeMap<Fid, Node> = BTreeMap::new();
    let mut chains = branches(state);
    for (fid, (_, (_, kind, _))) in &state.creates {
        if alias.contains_key(fid) {
            continue;
        }
        let main = chains.remove(&(*fid, None)).unwrap_or_default();
        nodes.insert(
            *fid,
            Node {
                kind: *kind,
                origin: *fid,
                content: main.last().map(|v| v.1),
                members: main,
                loc: latest(*fid),
                branched: None,
            },
        );
    }
    for ((fid, root), chain) in chains {
        let (Some(root), Some(Node { kind: Kind::File, .. })) = (root, nodes.get(&fid)) else {
            continue;
        };
        let copy = derived(fid, root);
        nodes.insert(
            copy,
            Node {
                kind: Kind::File,
                origin: fid,
                content: chain.last().map(|v| v.1),
                branched: Some(chain[0].0),
                members: chain,
                loc: latest(copy),
            },
        );
    }
    drop(claimed);
    let mut deletes: BTreeMap<Fid, Vec<(Ts, &Seen)>> = BTreeMap::new();
    for ((fid, at), seen) in &state.deletes {
        deletes.entry(canon(*fid)).or_default().push((*at, seen));
    }
    let killed = |fid: Fid, node: &Node| {
        deletes.get(&fid).is_some_and(|d| {
            d.iter()
                .any(|(at, seen)| node.members.iter().all(|(v, _)| in_past(v, at, seen)))
        })
    };
    // Files and symlinks live or die on their own; directories after
    // placement, by their children.
    let mut deleted: BTreeSet<Fid> = nodes.iter().filter(|(f, n)| killed(**f, n)).map(|(f, _)| *f).collect();
    // A hard link lives while not deleted and its node is a node of the
    // state that is not a directory or a link (else it is not shown).
    let mut links: BTreeMap<Fid, Fid> = BTreeMap::new();
    for (fid, node) in &nodes {
        if node.kind != Kind::Link || deleted.contains(fid) {
            continue;
        }
        let to = state.attrs_of(*fid).and_then(|(_, a)| linked(a));
        match to.filter(|t| nodes.get(t).is_some_and(|n| !matches!(n.kind, Kind::Dir | Kind::Link))) {
            Some(to) => {
                links.entry(to).or_insert(*fid);
            }
            None => {
                deleted.insert(*fid);
            }
        }
    }
    // A live link keeps its node alive. A delete that killed it had not
    // seen the link (a machine deletes a node only once no further name of
    // it is left there): the node's own name goes, as the delete said, and
    // the node lives on nameless, under its links.
    let revived: BTreeSet<Fid> = deleted.iter().filter(|f| links.contains_key(f)).copied().collect();
    deleted.retain(|f| !revived.contains(f));
    let place = placements(&nodes, &links, &revived);
    let mut live_child: BTreeSet<Fid> = BTreeSet::new();
    let mut live: BTreeSet<Fid> = BTreeSet::new();
    // Deepest first, so a directory knows its children before itself.
    let depth = |mut fid: Fid| {
        let mut d = 0;
        while fid != ROOT && fid != NAMELESS {
            fid = place[&fid].0;
            d += 1;
        }
        d
    };
    let mut order: Vec<(usize, Fid)> = nodes.keys().map(|f| (depth(*f), *f)).collect();
    order.sort_by(|a, b| b.cmp(a));
    for (_, fid) in order {
        let alive = !deleted.contains(&fid) || (nodes[&fid].kind == Kind::Dir && live_child.contains(&fid));
        if alive {
            live.insert(fid);
            live_child.insert(place[&fid].0);
        }
    }
    let mut tree = name_all(state, nodes, &place, &live);
    for (merged, into) in alias {
        if let Some(e) = tree.get_mut(&into) {
            e.aliases.push(merged);
        }
    }
    tree
}

/// Where each node sits: (parent, name, claim, and whose change and when
/// a conflict name would say), after every fallback.
type Placed<'a> = BTreeMap<Fid, (Fid, &'a str, Claim, Ts)>;
/// The order of claims to a name: earliest first; a conflict copy never
/// moved comes right after its origin's claim.
type Claim = (Ts, u8, Fid);

/// `links`: a live link of each node that has one; `nameless`: nodes
/// that sit at [`NAMELESS`] whatever their location says.
fn placements<'a>(nodes: &BTreeMap<Fid, Node<'a>>, links: &BTreeMap<Fid, Fid>, nameless: &BTreeSet<Fid>) -> Placed<'a> {
    let is_dir = |f: &Fid| *f == ROOT || nodes.get(f).is_some_and(|n| n.kind == Kind::Dir);
    let valid = |fid: &Fid, parent: &Fid| is_dir(parent) || (*parent == NAMELESS && links.contains_key(fid));
    let mut place: Placed = BTreeMap::new();
    let mut fell: BTreeMap<Fid, u8> = BTreeMap::new();
    for (fid, node) in nodes {
        if let Some((ts, loc)) = &node.loc {
            let parent = if nameless.contains(fid) { NAMELESS } else { loc.parent };
            place.insert(*fid, (parent, loc.name, (*ts, 0, *fid), *ts));
        }
    }
    // Moves into what is not a directory fall back.
    let fallback = |place: &mut Placed<'a>, fell: &mut BTreeMap<Fid, u8>, fid: Fid| {
        let times = fell.entry(fid).or_default();
        *times += 1;
        let node = &nodes[&fid];
        let from = node.loc.as_ref().map(|(_, l)| l.from);
        let entry = place.get_mut(&fid).expect("placed");
        match from {
            Some((parent, name)) if *times == 1 && parent != entry.0 => {
                entry.0 = parent;
                entry.1 = name;
            }
            _ => entry.0 = ROOT,
        }
    };
    loop {
        let bad: Vec<Fid> = place
            .iter()
            .filter(|(f, (parent, ..))| !valid(f, parent))
            .map(|(f, _)| *f)
            .collect();
        if bad.is_empty() {
            break;
        }
        for fid in bad {
            fallback(&mut place, &mut fell, fid);
        }
    }
    // Cycles of directories: the latest move of each falls back, one at a
    // time, until none is left (each node falls back at most twice).
    while let Some(cycle) = find_cycle(&place) {
        let latest = *cycle.iter().max_by_key(|f| place[*f].2).expect("a cycle has members");
        fallback(&mut place, &mut fell, latest);
        if !is_dir(&place[&latest].0) {
            fallback(&mut place, &mut fell, latest);
        }
    }
    // A conflict copy never moved sits where its origin ended up (where a
    // link of it is, if it has no name of its own).
    for (fid, node) in nodes {
        if node.loc.is_none() {
            let anchor = match place[&node.origin].0 {
                NAMELESS => links[&node.origin],
                _ => node.origin,
            };
            let (parent, name, (ts, ..), _) = place[&anchor];
            let branched = node.branched.expect("only conflict copies have no location");
            place.insert(*fid, (parent, name, (ts.max(branched), 1, *fid), branched));
        }
    }
    place
}

/// Some cycle of parents in `place`, if there is one.
fn find_cycle(place: &Placed) -> Option<Vec<Fid>> {
    let mut done: BTreeSet<Fid> = BTreeSet::from([ROOT]);
    for start in place.keys() {
        let mut path: Vec<Fid> = Vec::new();
        let mut at = *start;
        while !done.contains(&at) {
            if let Some(i) = path.iter().position(|f| *f == at) {
                return Some(path[i..].to_vec());
            }
            path.push(at);
            at = place.get(&at).map_or(ROOT, |p| p.0);
        }
        done.extend(path);
    }
    None
}

/// Names every live node: the earliest claim keeps a name, the others get
/// conflict names.
fn name_all(state: &State, mut nodes: BTreeMap<Fid, Node>, place: &Placed, live: &BTreeSet<Fid>) -> Tree {
    let mut by_dir: BTreeMap<Fid, Vec<(&Claim, Fid)>> = BTreeMap::new();
    for fid in live {
        by_dir.entry(place[fid].0).or_default().push((&place[fid].2, *fid));
    }
    let mut tree = Tree::new();
    for (dir, mut claims) in by_dir {
        // Nameless nodes claim no name.
        if dir == NAMELESS {
            for (_, fid) in claims {
                tree.insert(fid, entry(state, &mut nodes, dir, NAMELESS_NAME.to_string(), fid));
            }
            continue;
        }
        claims.sort();
        let mut taken: BTreeSet<Cow<str>> = BTreeSet::new();
        let mut losers = Vec::new();
        for (claim, fid) in claims {
            let name = place[&fid].1;
            if taken.insert(Cow::Borrowed(name)) {
                tree.insert(fid, entry(state, &mut nodes, dir, name.to_string(), fid));
            } else {
                losers.push((claim, fid));
            }
        }
        for (_, fid) in losers {
            let ts = place[&fid].3;
            let by = state.device_name(ts.device);
            let mut n = 1;
            let name = loop {
                let name = conflict_name(place[&fid].1, &by, ts.hlc, n);
                if taken.insert(Cow::Owned(name.clone())) {
                    break name;
                }
                n += 1;
            };
            tree.insert(fid, entry(state, &mut nodes, dir, name, fid));
        }
    }
    tree
}

/// Takes `fid`'s node: each is named once, and what it held is freed as the
/// tree grows.
fn entry(state: &State, nodes: &mut BTreeMap<Fid, Node>, parent: Fid, name: String, fid: Fid) -> Entry {
    let node = nodes.remove(&fid).expect("every live node is a node");
    let attrs = state.attrs_of(fid).or_else(|| state.attrs_of(node.origin));
    Entry {
        parent,
        name,
        kind: node.kind,
        content: node.content,
        origin: node.origin,
        attrs: attrs.map(|(_, a)| a.clone()).unwrap_or_default(),
        history: node.members.into_iter().map(|(_, v)| v).collect(),
        xattrs: state
            .xattrs_of(fid)
            .or_else(|| state.xattrs_of(node.origin))
            .unwrap_or_default(),
        aliases: Vec::new(),
    }
}

/// `report.docx` by `laptop` at `hlc` (ns since the epoch):
/// `report (conflict from laptop 2026-12-01 10.34).docx`; the `n`th such
/// name adds ` n` inside the parentheses. At most 255 bytes, cut on a
/// character boundary.
pub fn conflict_name(name: &str, device: &str, hlc: u64, n: usize) -> String {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 && name.len() - i <= 16 => name.split_at(i),
        _ => (name, ""),
    };
    let when = chrono::DateTime::from_timestamp((hlc / 1_000_000_000) as i64, 0)
        .map_or_else(String::new, |t| t.format("%Y-%m-%d %H.%M").to_string());
    let count = if n > 1 { format!(" {n}") } else { String::new() };
    let tail = format!(" (conflict from {device} {when}{count}){ext}");
    let mut cut = 255usize.saturating_sub(tail.len()).min(stem.len());
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{tail}", &stem[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: DeviceId = 0xA << 96;
    const B: DeviceId = 0xB << 96;
    const T0: u64 = 1_796_000_000_000_000_000;

    fn record(device: DeviceId, seq: u64, seen: &[(DeviceId, u64)], ops: Vec<Op>) -> Record {
        Record {
            device,
            seq,
            seen: seen.iter().copied().collect(),
            ops: ops
                .into_iter()
                .enumerate()
                .map(|(i, op)| (T0 + seq * 1_000_000_000 + i as u64 + (device >> 96) as u64, op))
                .collect(),
        }
    }

    fn file(fid: Fid, name: &str) -> Op {
        Op::Create {
            fid,
            kind: Kind::File,
            parent: ROOT,
            name: name.into(),
            attrs: Attrs::default(),
        }
    }

    fn dir(fid: Fid, parent: Fid, name: &str) -> Op {
        Op::Create {
            fid,
            kind: Kind::Dir,
            parent,
            name: name.into(),
            attrs: Attrs::default(),
        }
    }

    fn version(fid: Fid, vid: Vid, base: Option<Vid>) -> Op {
        Op::Version {
            fid,
            vid,
            base,
            content: Content::default(),
        }
    }

    fn names(tree: &Tree) -> Vec<String> {
        let mut v: Vec<String> = tree.values().map(|e| e.name.clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn two_edits_from_one_base_keep_both_the_later_as_a_named_copy() {
        let base = record(
            A,
            1,
            &[],
            vec![Op::Enroll { name: "desk".into() }, file(1, "report.docx")],
        );
        let v1 = record(A, 2, &[], vec![version(1, 10, None)]);
        let b_enroll = record(B, 1, &[(A, 2)], vec![Op::Enroll { name: "laptop".into() }]);
        let a_edit = record(A, 3, &[], vec![version(1, 11, Some(10))]);
        let b_edit = record(B, 2, &[(A, 2)], vec![version(1, 12, Some(10))]);
        let all = [base, v1, b_enroll, a_edit, b_edit];
        let tree = render(&merge(&all));
        let mut got: Vec<(String, Option<Vid>)> = tree.values().map(|e| (e.name.clone(), e.content)).collect();
        got.sort();
        // The laptop's edit is the earlier one: it continues the file.
        assert_eq!(
            got,
            [
                (
                    "report (conflict from desk 2026-11-30 00.53).docx".to_string(),
                    Some(11)
                ),
                ("report.docx".to_string(), Some(12)),
            ]
        );
        // Any order, and twice, gives the same.
        let mut shuffled: Vec<&Record> = all.iter().rev().chain(all.iter()).collect();
        shuffled.rotate_left(3);
        assert_eq!(render(&merge(shuffled)), tree);
    }

    #[test]
    fn a_revoked_device_counts_up_to_its_cut_in_any_order() {
        const C: DeviceId = 0xC << 96;
        let b1 = record(B, 1, &[], vec![file(1, "before"), version(1, 10, None)]);
        let b2 = record(
            B,
            2,
            &[],
            vec![file(2, "after"), version(1, 11, Some(10)), Op::Delete { fid: 1 }],
        );
        let revoke = record(A, 1, &[(B, 1)], vec![Op::Revoke { device: B, after: 1 }]);
        let all = [b1.clone(), b2.clone(), revoke.clone()];
        let tree = render(&merge(&all));
        assert_eq!(names(&tree), ["before"], "B's record 2 never happened");
        assert_eq!(tree[&1].content, Some(10));
        for order in [[&revoke, &b1, &b2], [&b2, &revoke, &b1], [&b1, &revoke, &b2]] {
            assert_eq!(render(&merge(order)), tree);
        }
        // Applied one by one, the revocation asks for the state again.
        let mut state = State::default();
        assert!(state.apply(&b1) && state.apply(&b2));
        assert!(!state.apply(&revoke), "B's record 2 is in the state");
        let mut again = state.restarted();
        for r in &all {
            assert!(again.apply(r));
        }
        assert_eq!(render(&again), tree);
        assert_eq!(again.revoked(), &BTreeMap::from([(B, 1)]));

        // A revocation in a record that no longer counts counts for
        // nothing: B, cut after 1, cannot revoke C in its record 2.
        let c1 = record(C, 1, &[], vec![file(3, "c")]);
        let b_revokes_c = record(B, 2, &[], vec![Op::Revoke { device: C, after: 0 }]);
        let state = merge([&b1, &b_revokes_c, &revoke, &c1]);
        assert_eq!(state.revoked(), &BTreeMap::from([(B, 1)]));
        assert!(state.counts(C, 1) && !state.counts(B, 2));
    }

    #[test]
    fn of_two_machines_revoking_each_other_the_earlier_revocation_stands() {
        // Each cuts the other where it had seen it; A's is earlier (its
        // record's time), so B's, in B's record 2 past A's cut, is void.
        let a1 = record(A, 1, &[], vec![file(1, "a")]);
        let b1 = record(B, 1, &[], vec![file(2, "b")]);
        let a_revokes = record(A, 2, &[(B, 1)], vec![Op::Revoke { device: B, after: 1 }]);
        let mut b_revokes = record(B, 2, &[(A, 1)], vec![Op::Revoke { device: A, after: 1 }]);
        b_revokes.ops[0].0 = a_revokes.ops[0].0 + 1;
        let all = [&a1, &b1, &a_revokes, &b_revokes];
        let state = merge(all);
        assert_eq!(state.revoked(), &BTreeMap::from([(B, 1)]));
        let mut reversed = all;
        reversed.reverse();
        assert_eq!(merge(reversed).revoked(), state.revoked());
    }

    #[test]
    fn only_names_a_file_system_holds_and_user_attributes_pass_the_check() {
        assert_eq!(check(&file(1, "report (2).docx")), Ok(()));
        assert_eq!(check(&file(1, &"\u{6587}".repeat(255))), Ok(()), "a long Windows name");
        for bad in ["", ".", "..", "a/b", "nul\0", &"x".repeat(MAX_NAME + 1)] {
            assert!(check(&file(1, bad)).is_err(), "{bad:?}");
            let moved = Op::Move {
                fid: 1,
                parent: ROOT,
                name: bad.into(),
                from: (ROOT, "a".into()),
            };
            assert!(check(&moved).is_err(), "{bad:?}");
        }
        let xattr = |name: &str, len: usize| Op::Xattr {
            fid: 1,
            name: name.into(),
            value: Some(vec![0; len]),
        };
        assert_eq!(check(&xattr("user.colour", 10)), Ok(()));
        for (name, len) in [
            ("security.capability", 10),
            ("trusted.x", 1),
            ("user.big", MAX_XATTR_VALUE + 1),
        ] {
            assert!(check(&xattr(name, len)).is_err(), "{name}");
        }
        let link = |target: &str| Op::Attrs {
            fid: 1,
            attrs: Attrs {
                target: Some(target.into()),
                ..Attrs::default()
            },
        };
        assert_eq!(check(&link("../a")), Ok(()));
        assert!(check(&link(&"a/".repeat(MAX_TARGET))).is_err());
    }

    #[test]
    fn what_waits_holds_back_only_the_records_that_touched_it() {
        let a1 = record(A, 1, &[], vec![file(1, "open"), version(1, 10, None)]);
        let a2 = record(A, 2, &[], vec![file(2, "made"), version(2, 20, None)]);
        let a3 = record(A, 3, &[], vec![version(1, 11, Some(10))]);
        let b1 = record(B, 1, &[], vec![file(3, "b")]);
        let state = merge([&a1, &a2, &a3, &b1]);
        let waiting = BTreeSet::from([1]);
        // Seen A up to 1: A's first later record on node 1 is 3; B never
        // touched it.
        let first = state.first_unseen(&waiting, &Seen::from([(A, 1)])).unwrap();
        assert_eq!(first, BTreeMap::from([(A, 3)]));
        assert_eq!(
            state.first_unseen(&waiting, &Seen::new()),
            Some(BTreeMap::from([(A, 1)]))
        );
        assert_eq!(
            state.first_unseen(&BTreeSet::from([1, 99]), &Seen::new()),
            None,
            "unknown node"
        );
    }

    #[test]
    fn an_edit_the_deleter_had_not_seen_keeps_the_file() {
        let make = record(A, 1, &[], vec![file(1, "notes"), version(1, 10, None)]);
        let edit = record(A, 2, &[], vec![version(1, 11, Some(10))]);
        let delete = record(B, 1, &[(A, 1)], vec![Op::Delete { fid: 1 }]);
        let tree = render(&merge([&make, &edit, &delete]));
        assert_eq!(tree[&1].content, Some(11));
        // Seen, the same delete removes it.
        let informed = record(B, 1, &[(A, 2)], vec![Op::Delete { fid: 1 }]);
        assert!(render(&merge([&make, &edit, &informed])).is_empty());
    }

    fn link(fid: Fid, to: Fid, name: &str) -> Op {
        Op::Create {
            fid,
            kind: Kind::Link,
            parent: ROOT,
            name: name.into(),
            attrs: Attrs {
                target: Some(to.to_string()),
                ..Attrs::default()
            },
        }
    }

    fn shown(tree: &Tree) -> Vec<String> {
        let mut v: Vec<String> = tree
            .values()
            .filter(|e| e.parent != NAMELESS)
            .map(|e| e.name.clone())
            .collect();
        v.sort();
        v
    }

    /// What a machine logs when a file's first name goes while a further
    /// name is left (the move alone is not what a machine logs).
    fn unnamed(fid: Fid, from: &str) -> Vec<Op> {
        let to_nameless = Op::Move {
            fid,
            parent: NAMELESS,
            name: fid.to_string(),
            from: (ROOT, from.into()),
        };
        vec![to_nameless, Op::Delete { fid }]
    }

    #[test]
    fn a_hard_link_keeps_its_file_without_the_names_removed_and_a_dangling_one_is_not_shown() {
        let make = record(A, 1, &[], vec![file(1, "a"), version(1, 10, None)]);
        let linked = record(B, 1, &[(A, 1)], vec![link(2, 1, "b")]);
        // The first name removed where the link was known: the node lives
        // on nameless, its content under the link.
        let unnamed_a = record(A, 2, &[(B, 1)], unnamed(1, "a"));
        let tree = render(&merge([&make, &linked, &unnamed_a]));
        assert_eq!(shown(&tree), ["b"]);
        assert_eq!((tree[&1].parent, tree[&1].content), (NAMELESS, Some(10)));
        // Removed by a machine that had not seen the link: the same.
        let removed = record(A, 2, &[], vec![Op::Delete { fid: 1 }]);
        let tree = render(&merge([&make, &linked, &removed]));
        assert_eq!((shown(&tree), tree[&1].parent), (vec!["b".to_string()], NAMELESS));
        // Both names removed by one that saw the link: gone.
        let both = record(A, 2, &[(B, 1)], vec![Op::Delete { fid: 2 }, Op::Delete { fid: 1 }]);
        assert!(render(&merge([&make, &linked, &both])).is_empty());
        // Two machines each removing one of the two names: gone too.
        let b_removes = record(B, 2, &[(A, 1)], vec![Op::Delete { fid: 2 }]);
        assert!(render(&merge([&make, &linked, &unnamed_a, &b_removes])).is_empty());
        // A first name removed while the link is renamed: the rename stands.
        let renamed = record(
            B,
            2,
            &[(A, 1)],
            vec![Op::Move {
                fid: 2,
                parent: ROOT,
                name: "c".into(),
                from: (ROOT, "b".into()),
            }],
        );
        assert_eq!(shown(&render(&merge([&make, &linked, &unnamed_a, &renamed]))), ["c"]);
        // An edit the remover of the first name had not seen, while the
        // other name went too: the first name comes back with the edit.
        let edit = record(B, 2, &[(A, 1)], vec![version(1, 11, Some(10)), Op::Delete { fid: 2 }]);
        let tree = render(&merge([&make, &linked, &unnamed_a, &edit]));
        assert_eq!((shown(&tree), tree[&1].content), (vec!["a".to_string()], Some(11)));
        // A link to a directory, or to nothing known, is not shown.
        let odd = record(
            B,
            2,
            &[(A, 1)],
            vec![dir(3, ROOT, "d"), link(4, 3, "x"), link(5, 99, "y")],
        );
        assert_eq!(names(&render(&merge([&make, &odd]))), ["a", "d"]);
        // A link naming no node at all is refused with its record.
        let mut nameless = link(6, 1, "z");
        if let Op::Create { attrs, .. } = &mut nameless {
            attrs.target = None;
        }
        assert!(check(&nameless).is_err());
    }

    #[test]
    fn a_directory_deleted_while_another_machine_adds_to_it_stays_with_the_new_file() {
        let make = record(A, 1, &[], vec![dir(1, ROOT, "d")]);
        let rmdir = record(A, 2, &[], vec![Op::Delete { fid: 1 }]);
        let add = record(
            B,
            1,
            &[(A, 1)],
            vec![
                Op::Create {
                    fid: 2,
                    kind: Kind::File,
                    parent: 1,
                    name: "new".into(),
                    attrs: Attrs::default(),
                },
                version(2, 20, None),
            ],
        );
        let tree = render(&merge([&make, &rmdir, &add]));
        assert_eq!(names(&tree), ["d", "new"]);
        assert_eq!(tree[&2].parent, 1);
    }

    #[test]
    fn crossed_moves_of_two_directories_break_the_cycle_by_undoing_the_later() {
        let make = record(A, 1, &[], vec![dir(1, ROOT, "a"), dir(2, ROOT, "b")]);
        let a_into_b = record(
            A,
            2,
            &[],
            vec![Op::Move {
                fid: 1,
                parent: 2,
                name: "a".into(),
                from: (ROOT, "a".into()),
            }],
        );
        let b_into_a = record(
            B,
            2,
            &[(A, 1)],
            vec![Op::Move {
                fid: 2,
                parent: 1,
                name: "b".into(),
                from: (ROOT, "b".into()),
            }],
        );
        let tree = render(&merge([&make, &a_into_b, &b_into_a]));
        // B's move is the later one (its device sorts after A's at one time).
        assert_eq!((tree[&1].parent, tree[&2].parent), (2, ROOT));
    }

    #[test]
    fn two_creates_of_one_name_keep_both() {
        let a = record(A, 1, &[], vec![file(1, "x"), version(1, 10, None)]);
        let b = record(B, 1, &[], vec![file(2, "x"), version(2, 20, None)]);
        let tree = render(&merge([&b, &a]));
        assert_eq!(tree[&1].name, "x");
        assert!(
            tree[&2].name.starts_with("x (conflict from 0000000b "),
            "{}",
            tree[&2].name
        );
    }

    #[test]
    fn two_machines_making_one_directory_get_one_directory_with_both_files() {
        let put = |fid, parent, vid| {
            vec![
                Op::Create {
                    fid,
                    kind: Kind::File,
                    parent,
                    name: format!("f{fid}"),
                    attrs: Attrs::default(),
                },
                version(fid, vid, None),
            ]
        };
        // mkdir -p build/out on both, a file in each out.
        let a = record(
            A,
            1,
            &[],
            [vec![dir(1, ROOT, "build"), dir(2, 1, "out")], put(3, 2, 30)].concat(),
        );
        let b = record(
            B,
            1,
            &[],
            [vec![dir(4, ROOT, "build"), dir(5, 4, "out")], put(6, 5, 60)].concat(),
        );
        let tree = render(&merge([&b, &a]));
        assert_eq!(names(&tree), ["build", "f3", "f6", "out"]);
        assert_eq!((tree[&3].parent, tree[&6].parent), (2, 2));
        // A directory made after seeing the other's renamed away is its own.
        let moved = record(
            B,
            1,
            &[(A, 1)],
            vec![
                Op::Move {
                    fid: 1,
                    parent: ROOT,
                    name: "old".into(),
                    from: (ROOT, "build".into()),
                },
                dir(4, ROOT, "build"),
            ],
        );
        assert_eq!(names(&render(&merge([&a, &moved]))), ["build", "f3", "old", "out"]);
    }

    #[test]
    fn conflict_names_keep_the_extension_and_fit_in_255_bytes() {
        let t = 1_796_120_040_000_000_000;
        assert_eq!(
            conflict_name("a.tar.gz", "pc", t, 1),
            "a.tar (conflict from pc 2026-12-01 10.14).gz"
        );
        assert_eq!(
            conflict_name(".bashrc", "pc", t, 2),
            ".bashrc (conflict from pc 2026-12-01 10.14 2)"
        );
        let long = "é".repeat(200);
        let name = conflict_name(&long, "pc", t, 1);
        assert!(name.len() <= 255 && name.ends_with("10.14)"), "{name}");
    }

    #[test]
    fn the_latest_attributes_win_and_a_conflict_copy_shows_its_origins() {
        let mode = |mode| Attrs {
            mode,
            ..Attrs::default()
        };
        let a1 = record(A, 1, &[], vec![file(1, "f"), version(1, 10, None)]);
        // B chmods after A's create; A's later chmod (a later record) wins.
        let b1 = record(
            B,
            1,
            &[(A, 1)],
            vec![Op::Attrs {
                fid: 1,
                attrs: mode(0o600),
            }],
        );
        let a2 = record(
            A,
            2,
            &[],
            vec![Op::Attrs {
                fid: 1,
                attrs: mode(0o640),
            }],
        );
        let b2 = record(B, 2, &[(A, 1)], vec![version(1, 11, Some(10))]);
        let a3 = record(A, 3, &[], vec![version(1, 12, Some(10))]);
        for order in [[&a1, &b1, &a2, &b2, &a3], [&a3, &b2, &a2, &b1, &a1]] {
            let tree = render(&merge(order));
            assert_eq!(tree.len(), 2, "{tree:?}");
            assert!(tree.values().all(|e| e.attrs.mode == 0o640), "{tree:?}");
        }
    }
}
