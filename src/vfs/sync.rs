//! Several machines on one drive: the room that publishes this machine's
//! changes to its device log and merges every other device's into the
//! catalog (docs/SEVERAL_MACHINES.md). One pass at a time (`Devices::pass`):
//! publish first, then pull, so a record never claims to have seen what
//! arrived after the changes it logs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Seek, Write};

use super::*;
use crate::namespace::RootCap;
use crate::sync::apply::{self, Inval};
use crate::sync::checkpoint::{self, join};
use crate::sync::device::{self, Identity};
use crate::sync::log::{self, Link, Payload, Seen, NO_LINK};
use crate::sync::merge::{self, Content, DeviceId, Fid, Op, State as Merged, ROOT};
use crate::sync::publish::{self, Local, Plan};
use crate::sync::{remote, store};

/// Meta key: how far this machine had applied each device's log, as its
/// next record says it had seen (JSON list of `Seen`).
const META_APPLIED: &str = "sync_applied";
/// Meta key: what this device's head last said (its newest record and
/// body, JSON).
const META_HEAD: &str = "sync_head";
/// Meta keys: this device's records 2 to this one may leave the servers
/// (its head says so), and have left them.
const META_PRUNED: &str = "sync_pruned";
const META_PRUNED_DONE: &str = "sync_pruned_done";
/// How long a dropped checkpoint's shares stay, for machines reading it
/// from an older head.
const DROPPED_GRACE: Duration = Duration::from_secs(600);
/// Records removed from the servers per pass at most.
const PRUNE_PER_PASS: u64 = 1024;
/// Meta key: revocations asked for here and not yet logged (JSON list of
/// `[device, after]`).
const META_REVOKE: &str = "sync_revoke";
/// Why this machine stopped publishing: another signs as it (a copied or
/// restored home). Set once, never cleared: the fix is a new home.
pub const META_CLONED: &str = "sync_cloned";
/// A full look at every device's head at least this often, even if no
/// doorbell rang (a server may keep an old bell).
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Nodes looked at per turn of `state` during a publication: a few
/// milliseconds of the catalog, so a big change (a `tar x`) does not hold
/// up the drive.
const NODES_PER_TURN: usize = 500;

/// The state of the room, apart from the catalog's tables.
pub(super) struct Devices {
    root: RootCap,
    me: Identity,
    /// Every operation of every device merged here, once another device's
    /// records are: until then (a drive one machine uses) the catalog is
    /// the whole story, and keeping the state, which holds every node of
    /// the namespace, would cost memory for nothing. `None` means no
    /// record or checkpoint of another device is kept here; [`Self::others`]
    /// makes it from the catalog when the first is about to be.
    merged: Mutex<Option<Merged>>,
    /// The highest hybrid time used or seen.
    hlc: AtomicU64,
    /// The doorbells last heard, and when every head was last read.
    heard: Mutex<(BTreeSet<Vec<u8>>, Option<Instant>)>,
    /// Something merged could not be applied yet: apply again next pass.
    again: std::sync::atomic::AtomicBool,
    /// One pass at a time.
    pass: tokio::sync::Mutex<()>,
    /// `[sync] checkpoint_kib`, in bytes.
    checkpoint_min: u64,
    /// `[retention] keep_days`: how long a day's checkpoint is kept.
    keep_days: u32,
    /// The log bytes since the last checkpoint when one came out too large
    /// to make (checkpoint::MAX_BYTES): not tried again until they double.
    too_large_at: AtomicU64,
}

/// A revocation: the device, and its last record that still counts.
#[derive(Debug, Serialize)]
pub struct Revoked {
    pub id: String,
    pub name: String,
    pub after: u64,
}

/// What one pass did.
#[derive(Debug, Default, Serialize)]
pub struct SyncReport {
    /// Operations this machine logged, and records written.
    pub logged: usize,
    pub records: usize,
    /// Records of other devices merged, and catalog changes made from them.
    pub merged: usize,
    pub applied: usize,
    /// Changes of others that wait for one of this machine's (or a close).
    pub waiting: usize,
}

/// Whether `device`'s head offers its records up to `cut` exactly: a
/// checkpoint not past the cut, or every record still on the servers.
fn heads_offer_cut(heads: &BTreeMap<DeviceId, (log::Head, device::PublicKey)>, device: DeviceId, cut: u64) -> bool {
    heads
        .get(&device)
        .is_some_and(|(head, _)| checkpoint::pick(head, Some(cut)).is_some() || head.body.pruned <= 1)
}

fn meta_u64(cat: &Catalog, key: &str) -> VfsResult<u64> {
    Ok(cat.meta(key)?.and_then(|v| v.parse().ok()).unwrap_or(0))
}

fn sync_err(what: String) -> VfsError {
    VfsError::Grid(GridError::Sync(what))
}

fn revoked_err(after: u64) -> VfsError {
    sync_err(format!(
        "another machine revoked this one after its record {after}: nothing is published or merged \
         any more. Its files stay readable here; to go on, join the drive into a new CAIRN_HOME \
         (cairn recover) and copy over what changed"
    ))
}

fn cloned_err(why: &str) -> VfsError {
    sync_err(format!(
        "another machine signs as this one ({why}): this home was copied, or restored from an older \
         backup. Nothing more is published from here, so neither overwrites the other's changes; its \
         files stay readable here. To go on, join the drive into a new CAIRN_HOME (cairn recover) and \
         copy over what changed here"
    ))
}

/// A hybrid time heard from another device, as far as this clock follows
/// it: at most a day ahead of this machine's, so a record with a time near
/// 2^64 (a bug, a hostile root-capability holder) cannot run this clock to
/// its end. Its own operations still order by the time they carry.
fn clamp_heard(hlc: u64) -> u64 {
    const DAY_NS: u64 = 86_400_000_000_000;
    hlc.min((crate::catalog::now_ns().max(0) as u64).saturating_add(DAY_NS))
}

fn vid_of(root: &RootCap, cap: &str) -> merge::Vid {
    let h = root.derive(b"cairn-v1-version-id", &[cap.as_bytes()]);
    u128::from_be_bytes(h[..16].try_into().expect("16 bytes"))
}

impl Devices {
    /// The room of `catalog`'s drive: its identity, and every record kept
    /// here merged again (checked as when they arrived).
    pub(super) fn open(catalog: &Catalog, config: &crate::config::Config) -> VfsResult<Devices> {
        let root = crate::namespace::root_cap(catalog).map_err(|e| sync_err(e.to_string()))?;
        let me = store::identity(catalog)?;
        // `sync_devices` holds only other machines (as `cairn devices` reads it).
        let (merged, hlc) = match store::devices(catalog)?.is_empty() {
            false => store::rebuild(catalog, &root, &me).map(|(m, hlc)| (Some(m), hlc))?,
            true => (None, store::own_hlc(catalog, &root, &me)?),
        };
        let hlc = clamp_heard(hlc);
        Ok(Devices {
            root,
            me,
            merged: Mutex::new(merged),
            hlc: AtomicU64::new(hlc),
            heard: Mutex::new((BTreeSet::new(), None)),
            // Records kept by a pass that stopped before applying them
            // are applied by the first.
            again: std::sync::atomic::AtomicBool::new(true),
            pass: tokio::sync::Mutex::new(()),
            checkpoint_min: config.sync.checkpoint_kib << 10,
            keep_days: config.retention.keep_days,
            too_large_at: AtomicU64::new(0),
        })
    }

    fn next_hlc(&self) -> u64 {
        let now = crate::catalog::now_ns().max(0) as u64;
        let mut prev = self.hlc.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev.saturating_add(1));
            match self
                .hlc
                .compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }

    fn merged(&self) -> MutexGuard<'_, Option<Merged>> {
        self.merged.lock().expect("merged state lock")
    }

    /// Makes the merged state from the catalog if no other device's
    /// records were merged yet: called before the first is kept. Passes
    /// run one at a time and only they add records, so none is added
    /// between the reading and the keeping.
    fn others(&self, cat: &Catalog) -> VfsResult<()> {
        if self.merged().is_none() {
            let made = store::rebuild(cat, &self.root, &self.me)?.0;
            self.merged().get_or_insert(made);
        }
        Ok(())
    }

    /// After which of its records another machine revoked this one.
    fn revoked_me(&self) -> Option<u64> {
        self.merged().as_ref()?.revoked().get(&self.me.id).copied()
    }

    /// The id a node new here gets: derived from its number for nodes
    /// that came from a snapshot (every machine that recovered it derives
    /// the same), fresh otherwise.
    fn fresh_fid(&self, cat: &Catalog, ino: Ino) -> VfsResult<Fid> {
        let legacy: Ino = cat
            .meta(crate::catalog::META_SYNC_LEGACY_INO)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(ROOT_INO_LOCAL);
        Ok(if ino <= legacy {
            let h = self.root.derive(b"cairn-v1-legacy-node-id", &[&ino.to_be_bytes()]);
            u128::from_be_bytes(h[..16].try_into().expect("16 bytes")) | 1
        } else {
            rand::random::<u128>() | 1
        })
    }

    /// The node id of local node `ino` (a directory, or the node a hard
    /// link names), planning it first if it is new here too. `None`: not
    /// published yet (what needs it waits).
    fn fid_of(&self, cat: &Catalog, ino: Ino, ops: &mut Vec<Op>) -> VfsResult<Option<Fid>> {
        if ino == ROOT_INO_LOCAL {
            return Ok(Some(ROOT));
        }
        // A node's "parent" once only hard links name it.
        if ino == crate::catalog::ORPHAN_PARENT {
            return Ok(Some(merge::NAMELESS));
        }
        if let Some(s) = store::synced_by_ino(cat, ino)? {
            return Ok(Some(s.fid));
        }
        if store::is_dirty(cat, ino)? {
            self.plan_node(cat, ino, ops)?;
        }
        Ok(store::synced_by_ino(cat, ino)?.map(|s| s.fid))
    }

    /// Logs what changed of node `ino` into `ops` and records it as
    /// published.
    fn plan_node(&self, cat: &Catalog, ino: Ino, ops: &mut Vec<Op>) -> VfsResult<()> {
        if ino == ROOT_INO_LOCAL {
            store::clear_dirty(cat, ino)?;
            return Ok(());
        }
        let was = store::synced_by_ino(cat, ino)?;
        // Unlinked and open is gone; left with hard links only, nameless.
        let node = match cat.node(ino)? {
            Some(n) if n.parent == crate::catalog::ORPHAN_PARENT && cat.links(ino)? == 0 => None,
            n => n,
        };
        // Cleared first: a directory planned for its child is not planned
        // again, and a loop of parents (none should exist) ends.
        store::clear_dirty(cat, ino)?;
        let ids = self.version_ids(cat, ino)?;
        let local = match node {
            Some(n) => {
                let Some(parent) = self.fid_of(cat, n.parent, ops)? else {
                    store::mark_dirty(cat, ino)?;
                    return Ok(());
                };
                // A hard link names its node by id: published after it (its
                // first publication marks the link again).
                let target = match crate::catalog::linked_node(&n) {
                    Some(to) => match self.fid_of(cat, to, ops)? {
                        Some(fid) => Some(fid.to_string()),
                        None => return Ok(()),
                    },
                    None => n.target.clone(),
                };
                let versions = ids
                    .iter()
                    .map(|(vid, (_, cap, size, sha256))| {
                        let content = Content {
                            cap: cap.clone(),
                            size: *size,
                            sha256: sha256.clone(),
                        };
                        (*vid, content)
                    })
                    .collect();
                let name = match parent {
                    merge::NAMELESS => merge::NAMELESS_NAME.to_string(),
                    _ => n.name.clone(),
                };
                Some(Local {
                    ino,
                    kind: n.kind,
                    parent,
                    name,
                    attrs: merge::Attrs {
                        mode: n.mode,
                        uid: n.uid,
                        gid: n.gid,
                        mtime_ns: n.mtime_ns,
                        target,
                    },
                    xattrs: store::xattrs(cat, ino)?,
                    versions,
                })
            }
            None => None,
        };
        let fresh = match (&local, &was) {
            (Some(_), None) => self.fresh_fid(cat, ino)?,
            _ => 0,
        };
        match publish::plan(local.as_ref(), was.as_ref(), fresh) {
            // Its first committed version marks it again.
            Plan::Wait => {}
            Plan::Log { ops: new, synced } => {
                for (vid, (num, ..)) in &ids {
                    store::set_vid(cat, ino, *num, *vid)?;
                }
                match synced {
                    Some(s) => {
                        if was.is_none() {
                            store::mark_links_dirty(cat, ino)?;
                        }
                        store::put_synced(cat, &s)?;
                    }
                    None => {
                        if let Some(was) = was {
                            store::remove_synced(cat, was.fid)?;
                        }
                    }
                }
                ops.extend(new);
            }
        }
        Ok(())
    }

    /// The ids `ino`'s unpublished versions get, oldest first: derived
    /// from the capability (so machines that recovered one snapshot agree),
    /// unless an earlier version of the file already has that one (a
    /// restore reuses the old version's capability), then from the
    /// capability and the version's number too.
    fn version_ids(&self, cat: &Catalog, ino: Ino) -> VfsResult<Vec<(merge::Vid, store::Unpublished)>> {
        let mut taken = BTreeSet::new();
        let mut out = Vec::new();
        for v in store::unpublished_versions(cat, ino)? {
            let mut vid = vid_of(&self.root, &v.1);
            if taken.contains(&vid) || store::local_version(cat, ino, vid)?.is_some() {
                let h = self
                    .root
                    .derive(b"cairn-v1-version-id-again", &[v.1.as_bytes(), &v.0.to_be_bytes()]);
                vid = u128::from_be_bytes(h[..16].try_into().expect("16 bytes"));
            }
            taken.insert(vid);
            out.push((vid, v));
        }
        Ok(out)
    }

    /// Cuts `ops` into sealed records after this device's newest, kept in
    /// the catalog before any is sent.
    fn seal_records(&self, cat: &Catalog, mut ops: Vec<Op>) -> VfsResult<usize> {
        let last = store::last_record(cat, self.me.id)?;
        let (mut seq, mut prev) = match &last {
            Some((seq, bytes)) => (*seq, log::link(bytes)),
            None => (0, NO_LINK),
        };
        let mut enrol = None;
        if last.is_none() {
            let name = store::device_name(cat)?;
            ops.insert(0, Op::Enroll { name });
            enrol = Some(log::Enrolment {
                key: self.me.public(),
                mac: device::enrol(&self.root, self.me.id, &self.me.public()),
            });
        }
        let seen: Vec<Seen> = cat
            .meta(META_APPLIED)?
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default();
        let mut made = 0;
        let mut pending = ops.into_iter().map(|op| (self.next_hlc(), op)).peekable();
        while pending.peek().is_some() {
            let mut payload = Payload {
                enrol: enrol.take(),
                seen: seen.clone(),
                ops: Vec::new(),
            };
            // Room for the envelope; each operation's size as it is logged.
            let mut size = serde_json::to_vec(&payload).map_or(0, |v| v.len()) + 64;
            while let Some(next) = pending.peek() {
                let len = serde_json::to_vec(next).map_or(0, |v| v.len()) + 1;
                if size + len > log::MAX_PAYLOAD && !payload.ops.is_empty() {
                    break;
                }
                size += len;
                payload.ops.push(pending.next().expect("peeked"));
            }
            seq += 1;
            let bytes =
                log::seal_record(&self.root, &self.me, seq, &prev, &payload).map_err(|e| sync_err(e.to_string()))?;
            prev = log::link(&bytes);
            store::keep_record(cat, self.me.id, seq, &bytes, false)?;
            // Without another device's records nothing is merged: the
            // record is kept, and goes in when the state is made.
            let counted = self.merged().as_mut().is_none_or(|merged| {
                merged.apply(&crate::sync::merge::Record {
                    device: self.me.id,
                    seq,
                    seen: payload.seen.iter().map(|s| (s.device, s.seq)).collect(),
                    ops: payload.ops,
                })
            });
            if !counted {
                self.remerge(cat)?;
            }
            made += 1;
        }
        Ok(made)
    }

    /// What this machine's next record says it has seen, after an apply:
    /// each device's log as far as it was merged, but, for changes left
    /// waiting (a file open here, a node changed here), only up to the
    /// record before the first that touched a waiting node, so a delete
    /// here never claims what the user was not shown, and one waiting
    /// node does not hold back all the rest. `None`: no better than before.
    fn applied_seen(
        &self,
        cat: &Catalog,
        devices: &[store::Device],
        applied: &apply::Applied,
        tree: &merge::Tree,
    ) -> VfsResult<Option<Vec<Seen>>> {
        let before: Vec<Seen> = cat
            .meta(META_APPLIED)?
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default();
        let had: BTreeMap<DeviceId, &Seen> = before.iter().map(|s| (s.device, s)).collect();
        // A conflict copy's changes are its origin's.
        let fids = applied
            .waiting
            .iter()
            .map(|f| tree.get(f).map_or(*f, |e| e.origin))
            .collect();
        let seen_before = had.iter().map(|(d, s)| (*d, s.seq)).collect();
        let Some(first) = self.merged().as_ref().and_then(|m| m.first_unseen(&fids, &seen_before)) else {
            return Ok(None);
        };
        let mut seen = Vec::new();
        for d in devices {
            let was = had.get(&d.id).map_or(0, |s| s.seq);
            let upto = match first.get(&d.id) {
                Some(f) => (f - 1).min(d.merged_seq).max(was),
                None => d.merged_seq,
            };
            let link = if upto == d.merged_seq {
                Some(d.merged_link)
            } else if upto == was {
                had.get(&d.id).map(|s| s.link)
            } else {
                store::record(cat, d.id, upto)?.map(|bytes| log::link(&bytes))
            };
            match link {
                Some(link) if upto > 0 => seen.push(Seen {
                    device: d.id,
                    seq: upto,
                    link,
                }),
                _ => seen.extend(had.get(&d.id).map(|s| (*s).clone())),
            }
        }
        Ok(Some(seen))
    }

    /// This device's checkpoint, if one is due: the number and link of
    /// its newest record on the servers, and the checkpoint's bytes (its
    /// last checkpoint's state and every record since), in an anonymous
    /// file from `scratch`, with their length.
    fn own_checkpoint(
        &self,
        cat: &Catalog,
        scratch: impl Fn() -> std::io::Result<std::fs::File>,
    ) -> VfsResult<Option<(u64, Link, std::fs::File, u64)>> {
        let me = self.me.id;
        let since = store::bytes_since_checkpoint(cat, me)?;
        let now = crate::catalog::now_ns();
        let last = store::checkpoints(cat, me)?
            .first()
            .map(|c| (c.size, Duration::from_nanos((now - c.made_ns).max(0) as u64)));
        let refused = self.too_large_at.load(Ordering::Relaxed);
        if !checkpoint::due(since, last, self.checkpoint_min) || since < refused.saturating_mul(2) {
            return Ok(None);
        }
        // The kept checkpoint streams into the next with a batch of
        // records at a time (checkpoint::join): memory for a batch, not for
        // the namespace, in a few rounds at most.
        let kept = match store::kept_state(cat, me)? {
            Some((seq, Ok((link, blob)))) => Some((join::At { device: me, seq, link }, blob)),
            // Made again from every record (all are kept).
            Some((seq, Err(e))) => {
                tracing::error!(seq, error = %e, "this device's kept checkpoint");
                None
            }
            None => None,
        };
        let budget = (since as usize / join::ROUNDS).clamp(join::BATCH_MIN, join::BATCH_MAX);
        let batch = |after: u64| -> VfsResult<Option<join::Batch>> {
            let mut batch = None;
            for (seq, bytes) in store::placed_after(cat, me, after, budget)? {
                let opened = log::open_record(&self.root, &bytes, me, seq, Some(&self.me.public()).filter(|_| seq > 1))
                    .map_err(|e| sync_err(format!("this device's record {seq}: {e}")))?;
                batch
                    .get_or_insert_with(join::Batch::default)
                    .add(&opened.record, opened.link);
            }
            Ok(batch)
        };
        let Some((join::At { seq, link, .. }, file)) = join::chain(me, kept, batch, scratch)? else {
            return Ok(None);
        };
        let size = file.metadata()?.len();
        if size > checkpoint::MAX_BYTES {
            tracing::error!(
                bytes = size,
                "this device's checkpoint would be larger than any machine reads; its records stay on the servers"
            );
            self.too_large_at.store(since.max(1), Ordering::Relaxed);
            return Ok(None);
        }
        Ok(Some((seq, link, file, size)))
    }

    /// Makes the merged state again from every record kept (a revocation
    /// changed which count), and has the next pass apply it.
    fn remerge(&self, cat: &Catalog) -> VfsResult<()> {
        *self.merged() = Some(store::rebuild(cat, &self.root, &self.me)?.0);
        self.again.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// A revocation of the device named `who` (its name, or the start of
    /// its id), to be logged by the next pass: its records after the last
    /// one merged here stop counting.
    fn ask_revoke(&self, cat: &Catalog, who: &str) -> VfsResult<Revoked> {
        let names = self.merged().as_ref().map(Merged::device_names);
        // Only this machine's records: no other machine to revoke.
        let names = match names {
            Some(names) => names,
            None => [(self.me.id, store::device_name(cat)?)].into(),
        };
        let known = store::devices(cat)?;
        let matching: Vec<&store::Device> = known
            .iter()
            .filter(|d| {
                names.get(&d.id).is_some_and(|n| n == who)
                    || (who.len() >= 8 && format!("{:032x}", d.id).starts_with(&who.to_ascii_lowercase()))
            })
            .collect();
        let d = match matching[..] {
            [d] => d,
            [] if names.get(&self.me.id).is_some_and(|n| n == who) => {
                return Err(sync_err("that is this machine: revoke it from another one".into()))
            }
            [] => {
                return Err(sync_err(format!(
                    "no other machine of this drive is named {who:?} (see cairn devices)"
                )))
            }
            _ => {
                return Err(sync_err(format!(
                    "several machines are named {who:?}: give the start of its id (cairn devices)"
                )))
            }
        };
        let mut pending: Vec<(DeviceId, u64)> = cat
            .meta(META_REVOKE)?
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default();
        pending.push((d.id, d.merged_seq));
        cat.set_meta(META_REVOKE, &serde_json::to_string(&pending).expect("serialises"))?;
        Ok(Revoked {
            id: format!("{:032x}", d.id),
            name: names.get(&d.id).cloned().unwrap_or_default(),
            after: d.merged_seq,
        })
    }
}

const ROOT_INO_LOCAL: Ino = crate::catalog::ROOT_INO;

impl Vfs {
    /// One pass: publish what changed here, then merge what the other
    /// machines published.
    pub async fn sync_devices(self: &Arc<Self>) -> VfsResult<SyncReport> {
        let _one = self.devices.pass.lock().await;
        if let Some(after) = self.devices.revoked_me() {
            // Its later changes count nowhere: merging more would undo
            // them here too. They stay in this home's catalog.
            return Err(revoked_err(after));
        }
        let mut report = SyncReport::default();
        // Other machines' changes are merged even while this one's cannot
        // be sent.
        let published = match self.options.read_only {
            false => self.publish_changes(&mut report).await,
            true => Ok(()),
        };
        self.pull_changes(&mut report).await?;
        published?;
        // Found out while pulling.
        self.not_cloned().await?;
        if !self.options.read_only {
            // Checkpoints only save reading and space: a failure is told,
            // and tried again next pass.
            if let Err(e) = self.checkpoint_own().await {
                tracing::warn!(error = %e, "checkpoint of this device's log");
            }
            if let Err(e) = self.prune_own().await {
                tracing::warn!(error = %e, "pruning this device's log");
            }
        }
        Ok(report)
    }

    /// Refuses, from then on, to write this device's log or head once
    /// another machine signs as it (its home copied, or restored from an
    /// older backup): both would write one record number with other
    /// bytes, and every other machine stops at such a fork. Its own head
    /// on the servers says a record this machine does not have, or the
    /// record that head names or `next` (the record about to be placed)
    /// is on some server, signed, with other bytes.
    async fn alone_as_me(self: &Arc<Self>, next: Option<(u64, &[u8])>) -> VfsResult<()> {
        self.not_cloned().await?;
        let (root, me) = (&self.devices.root, &self.devices.me);
        let head = remote::own_head(&self.grid, root, me.id, &me.public()).await;
        let mut why = match &head {
            Some(head) => self.not_my_head(head).await?,
            None => None,
        };
        // The record the head names, as each server holds it: two copies
        // that both passed this check before either placed it leave a mix.
        let named = match (&why, &head) {
            (None, Some(head)) => {
                let seq = head.seq;
                self.blocking(move |vfs| Ok(store::record(&vfs.lock().catalog, vfs.devices.me.id, seq)?))
                    .await?
                    .map(|bytes| (seq, bytes))
            }
            _ => None,
        };
        for (seq, bytes) in named.iter().map(|(s, b)| (*s, b.as_slice())).chain(next) {
            if why.is_none() {
                why = remote::signed_by_another(&self.grid, root, me.id, &me.public(), seq, bytes).await;
            }
        }
        match why {
            Some(why) => Err(self.found_cloned(why).await?),
            None => Ok(()),
        }
    }

    /// Why this machine no longer publishes (revoked, or another machine
    /// signs as it), for `cairn status`; `None` while it does.
    pub fn sync_stopped(&self) -> VfsResult<Option<String>> {
        if let Some(after) = self.devices.revoked_me() {
            return Ok(Some(revoked_err(after).to_string()));
        }
        let why = self.lock().catalog.meta(META_CLONED)?;
        Ok(why.map(|why| cloned_err(&why).to_string()))
    }

    async fn not_cloned(self: &Arc<Self>) -> VfsResult<()> {
        match self.blocking(|vfs| Ok(vfs.lock().catalog.meta(META_CLONED)?)).await? {
            Some(why) => Err(cloned_err(&why)),
            None => Ok(()),
        }
    }

    /// Why `head`, signed with this device's key, is not one this machine
    /// wrote: it names a record this machine never sealed, or another
    /// record under a number it has.
    async fn not_my_head(self: &Arc<Self>, head: &log::Head) -> VfsResult<Option<String>> {
        let (seq, link) = (head.seq, head.link);
        self.blocking(move |vfs| {
            let cat = &vfs.lock().catalog;
            let me = vfs.devices.me.id;
            let last = store::last_record(cat, me)?.map_or(0, |(seq, _)| seq);
            Ok(if seq > last {
                Some(format!(
                    "its head on the servers names record {seq}; this machine has sealed {last}"
                ))
            } else {
                store::record(cat, me, seq)?
                    .filter(|bytes| log::link(bytes) != link)
                    .map(|_| format!("its head on the servers names another record {seq} than this machine's"))
            })
        })
        .await
    }

    async fn found_cloned(self: &Arc<Self>, why: String) -> VfsResult<VfsError> {
        tracing::error!(%why, "another machine signs as this one");
        let kept = why.clone();
        self.blocking(move |vfs| {
            let st = vfs.lock();
            st.catalog.set_meta(META_CLONED, &kept)?;
            st.catalog.commit()?;
            Ok(())
        })
        .await?;
        Ok(cloned_err(&why))
    }

    async fn publish_changes(self: &Arc<Self>, report: &mut SyncReport) -> VfsResult<()> {
        self.not_cloned().await?;
        loop {
            let (looked, logged, records, left, wal) = self
                .blocking(|vfs| {
                    let st = vfs.lock();
                    let cat = &st.catalog;
                    // Its own commit: never one that would land planned
                    // nodes before their record is kept.
                    store::device_name(cat)?;
                    let mut ops: Vec<Op> = cat
                        .meta(META_REVOKE)?
                        .and_then(|v| serde_json::from_str::<Vec<(DeviceId, u64)>>(&v).ok())
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(device, after)| Op::Revoke { device, after })
                        .collect();
                    if !ops.is_empty() {
                        cat.set_meta(META_REVOKE, "[]")?;
                    }
                    let dirty = store::dirty(cat, NODES_PER_TURN)?;
                    for ino in &dirty {
                        vfs.devices.plan_node(cat, *ino, &mut ops)?;
                    }
                    let logged = ops.len();
                    let records = if ops.is_empty() {
                        0
                    } else {
                        vfs.devices.seal_records(cat, ops)?
                    };
                    let left = store::dirty(cat, NODES_PER_TURN)?;
                    cat.commit()?;
                    Ok((dirty, logged, records, left, cat.wal_path()))
                })
                .await?;
            if records > 0 {
                // On disk before any server has them: after a power loss,
                // a number is never sealed again with other bytes (a fork
                // every other machine would refuse).
                self.blocking(move |vfs| vfs.sync_catalog(wal)).await?;
            }
            report.logged += logged;
            report.records += records;
            // Done, or only nodes left that wait for a parent.
            if left.is_empty() || left == looked {
                break;
            }
        }
        let unplaced = self
            .blocking(|vfs| Ok(store::unplaced(&vfs.lock().catalog, vfs.devices.me.id)?))
            .await?;
        let (root, me) = (&self.devices.root, &self.devices.me);
        if let Some((seq, bytes)) = unplaced.first() {
            self.alone_as_me(Some((*seq, bytes))).await?;
        }
        for (seq, bytes) in unplaced {
            let placed = remote::put_log_record(&self.grid, root, me.id, seq, &bytes).await;
            if placed < self.happy as usize {
                return Err(sync_err(format!(
                    "log record {seq} reached {placed} servers, {} needed; trying again",
                    self.happy
                )));
            }
            self.blocking(move |vfs| Ok(store::set_placed(&vfs.lock().catalog, vfs.devices.me.id, seq)?))
                .await?;
        }
        self.write_head().await
    }

    /// Writes this device's head if it does not yet say what it must: the
    /// newest record, the checkpoints kept and how far records are
    /// pruned. Rewritten until it has (after a crash or a failed write
    /// too), so others find every record.
    async fn write_head(self: &Arc<Self>) -> VfsResult<()> {
        let (root, me) = (&self.devices.root, &self.devices.me);
        let (newest, body, headed) = self
            .blocking(|vfs| {
                let st = vfs.lock();
                let cat = &st.catalog;
                let newest = store::last_record(cat, vfs.devices.me.id)?;
                let mut kept = store::checkpoints(cat, vfs.devices.me.id)?
                    .into_iter()
                    .map(|c| log::Checkpoint {
                        seq: c.seq,
                        link: c.link,
                        cap: c.cap,
                    });
                let body = log::HeadBody {
                    checkpoint: kept.next(),
                    older: kept.collect(),
                    pruned: meta_u64(cat, META_PRUNED)?,
                };
                Ok((newest, body, cat.meta(META_HEAD)?))
            })
            .await?;
        let Some((seq, bytes)) = newest else {
            return Ok(());
        };
        let says = serde_json::to_string(&(seq, &body)).expect("serialises");
        if headed.as_ref() == Some(&says) {
            return Ok(());
        }
        self.alone_as_me(None).await?;
        let head = log::Head {
            device: me.id,
            seq,
            link: log::link(&bytes),
            time_ns: crate::catalog::now_ns(),
            body,
        };
        let placed = remote::put_all(
            &self.grid,
            &log::head_name(root, me.id),
            &log::seal_head(root, me, &head),
        )
        .await;
        remote::ring(&self.grid, root).await;
        if placed < self.happy as usize {
            return Err(sync_err(format!(
                "this device's head reached {placed} servers, {} needed; trying again",
                self.happy
            )));
        }
        self.blocking(move |vfs| Ok(vfs.lock().catalog.set_meta(META_HEAD, &says)?))
            .await?;
        Ok(())
    }

    /// Makes a checkpoint of this device's own records when they have grown
    /// enough ([`checkpoint::due`]), names it in the head, and thins the
    /// older ones and the records they cover ([`checkpoint::retain`]).
    async fn checkpoint_own(self: &Arc<Self>) -> VfsResult<()> {
        let made = self
            .blocking(|vfs| vfs.read_catalog(|cat| vfs.devices.own_checkpoint(cat, || vfs.grid.budget.scratch_file())))
            .await?;
        let Some((seq, link, file, size)) = made else {
            return Ok(());
        };
        // Uploaded from the file, then kept from it: its bytes are never
        // all in memory.
        let mut copy = file.try_clone()?;
        let source = crate::upload::Source {
            reader: Box::new(std::io::BufReader::new(file)),
            size,
        };
        let report = self
            .upload_source(source)
            .await
            .map_err(|e| sync_err(format!("checkpoint {seq}: {e}")))?;
        copy.rewind()?;
        let kept = store::KeptCheckpoint {
            seq,
            link,
            cap: report.cap.to_string(),
            size,
            made_ns: crate::catalog::now_ns(),
        };
        let keep_days = self.devices.keep_days;
        self.blocking(move |vfs| {
            let mut st = vfs.lock();
            let cat = &mut st.catalog;
            let me = vfs.devices.me.id;
            store::put_checkpoint(cat, me, &kept, std::io::BufReader::new(copy))?;
            let all = store::checkpoints(cat, me)?;
            let times: Vec<(u64, i64)> = all.iter().map(|c| (c.seq, c.made_ns)).collect();
            let retained = checkpoint::retain(&times, kept.made_ns, keep_days);
            for old in all.iter().filter(|c| !retained.keep.contains(&c.seq)) {
                store::drop_checkpoint(cat, me, old.seq, kept.made_ns)?;
            }
            let pruned_to = retained.prune_to.max(meta_u64(cat, META_PRUNED)?);
            cat.set_meta(META_PRUNED, &pruned_to.to_string())?;
            cat.commit()?;
            Ok(())
        })
        .await?;
        tracing::info!(seq, bytes = size, "checkpoint of this device's log");
        // Others learn of the new checkpoint, and stop being pointed at the
        // dropped ones and the pruned records, before any of them go.
        self.write_head().await
    }

    /// Removes from the servers what this device's head no longer names:
    /// dropped checkpoints, and records up to the one it says are pruned
    /// ([`PRUNE_PER_PASS`] of them a pass, so a pass stays short).
    async fn prune_own(self: &Arc<Self>) -> VfsResult<()> {
        let me = self.devices.me.id;
        let (dropped, pruned_to, done) = self
            .blocking(move |vfs| {
                let st = vfs.lock();
                let cat = &st.catalog;
                // As far as the head on the servers says, no further; and
                // what it still names stays.
                let headed = cat
                    .meta(META_HEAD)?
                    .and_then(|v| serde_json::from_str::<(u64, log::HeadBody)>(&v).ok())
                    .map(|(_, body)| body)
                    .unwrap_or_default();
                let named: BTreeSet<&str> = headed
                    .checkpoint
                    .iter()
                    .chain(&headed.older)
                    .map(|c| c.cap.as_str())
                    .collect();
                let grace = crate::catalog::now_ns() - DROPPED_GRACE.as_nanos() as i64;
                let dropped = store::dropped_checkpoints(cat, me, grace)?
                    .into_iter()
                    .filter(|c| !named.contains(c.cap.as_str()))
                    .collect::<Vec<_>>();
                Ok((dropped, headed.pruned, meta_u64(cat, META_PRUNED_DONE)?.max(1)))
            })
            .await?;
        for old in dropped {
            if let Ok(cap) = old.cap.parse::<crate::codec::Capability>() {
                if crate::gc::delete_shares(&self.grid, cap.storage_index()).await.is_err() {
                    continue;
                }
            }
            self.blocking(move |vfs| {
                let st = vfs.lock();
                store::forget_checkpoint(&st.catalog, me, old.seq)?;
                st.catalog.commit()?;
                Ok(())
            })
            .await?;
        }
        let upto = pruned_to.min(done + PRUNE_PER_PASS);
        if upto <= done {
            return Ok(());
        }
        let long: BTreeMap<u64, usize> = self
            .blocking(move |vfs| {
                let cat = &vfs.lock().catalog;
                Ok(store::long_records(cat, me, done + 1, upto, crate::grid::MAX_RECORD)?)
            })
            .await?
            .into_iter()
            .collect();
        let root = &self.devices.root;
        let names: Vec<String> = (done + 1..=upto)
            .flat_map(|seq| log::names_of(root, me, seq, long.get(&seq).copied().unwrap_or(0)))
            .collect();
        for batch in names.chunks(64) {
            let deletes = batch.iter().flat_map(|name| {
                self.grid
                    .servers
                    .iter()
                    .map(move |s| self.grid.timed(s.server.delete_record(name)))
            });
            if futures::future::join_all(deletes).await.iter().any(Result::is_err) {
                // Tried again next pass.
                return Ok(());
            }
        }
        self.blocking(move |vfs| {
            let st = vfs.lock();
            st.catalog.set_meta(META_PRUNED_DONE, &upto.to_string())?;
            st.catalog.commit()?;
            Ok(())
        })
        .await
    }

    async fn pull_changes(self: &Arc<Self>, report: &mut SyncReport) -> VfsResult<()> {
        let root = &self.devices.root;
        let bells = remote::bells(&self.grid, root).await;
        let again = self.devices.again.swap(false, Ordering::Relaxed);
        {
            let mut heard = self.devices.heard.lock().expect("heard lock");
            let fresh = heard.1.is_some_and(|at| at.elapsed() < SWEEP_EVERY);
            if heard.0 == bells && fresh && !again {
                return Ok(());
            }
            *heard = (bells, Some(Instant::now()));
        }
        let keys = self
            .blocking(|vfs| Ok(store::devices(&vfs.lock().catalog)?))
            .await?
            .into_iter()
            .map(|d| (d.id, d.key))
            .collect();
        let heads = remote::heads(&self.grid, root, &keys).await;
        let mut merged_any = again | self.merge_heads(&heads, report).await?;
        // A revocation just heard may cut a device inside the checkpoint
        // read of it: read it again up to the cut, where its head still
        // offers a way, and swap that in before anything is applied.
        let bases = self.blocking(|vfs| Ok(store::read_bases(&vfs.lock().catalog)?)).await?;
        let cuts = self
            .devices
            .merged()
            .as_ref()
            .map(|m| m.revoked().clone())
            .unwrap_or_default();
        for (device, base) in bases {
            let Some(cut) = cuts.get(&device).copied().filter(|cut| *cut < base) else {
                continue;
            };
            let Some((head, key)) = heads.get(&device).filter(|_| heads_offer_cut(&heads, device, cut)) else {
                continue;
            };
            match self.reread_to_cut(device, head, *key, cut).await? {
                Ok(()) => {
                    tracing::info!(
                        device = format!("{device:032x}"),
                        cut,
                        checkpoint = base,
                        "read a revoked device again up to its cut"
                    );
                    merged_any = true;
                }
                Err(why) => {
                    tracing::warn!(device = format!("{device:032x}"), cut, %why, "a revoked device's log up to its cut is not readable yet; tried again next pass")
                }
            }
        }
        // A device whose log is being read again from the start (a kept
        // checkpoint that no longer opens) would show as deleted.
        let starting = self
            .blocking(|vfs| Ok(store::devices(&vfs.lock().catalog)?))
            .await?
            .iter()
            .any(|d| d.merged_seq == 0);
        if starting {
            tracing::warn!("a device's log is read again from its start: nothing is applied until it is");
            self.devices.again.store(true, Ordering::Relaxed);
        } else if merged_any {
            self.apply_merged(report).await?;
        }
        Ok(())
    }

    /// `device`'s checkpoint `cp`, fetched and checked: its bytes, in an
    /// unnamed file in `spill/` (rewound), and its state.
    async fn fetch_checkpoint(
        &self,
        device: DeviceId,
        cp: &log::Checkpoint,
    ) -> Result<(std::fs::File, Merged), String> {
        let cap: crate::codec::Capability = cp.cap.parse().map_err(|e| format!("its capability: {e}"))?;
        if cap.layout.size > checkpoint::MAX_BYTES {
            return Err(format!("{} bytes, more than a checkpoint may hold", cap.layout.size));
        }
        let spill = |e: std::io::Error| format!("a file in spill/ to fetch it to: {e}");
        let mut file = self.grid.budget.scratch_file().map_err(spill)?;
        let what = std::path::Path::new("a checkpoint's file in spill/");
        let mut out = std::io::BufWriter::new(&mut file);
        crate::download::download_into(self.grid.clone(), cap, &mut out, what)
            .await
            .map_err(|e| e.to_string())?;
        out.flush().map_err(spill)?;
        drop(out);
        file.rewind().map_err(spill)?;
        let state = checkpoint::open_from(std::io::BufReader::new(&file), device, cp.seq, &cp.link)?;
        file.rewind().map_err(spill)?;
        Ok((file, state))
    }

    /// Reads revoked `device`'s log again so that nothing past `cut`
    /// counts: from a checkpoint not past it (or record 1), every record
    /// up to its head; then, in one transaction, forgets the checkpoints
    /// read of it and keeps these, and merges everything again. Nothing
    /// changes unless all of it was read.
    async fn reread_to_cut(
        self: &Arc<Self>,
        device: DeviceId,
        head: &log::Head,
        key: device::PublicKey,
        cut: u64,
    ) -> VfsResult<Result<(), String>> {
        let root = &self.devices.root;
        let (mut prev, mut from, mut base) = (NO_LINK, 1, None);
        if let Some(cp) = checkpoint::pick(head, Some(cut)) {
            match self.fetch_checkpoint(device, cp).await {
                Ok((file, _)) => {
                    (prev, from) = (cp.link, cp.seq + 1);
                    base = Some((cp.clone(), file));
                }
                Err(why) => return Ok(Err(why)),
            }
        }
        let mut records = Vec::new();
        for seq in from..=head.seq {
            match remote::record(&self.grid, root, device, seq, Some(&key).filter(|_| seq > 1), &prev).await {
                Ok((opened, bytes)) => {
                    prev = opened.link;
                    records.push((seq, bytes));
                }
                Err(why) => return Ok(Err(why)),
            }
        }
        let row = store::Device {
            id: device,
            key,
            merged_seq: head.seq,
            merged_link: prev,
            head_time_ns: head.time_ns,
        };
        let made_ns = head.time_ns;
        self.blocking(move |vfs| {
            let mut st = vfs.lock();
            let cat = &mut st.catalog;
            store::forget_read(cat, device)?;
            if let Some((cp, file)) = &base {
                store::put_read_checkpoint(cat, device, cp, file, made_ns)?;
            }
            for (seq, bytes) in &records {
                store::keep_record(cat, device, *seq, bytes, true)?;
            }
            store::put_device(cat, &row)?;
            cat.commit()?;
            Ok(())
        })
        .await?;
        self.blocking(|vfs| vfs.read_catalog(|cat| vfs.devices.remerge(cat)))
            .await?;
        Ok(Ok(()))
    }

    /// Merges what `heads` say is new of every other device: records, or
    /// a checkpoint instead where [`checkpoint::read_instead`] says so.
    /// Whether anything was merged.
    async fn merge_heads(
        self: &Arc<Self>,
        heads: &BTreeMap<DeviceId, (log::Head, device::PublicKey)>,
        report: &mut SyncReport,
    ) -> VfsResult<bool> {
        let (root, me) = (&self.devices.root, &self.devices.me);
        let known: BTreeMap<DeviceId, store::Device> = self
            .blocking(|vfs| Ok(store::devices(&vfs.lock().catalog)?))
            .await?
            .into_iter()
            .map(|d| (d.id, d))
            .collect();
        let mut merged_any = false;
        for (&device, (head, key)) in heads {
            let key = *key;
            if device == me.id {
                if let Some(why) = self.not_my_head(head).await? {
                    self.found_cloned(why).await?;
                }
                continue;
            }
            let was = known.get(&device);
            let at = was.map_or((0, NO_LINK), |d| (d.merged_seq, d.merged_link));
            let (from, to) = match log::news(at, head) {
                log::News::Ahead { from, to } => (from, to),
                log::News::Nothing => continue,
                log::News::Stale => {
                    tracing::warn!(
                        device = format!("{device:032x}"),
                        seq = head.seq,
                        merged = at.0,
                        "a server serves an old head"
                    );
                    continue;
                }
                log::News::Fork => {
                    tracing::error!(device = format!("{device:032x}"), seq = head.seq, "another record under a number already merged: the device's log was forked or forged; its later records are not merged");
                    continue;
                }
            };
            // Something of another device is about to be merged. Made on
            // the writing connection: this machine's records sealed and not
            // yet committed count too. Once made, nothing to wait for.
            if self.devices.merged().is_none() {
                self.blocking(|vfs| vfs.devices.others(&vfs.lock().catalog)).await?;
            }
            let cut = self
                .devices
                .merged()
                .as_ref()
                .and_then(|m| m.revoked().get(&device).copied());
            let mut from = from;
            let mut prev: Link = at.1;
            if let Some(cp) =
                checkpoint::pick(head, cut).filter(|cp| checkpoint::read_instead(at.0, cp.seq, head.body.pruned))
            {
                match self.read_checkpoint(device, key, head.time_ns, cp).await? {
                    Ok(()) => {
                        tracing::info!(
                            device = format!("{device:032x}"),
                            seq = cp.seq,
                            merged = at.0,
                            "read a device's checkpoint instead of its records"
                        );
                        (from, prev) = (cp.seq + 1, cp.link);
                        report.merged += 1;
                        merged_any = true;
                    }
                    Err(why) => {
                        tracing::warn!(device = format!("{device:032x}"), seq = cp.seq, %why, "a device's checkpoint is unreadable; reading its records");
                    }
                }
            }
            for seq in from..=to {
                let got = remote::record(&self.grid, root, device, seq, Some(&key).filter(|_| seq > 1), &prev).await;
                let (opened, bytes) = match got {
                    Ok(got) => got,
                    Err(why) => {
                        tracing::warn!(device = format!("{device:032x}"), seq, %why, "a device's record is withheld; its later records wait");
                        break;
                    }
                };
                prev = opened.link;
                let row = store::Device {
                    id: device,
                    key,
                    merged_seq: seq,
                    merged_link: opened.link,
                    head_time_ns: head.time_ns,
                };
                self.blocking(move |vfs| {
                    let st = vfs.lock();
                    store::keep_record(&st.catalog, device, seq, &bytes, true)?;
                    store::put_device(&st.catalog, &row)?;
                    st.catalog.commit()?;
                    Ok(())
                })
                .await?;
                let hlc = opened.record.ops.iter().map(|(t, _)| *t).max().unwrap_or(0);
                self.devices.hlc.fetch_max(clamp_heard(hlc), Ordering::Relaxed);
                if !self.devices.merged().as_mut().is_none_or(|m| m.apply(&opened.record)) {
                    self.blocking(|vfs| vfs.devices.remerge(&vfs.lock().catalog)).await?;
                }
                report.merged += 1;
                merged_any = true;
            }
        }
        Ok(merged_any)
    }

    /// Reads `device`'s checkpoint `cp` (named by its head, written at
    /// `head_time_ns`), keeps it and merges it; `Err` if no server gave
    /// one that checks out.
    async fn read_checkpoint(
        self: &Arc<Self>,
        device: DeviceId,
        key: device::PublicKey,
        head_time_ns: i64,
        cp: &log::Checkpoint,
    ) -> VfsResult<Result<(), String>> {
        let (file, state) = match self.fetch_checkpoint(device, cp).await {
            Ok(got) => got,
            Err(why) => return Ok(Err(why)),
        };
        let row = store::Device {
            id: device,
            key,
            merged_seq: cp.seq,
            merged_link: cp.link,
            head_time_ns,
        };
        let cp = cp.clone();
        let kept_here = self
            .blocking(move |vfs| {
                let mut st = vfs.lock();
                // put_checkpoint changes nothing if it fails (so other
                // changes in the batch are not rolled back with it).
                Ok(
                    store::put_read_checkpoint(&mut st.catalog, device, &cp, &file, head_time_ns)
                        .and_then(|()| store::put_device(&st.catalog, &row))
                        .and_then(|()| st.catalog.commit()),
                )
            })
            .await?;
        if let Err(e) = kept_here {
            return Ok(Err(format!("keeping it here: {e}")));
        }
        self.devices
            .hlc
            .fetch_max(clamp_heard(state.max_hlc()), Ordering::Relaxed);
        let cuts_changed = {
            let mut merged = self.devices.merged();
            let merged = merged.as_mut().expect("made before another device's state is read");
            let before = merged.revoked().clone();
            merged.join(state);
            merged.revoked() != &before
        };
        if cuts_changed {
            self.blocking(|vfs| vfs.read_catalog(|cat| vfs.devices.remerge(cat)))
                .await?;
        }
        Ok(Ok(()))
    }

    /// Revokes the write access of the machine named `who` (`cairn devices
    /// revoke`), and publishes it at once.
    pub async fn revoke_device(self: &Arc<Self>, who: String) -> VfsResult<Revoked> {
        let revoked = self
            .blocking(move |vfs| {
                let st = vfs.lock();
                let revoked = vfs.devices.ask_revoke(&st.catalog, &who)?;
                st.catalog.commit()?;
                Ok(revoked)
            })
            .await?;
        self.sync_devices().await.map_err(|e| {
            sync_err(format!(
                "the revocation is kept here and published by the next pass that can: {e}"
            ))
        })?;
        Ok(revoked)
    }

    /// Renders the merged state and makes the catalog show it.
    async fn apply_merged(self: &Arc<Self>, report: &mut SyncReport) -> VfsResult<()> {
        let applied = self
            .blocking(|vfs| {
                // Nothing of another device merged: the catalog shows it all.
                let Some(tree) = vfs.devices.merged().as_ref().map(merge::render) else {
                    return Ok(apply::Applied::default());
                };
                let mut st = vfs.lock();
                let devices = store::devices(&st.catalog)?;
                let in_use = |ino: Ino| vfs.files().get(&ino).is_some_and(OpenFile::in_use);
                // `state`, then the merged state (docs/ARCHITECTURE.md).
                let applied = {
                    let merged = vfs.devices.merged();
                    let merged = merged.as_ref().expect("made once, never dropped");
                    apply::apply(&mut st.catalog, &tree, merged, &in_use)?
                };
                if let Some(seen) = vfs.devices.applied_seen(&st.catalog, &devices, &applied, &tree)? {
                    st.catalog
                        .set_meta(META_APPLIED, &serde_json::to_string(&seen).expect("serialises"))?;
                }
                st.catalog.commit()?;
                drop((st, tree));
                crate::sys::trim_heap();
                Ok(applied)
            })
            .await?;
        if applied.skipped > 0 {
            self.devices.again.store(true, Ordering::Relaxed);
        }
        report.applied += applied.changed;
        report.waiting += applied.skipped;
        if let Some(tell) = self.invalidate.get() {
            for inval in &applied.inval {
                tell(inval);
            }
        }
        Ok(())
    }

    /// Registers what to tell the kernel when a change made elsewhere (a
    /// restore, another machine) makes its caches wrong.
    pub fn on_invalidate(&self, tell: impl Fn(&Inval) + Send + Sync + 'static) {
        let _ = self.invalidate.set(Box::new(tell));
    }
}
