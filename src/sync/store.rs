//! The catalog's sync tables (their schema is in catalog.rs, with the
//! rest): what this machine last published or applied of each node, its
//! log records and everything it has of other devices.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{params, DatabaseName, OptionalExtension};

use super::checkpoint;
use super::device::{Identity, PublicKey};
use super::log::{self, Link};
use super::merge::{Attrs, DeviceId, Fid, State, Vid};
use crate::catalog::{Catalog, CatalogError, Ino};
use crate::namespace::RootCap;

const META_DEVICE_ID: &str = "device_id";
const META_DEVICE_KEY: &str = "device_key";
const META_DEVICE_NAME: &str = "device_name";

fn id_blob(id: u128) -> [u8; 16] {
    id.to_be_bytes()
}

fn blob_id(blob: Vec<u8>) -> rusqlite::Result<u128> {
    let bytes: [u8; 16] = blob
        .try_into()
        .map_err(|_| rusqlite::Error::InvalidColumnType(0, "id".into(), rusqlite::types::Type::Blob))?;
    Ok(u128::from_be_bytes(bytes))
}

fn attrs_json(attrs: &Attrs) -> String {
    serde_json::to_string(attrs).expect("attributes serialise")
}

/// A node as this machine last published or applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Synced {
    pub fid: Fid,
    pub ino: Ino,
    pub parent: Fid,
    pub name: String,
    pub attrs: Attrs,
    pub xattrs: Xattrs,
    pub content: Option<Vid>,
    /// The file whose versions it shows (itself, or for a conflict copy
    /// the file it branched from): its versions are logged under it.
    pub origin: Fid,
}

pub type Xattrs = std::collections::BTreeMap<String, Vec<u8>>;

const SYNCED_COLUMNS: &str = "fid, ino, parent, name, attrs, xattrs, content, origin";

fn row_to_synced(r: &rusqlite::Row<'_>) -> rusqlite::Result<Synced> {
    Ok(Synced {
        fid: blob_id(r.get(0)?)?,
        ino: r.get(1)?,
        parent: blob_id(r.get(2)?)?,
        name: r.get(3)?,
        attrs: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
        xattrs: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
        content: r.get::<_, Option<Vec<u8>>>(6)?.map(blob_id).transpose()?,
        origin: blob_id(r.get(7)?)?,
    })
}

/// This machine's identity on the drive, made on first use.
pub fn identity(cat: &Catalog) -> Result<Identity, CatalogError> {
    let bad = |what: &str| CatalogError::Corrupt(format!("catalog meta {what}"));
    if cat.meta(META_DEVICE_ID)?.is_none() {
        let fresh = Identity::generate();
        cat.set_meta(META_DEVICE_KEY, &data_encoding::HEXLOWER.encode(fresh.pkcs8()))?;
        cat.set_meta(META_DEVICE_ID, &format!("{:032x}", fresh.id))?;
        cat.commit()?;
    }
    let id = cat.meta(META_DEVICE_ID)?.unwrap_or_default();
    let id = u128::from_str_radix(&id, 16).map_err(|_| bad(META_DEVICE_ID))?;
    let key = cat.meta(META_DEVICE_KEY)?.ok_or_else(|| bad(META_DEVICE_KEY))?;
    let key = data_encoding::HEXLOWER
        .decode(key.as_bytes())
        .map_err(|_| bad(META_DEVICE_KEY))?;
    Identity::from_pkcs8(id, &key).map_err(|e| bad(&e))
}

/// The name conflict copies and `cairn devices` show for this machine.
pub fn device_name(cat: &Catalog) -> Result<String, CatalogError> {
    Ok(match cat.meta(META_DEVICE_NAME)? {
        Some(name) => name,
        // CAIRN_DEVICE_NAME names a machine otherwise than by its host
        // name (several homes on one host stand for several machines).
        None => {
            let name = std::env::var("CAIRN_DEVICE_NAME").unwrap_or_else(|_| crate::sys::host_name());
            cat.meta_or_insert(META_DEVICE_NAME, &name)?
        }
    })
}

pub fn set_device_name(cat: &Catalog, name: &str) -> Result<(), CatalogError> {
    cat.set_meta(META_DEVICE_NAME, name)
}

/// Nodes changed since they were last published (at most `limit`).
pub fn dirty(cat: &Catalog, limit: usize) -> Result<Vec<Ino>, CatalogError> {
    let mut stmt = cat
        .conn()
        .prepare_cached("SELECT ino FROM sync_dirty ORDER BY ino LIMIT ?1")?;
    let rows = stmt.query_map([limit as i64], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn is_dirty(cat: &Catalog, ino: Ino) -> Result<bool, CatalogError> {
    Ok(cat
        .conn()
        .prepare_cached("SELECT 1 FROM sync_dirty WHERE ino = ?1")?
        .exists([ino])?)
}

/// Marks `ino` as still to publish.
pub fn mark_dirty(cat: &Catalog, ino: Ino) -> Result<(), CatalogError> {
    cat.batch()?
        .prepare_cached("INSERT OR IGNORE INTO sync_dirty VALUES (?1)")?
        .execute([ino])?;
    Ok(())
}

/// Marks the hard links of node `ino` changed: they wait for it to be
/// published (they name it by its id).
pub fn mark_links_dirty(cat: &Catalog, ino: Ino) -> Result<(), CatalogError> {
    cat.batch()?
        .prepare_cached(
            "INSERT OR IGNORE INTO sync_dirty
             SELECT ino FROM nodes WHERE kind = 'link' AND target = CAST(?1 AS TEXT)",
        )?
        .execute([ino])?;
    Ok(())
}

pub fn clear_dirty(cat: &Catalog, ino: Ino) -> Result<(), CatalogError> {
    cat.batch()?
        .prepare_cached("DELETE FROM sync_dirty WHERE ino = ?1")?
        .execute([ino])?;
    Ok(())
}

pub fn synced_by_ino(cat: &Catalog, ino: Ino) -> Result<Option<Synced>, CatalogError> {
    let sql = format!("SELECT {SYNCED_COLUMNS} FROM sync_nodes WHERE ino = ?1");
    Ok(cat
        .conn()
        .prepare_cached(&sql)?
        .query_row([ino], row_to_synced)
        .optional()?)
}

pub fn synced_by_fid(cat: &Catalog, fid: Fid) -> Result<Option<Synced>, CatalogError> {
    let sql = format!("SELECT {SYNCED_COLUMNS} FROM sync_nodes WHERE fid = ?1");
    Ok(cat
        .conn()
        .prepare_cached(&sql)?
        .query_row([id_blob(fid)], row_to_synced)
        .optional()?)
}

/// Every node's last applied row, by node id (built as the rows come: a
/// machine joining a drive of 38,106 entries peaked 1 to 2 MB lower than
/// with a list of them first).
pub fn all_synced(cat: &Catalog) -> Result<HashMap<Fid, Synced>, CatalogError> {
    let sql = format!("SELECT {SYNCED_COLUMNS} FROM sync_nodes");
    let mut stmt = cat.conn().prepare_cached(&sql)?;
    let rows = stmt.query_map([], row_to_synced)?;
    Ok(rows.map(|r| r.map(|s| (s.fid, s))).collect::<Result<_, _>>()?)
}

pub fn put_synced(cat: &Catalog, s: &Synced) -> Result<(), CatalogError> {
    cat.batch()?
        .prepare_cached(&format!(
            "INSERT OR REPLACE INTO sync_nodes ({SYNCED_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        ))?
        .execute(params![
            id_blob(s.fid),
            s.ino,
            id_blob(s.parent),
            s.name,
            attrs_json(&s.attrs),
            serde_json::to_string(&s.xattrs).expect("extended attributes serialise"),
            s.content.map(id_blob),
            id_blob(s.origin)
        ])?;
    Ok(())
}

pub fn remove_synced(cat: &Catalog, fid: Fid) -> Result<(), CatalogError> {
    cat.batch()?
        .prepare_cached("DELETE FROM sync_nodes WHERE fid = ?1")?
        .execute([id_blob(fid)])?;
    Ok(())
}

/// Every extended attribute of `ino`.
pub fn xattrs(cat: &Catalog, ino: Ino) -> Result<Xattrs, CatalogError> {
    let mut stmt = cat
        .conn()
        .prepare_cached("SELECT name, value FROM xattrs WHERE ino = ?1")?;
    let rows = stmt.query_map([ino], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A committed version not yet published: (num, cap, size, sha256).
pub type Unpublished = (i64, String, u64, String);

/// `ino`'s committed versions of its own (not carried over from a file
/// it replaced) that have no shared id yet, oldest first.
pub fn unpublished_versions(cat: &Catalog, ino: Ino) -> Result<Vec<Unpublished>, CatalogError> {
    let mut stmt = cat.conn().prepare_cached(
        "SELECT v.num, v.cap, v.size, v.sha256 FROM versions v
         WHERE v.ino = ?1 AND v.num > 0 AND v.state = 'committed' AND v.cap IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM sync_versions s WHERE s.ino = v.ino AND s.num = v.num)
         ORDER BY v.num",
    )?;
    let rows = stmt.query_map([ino], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64, r.get(3)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn set_vid(cat: &Catalog, ino: Ino, num: i64, vid: Vid) -> Result<(), CatalogError> {
    cat.batch()?
        .prepare_cached("INSERT OR REPLACE INTO sync_versions (ino, num, vid) VALUES (?1, ?2, ?3)")?
        .execute(params![ino, num, id_blob(vid)])?;
    Ok(())
}

/// The local number of shared version `vid` of `ino`, if it has it.
pub fn local_version(cat: &Catalog, ino: Ino, vid: Vid) -> Result<Option<i64>, CatalogError> {
    Ok(cat
        .conn()
        .prepare_cached("SELECT num FROM sync_versions WHERE ino = ?1 AND vid = ?2")?
        .query_row(params![ino, id_blob(vid)], |r| r.get(0))
        .optional()?)
}

/// The shared id of `ino`'s newest version, if it has one.
pub fn latest_vid(cat: &Catalog, ino: Ino) -> Result<Option<Vid>, CatalogError> {
    Ok(cat
        .conn()
        .prepare_cached(
            "SELECT s.vid FROM versions v LEFT JOIN sync_versions s ON s.ino = v.ino AND s.num = v.num
             WHERE v.ino = ?1 ORDER BY v.num DESC LIMIT 1",
        )?
        .query_row([ino], |r| r.get::<_, Option<Vec<u8>>>(0))
        .optional()?
        .flatten()
        .map(blob_id)
        .transpose()?)
}

/// Whether `ino` has versions sealed here and not yet uploaded.
pub fn has_staged(cat: &Catalog, ino: Ino) -> Result<bool, CatalogError> {
    Ok(cat
        .conn()
        .prepare_cached("SELECT 1 FROM versions WHERE ino = ?1 AND state = 'staged'")?
        .exists([ino])?)
}

/// Keeps a log record: this machine's before it is sent anywhere (so a
/// crash resends the same bytes, never other bytes under one number),
/// another's once checked.
pub fn keep_record(cat: &Catalog, device: DeviceId, seq: u64, bytes: &[u8], placed: bool) -> Result<(), CatalogError> {
    cat.batch()?
        .prepare_cached("INSERT OR IGNORE INTO sync_log (device, seq, bytes, placed) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![id_blob(device), seq as i64, bytes, placed])?;
    Ok(())
}

pub fn set_placed(cat: &Catalog, device: DeviceId, seq: u64) -> Result<(), CatalogError> {
    cat.batch()?
        .prepare_cached("UPDATE sync_log SET placed = 1 WHERE device = ?1 AND seq = ?2")?
        .execute(params![id_blob(device), seq as i64])?;
    Ok(())
}

/// This machine's records not yet on enough servers, oldest first.
pub fn unplaced(cat: &Catalog, device: DeviceId) -> Result<Vec<(u64, Vec<u8>)>, CatalogError> {
    let mut stmt = cat
        .conn()
        .prepare_cached("SELECT seq, bytes FROM sync_log WHERE device = ?1 AND placed = 0 ORDER BY seq")?;
    let rows = stmt.query_map([id_blob(device)], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// `device`'s records after `seq` that are on the servers, oldest first,
/// as many as make `budget` bytes (at least one, if there is one).
pub fn placed_after(
    cat: &Catalog,
    device: DeviceId,
    seq: u64,
    budget: usize,
) -> Result<Vec<(u64, Vec<u8>)>, CatalogError> {
    let mut stmt = cat
        .conn()
        .prepare_cached("SELECT seq, bytes FROM sync_log WHERE device = ?1 AND seq > ?2 AND placed = 1 ORDER BY seq")?;
    let mut rows = stmt.query_map(params![id_blob(device), seq as i64], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
    })?;
    let (mut out, mut bytes) = (Vec::new(), 0);
    while bytes < budget {
        let Some(row) = rows.next() else { break };
        let row = row?;
        bytes += row.1.len();
        out.push(row);
    }
    Ok(out)
}

/// Whether any device's record is kept here: the drive's namespace is in
/// device logs.
pub fn any_record(cat: &Catalog) -> Result<bool, CatalogError> {
    Ok(cat
        .conn()
        .prepare_cached("SELECT 1 FROM sync_log LIMIT 1")?
        .exists([])?)
}

/// Record `seq` of `device`, if kept here.
pub fn record(cat: &Catalog, device: DeviceId, seq: u64) -> Result<Option<Vec<u8>>, CatalogError> {
    Ok(cat
        .conn()
        .prepare_cached("SELECT bytes FROM sync_log WHERE device = ?1 AND seq = ?2")?
        .query_row(params![id_blob(device), seq as i64], |r| r.get(0))
        .optional()?)
}

/// `device`'s records `from..=to` longer than `over` bytes, with their
/// lengths (a long record has parts on the servers to delete too).
pub fn long_records(
    cat: &Catalog,
    device: DeviceId,
    from: u64,
    to: u64,
    over: u64,
) -> Result<Vec<(u64, usize)>, CatalogError> {
    let mut stmt = cat.conn().prepare_cached(
        "SELECT seq, length(bytes) FROM sync_log WHERE device = ?1 AND seq BETWEEN ?2 AND ?3 AND length(bytes) > ?4",
    )?;
    let rows = stmt.query_map(params![id_blob(device), from as i64, to as i64, over as i64], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as usize))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A device's newest record kept here.
pub fn last_record(cat: &Catalog, device: DeviceId) -> Result<Option<(u64, Vec<u8>)>, CatalogError> {
    Ok(cat
        .conn()
        .prepare_cached("SELECT seq, bytes FROM sync_log WHERE device = ?1 ORDER BY seq DESC LIMIT 1")?
        .query_row([id_blob(device)], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
        .optional()?)
}

/// Every record kept, each device's in order.
pub fn all_records(cat: &Catalog) -> Result<Vec<(DeviceId, u64, Vec<u8>)>, CatalogError> {
    let mut stmt = cat
        .conn()
        .prepare_cached("SELECT device, seq, bytes FROM sync_log ORDER BY device, seq")?;
    let rows = stmt.query_map([], |r| Ok((blob_id(r.get(0)?)?, r.get::<_, i64>(1)? as u64, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Another device, as far as this machine has merged its log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub id: DeviceId,
    pub key: PublicKey,
    pub merged_seq: u64,
    pub merged_link: Link,
    /// When its newest head seen here was written (its clock).
    pub head_time_ns: i64,
}

pub fn devices(cat: &Catalog) -> Result<Vec<Device>, CatalogError> {
    let mut stmt = cat
        .conn()
        .prepare_cached("SELECT device, key, merged_seq, merged_link, head_time_ns FROM sync_devices")?;
    let rows = stmt.query_map([], |r| {
        let fixed = |i: usize, v: Vec<u8>| {
            v.try_into()
                .map_err(|_| rusqlite::Error::InvalidColumnType(i, "fixed".into(), rusqlite::types::Type::Blob))
        };
        Ok(Device {
            id: blob_id(r.get(0)?)?,
            key: fixed(1, r.get(1)?)?,
            merged_seq: r.get::<_, i64>(2)? as u64,
            merged_link: fixed(3, r.get(3)?)?,
            head_time_ns: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn put_device(cat: &Catalog, d: &Device) -> Result<(), CatalogError> {
    cat.batch()?
        .prepare_cached(
            "INSERT OR REPLACE INTO sync_devices (device, key, merged_seq, merged_link, head_time_ns)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            id_blob(d.id),
            d.key,
            d.merged_seq as i64,
            d.merged_link,
            d.head_time_ns
        ])?;
    Ok(())
}

/// Every record kept here merged again, each checked as when it arrived
/// (a damaged one is logged and left out); and the highest hybrid time
/// among them.
pub fn rebuild(cat: &Catalog, root: &RootCap, me: &Identity) -> Result<(State, u64), CatalogError> {
    let bases = checkpoint_bases(cat)?;
    let read: BTreeMap<DeviceId, u64> = bases.iter().map(|(d, (seq, _))| (*d, *seq)).collect();
    let mut merged = State::default();
    let (hlc, again) = replay(cat, root, me, bases, &mut merged)?;
    if again {
        // A revocation changed what counts: every record again, with every
        // revocation known (the checkpoints read again, not kept twice).
        merged = merged.restarted();
        replay(cat, root, me, checkpoint_bases(cat)?, &mut merged)?;
    }
    for (device, seq) in &read {
        if let Some(cut) = merged.revoked().get(device).filter(|cut| *cut < seq) {
            // Its checkpoint cannot be cut: SEVERAL_MACHINES.md, gaps.
            tracing::warn!(
                device = format!("{device:032x}"),
                cut,
                checkpoint = seq,
                "a device revoked before the checkpoint this machine read of it: its records up to the checkpoint count here"
            );
        }
    }
    Ok((merged, hlc))
}

/// The latest hybrid time of this device's operations, from its newest
/// record (its clock only goes forward), for a machine that has merged
/// no other device's records.
pub fn own_hlc(cat: &Catalog, root: &RootCap, me: &Identity) -> Result<u64, CatalogError> {
    let Some((seq, bytes)) = last_record(cat, me.id)? else {
        return Ok(0);
    };
    match log::open_record(root, &bytes, me.id, seq, Some(&me.public()).filter(|_| seq > 1)) {
        Ok(opened) => Ok(opened.record.ops.iter().map(|(t, _)| *t).max().unwrap_or(0)),
        // The newest of those that open, the long way.
        Err(_) => Ok(rebuild(cat, root, me)?.1),
    }
}

/// Each device whose state here starts from a checkpoint read of it, and
/// that checkpoint's number.
pub fn read_bases(cat: &Catalog) -> Result<BTreeMap<DeviceId, u64>, CatalogError> {
    let mut stmt = cat.conn().prepare_cached(
        "SELECT c.device, c.seq FROM sync_checkpoints c WHERE c.state IS NOT NULL
         AND (SELECT COUNT(*) FROM sync_log l WHERE l.device = c.device AND l.seq <= c.seq) < c.seq",
    )?;
    let rows = stmt.query_map([], |r| Ok((blob_id(r.get(0)?)?, r.get::<_, i64>(1)? as u64)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Forgets the checkpoints read of `device` and how far its log was
/// merged, so the next pass reads it again from the start (its records
/// kept here stay).
pub fn forget_read(cat: &Catalog, device: DeviceId) -> Result<(), CatalogError> {
    let tx = cat.batch()?;
    tx.prepare_cached("DELETE FROM sync_checkpoints WHERE device = ?1")?
        .execute([id_blob(device)])?;
    tx.prepare_cached("UPDATE sync_devices SET merged_seq = 0, merged_link = ?2 WHERE device = ?1")?
        .execute(params![id_blob(device), log::NO_LINK])?;
    Ok(())
}

/// The checkpoint each device's state starts from here: the newest read,
/// for a device whose records up to it are not all kept here (a machine
/// that read the checkpoint instead).
fn checkpoint_bases(cat: &Catalog) -> Result<BTreeMap<DeviceId, (u64, State)>, CatalogError> {
    let mut bases = BTreeMap::new();
    for device in read_bases(cat)?.into_keys() {
        let Some((seq, kept)) = kept_state(cat, device)? else {
            continue;
        };
        // Parsed as it is read: the state, not its bytes too, in memory.
        let opened =
            kept.and_then(|(link, blob)| checkpoint::open_from(std::io::BufReader::new(blob), device, seq, &link));
        match opened {
            Ok(state) => {
                bases.insert(device, (seq, state));
            }
            Err(e) => {
                tracing::error!(device = format!("{device:032x}"), seq, error = %e, "a kept checkpoint");
                // Its records up to the checkpoint are not here: read its
                // log again from the start (a connection that cannot write
                // leaves that to the next that can).
                if let Err(e) = forget_read(cat, device) {
                    tracing::warn!(device = format!("{device:032x}"), error = %e, "a checkpoint to read again");
                }
            }
        }
    }
    Ok(bases)
}

/// Applies every checkpoint in `bases` and every record kept after them
/// to `merged`: the highest hybrid time, and whether a revocation asked
/// for the state to be made again.
fn replay(
    cat: &Catalog,
    root: &RootCap,
    me: &Identity,
    bases: BTreeMap<DeviceId, (u64, State)>,
    merged: &mut State,
) -> Result<(u64, bool), CatalogError> {
    let keys: BTreeMap<DeviceId, PublicKey> = devices(cat)?.into_iter().map(|d| (d.id, d.key)).collect();
    let mut hlc = 0;
    let mut read = BTreeMap::new();
    for (device, (seq, state)) in bases {
        hlc = hlc.max(state.max_hlc());
        merged.join(state);
        read.insert(device, seq);
    }
    let mut again = false;
    for (device, seq, bytes) in all_records(cat)? {
        if read.get(&device).is_some_and(|base| seq <= *base) {
            continue;
        }
        let key = if device == me.id {
            Some(me.public())
        } else {
            keys.get(&device).copied()
        };
        match log::open_record(root, &bytes, device, seq, key.as_ref().filter(|_| seq > 1)) {
            Ok(opened) => {
                hlc = opened.record.ops.iter().map(|(t, _)| *t).fold(hlc, u64::max);
                again |= !merged.apply(&opened.record);
            }
            Err(e) => tracing::error!(device = format!("{device:032x}"), seq, error = %e, "a kept log record"),
        }
    }
    Ok((hlc, again))
}

/// A machine of the drive, as `cairn devices` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Listed {
    pub id: String,
    pub name: String,
    pub this_machine: bool,
    /// Its newest record merged here (this machine: written).
    pub seq: u64,
    /// When its newest head merged here was written, by its clock (this
    /// machine: none).
    pub last_seen_ns: Option<i64>,
    /// Revoked: its last record that counts.
    pub revoked_after: Option<u64>,
    /// Its newest checkpoint: this machine's own on the servers, another's
    /// as read here (none: its records were read).
    pub checkpoint: Option<u64>,
}

/// This machine and every other one this catalog knows of.
pub fn list(cat: &Catalog, root: &RootCap) -> Result<Vec<Listed>, CatalogError> {
    let me = identity(cat)?;
    let others = devices(cat)?;
    // Names and revocations are other machines' words: none, none to read.
    let merged = match others.is_empty() {
        true => State::default(),
        false => rebuild(cat, root, &me)?.0,
    };
    let name_of = |id: DeviceId| {
        merged
            .device_names()
            .get(&id)
            .cloned()
            .unwrap_or_else(|| "(not named yet)".into())
    };
    let mut out = vec![Listed {
        id: format!("{:032x}", me.id),
        name: device_name(cat)?,
        this_machine: true,
        seq: last_record(cat, me.id)?.map_or(0, |r| r.0),
        last_seen_ns: None,
        revoked_after: merged.revoked().get(&me.id).copied(),
        checkpoint: checkpoints(cat, me.id)?.first().map(|c| c.seq),
    }];
    for d in others {
        out.push(Listed {
            id: format!("{:032x}", d.id),
            name: name_of(d.id),
            this_machine: false,
            seq: d.merged_seq,
            last_seen_ns: Some(d.head_time_ns),
            revoked_after: merged.revoked().get(&d.id).copied(),
            checkpoint: checkpoints(cat, d.id)?.first().map(|c| c.seq),
        });
    }
    Ok(out)
}

/// A checkpoint kept on record here (sync::checkpoint).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptCheckpoint {
    pub seq: u64,
    pub link: Link,
    pub cap: String,
    pub size: u64,
    pub made_ns: i64,
}

/// Keeps a checkpoint of `device` with its state (`cp.size` bytes read
/// from `state`), which only the newest of each device keeps. The bytes
/// go into the row as they are read, never whole in memory. If it fails,
/// nothing changed: a savepoint takes back a half-written row (and brings
/// back one the REPLACE removed), while the batch commits whatever else
/// it holds.
pub fn put_checkpoint(
    cat: &mut Catalog,
    device: DeviceId,
    cp: &KeptCheckpoint,
    mut state: impl std::io::Read,
) -> Result<(), CatalogError> {
    let tx = cat.batch_savepoint()?;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO sync_checkpoints (device, seq, link, cap, size, made_ns, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, zeroblob(?5))",
    )?
    .execute(params![
        id_blob(device),
        cp.seq as i64,
        cp.link,
        cp.cap,
        cp.size as i64,
        cp.made_ns,
    ])?;
    let mut blob = tx.blob_open(
        DatabaseName::Main,
        "sync_checkpoints",
        "state",
        tx.last_insert_rowid(),
        false,
    )?;
    let copied = std::io::copy(&mut state, &mut blob)?;
    if copied != cp.size {
        return Err(std::io::Error::other(format!("a checkpoint of {} bytes read as {copied}", cp.size)).into());
    }
    drop(blob);
    tx.prepare_cached("UPDATE sync_checkpoints SET state = NULL WHERE device = ?1 AND seq != ?2")?
        .execute(params![id_blob(device), cp.seq as i64])?;
    tx.commit()?;
    Ok(())
}

/// Keeps checkpoint `cp` of another device, read from the servers
/// (`state`: its bytes) and named by a head written at `made_ns`.
pub fn put_read_checkpoint(
    cat: &mut Catalog,
    device: DeviceId,
    cp: &log::Checkpoint,
    state: &std::fs::File,
    made_ns: i64,
) -> Result<(), CatalogError> {
    let kept = KeptCheckpoint {
        seq: cp.seq,
        link: cp.link,
        cap: cp.cap.clone(),
        size: state.metadata()?.len(),
        made_ns,
    };
    put_checkpoint(cat, device, &kept, state)
}

/// `device`'s checkpoints kept on record here, newest first.
pub fn checkpoints(cat: &Catalog, device: DeviceId) -> Result<Vec<KeptCheckpoint>, CatalogError> {
    checkpoints_where(cat, device, 0, 0)
}

/// This device's checkpoints dropped by retention before `before_ns`,
/// whose shares may still be on the servers.
pub fn dropped_checkpoints(
    cat: &Catalog,
    device: DeviceId,
    before_ns: i64,
) -> Result<Vec<KeptCheckpoint>, CatalogError> {
    checkpoints_where(cat, device, 1, before_ns)
}

/// Those dropped in `from..=to` (0: not dropped).
fn checkpoints_where(cat: &Catalog, device: DeviceId, from: i64, to: i64) -> Result<Vec<KeptCheckpoint>, CatalogError> {
    let mut stmt = cat.conn().prepare_cached(
        "SELECT seq, link, cap, size, made_ns FROM sync_checkpoints
         WHERE device = ?1 AND dropped BETWEEN ?2 AND ?3 ORDER BY seq DESC",
    )?;
    let rows = stmt.query_map(params![id_blob(device), from, to], |r| {
        Ok(KeptCheckpoint {
            seq: r.get::<_, i64>(0)? as u64,
            link: r
                .get::<_, Vec<u8>>(1)?
                .try_into()
                .map_err(|_| rusqlite::Error::InvalidColumnType(1, "link".into(), rusqlite::types::Type::Blob))?,
            cap: r.get(2)?,
            size: r.get::<_, i64>(3)? as u64,
            made_ns: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Dropped by retention at `now_ns`: no longer named, its shares to be
/// removed.
pub fn drop_checkpoint(cat: &Catalog, device: DeviceId, seq: u64, now_ns: i64) -> Result<(), CatalogError> {
    cat.batch()?
        .prepare_cached("UPDATE sync_checkpoints SET dropped = ?3, state = NULL WHERE device = ?1 AND seq = ?2")?
        .execute(params![id_blob(device), seq as i64, now_ns.max(1)])?;
    Ok(())
}

pub fn forget_checkpoint(cat: &Catalog, device: DeviceId, seq: u64) -> Result<(), CatalogError> {
    cat.batch()?
        .prepare_cached("DELETE FROM sync_checkpoints WHERE device = ?1 AND seq = ?2")?
        .execute(params![id_blob(device), seq as i64])?;
    Ok(())
}

/// A kept checkpoint's link, and its state's bytes to read.
fn state_blob(cat: &Catalog, link: Vec<u8>, rowid: i64) -> Result<(Link, rusqlite::blob::Blob<'_>), String> {
    let link = Link::try_from(link).map_err(|_| "a link of another length".to_string())?;
    let blob = cat
        .conn()
        .blob_open(DatabaseName::Main, "sync_checkpoints", "state", rowid, true)
        .map_err(|e| e.to_string())?;
    Ok((link, blob))
}

/// `device`'s newest checkpoint whose state is kept here: its number, and
/// its link and bytes unless they do not open.
pub type KeptState<'c> = (u64, Result<(Link, rusqlite::blob::Blob<'c>), String>);

pub fn kept_state(cat: &Catalog, device: DeviceId) -> Result<Option<KeptState<'_>>, CatalogError> {
    let row = cat
        .conn()
        .prepare_cached(
            "SELECT seq, link, rowid FROM sync_checkpoints WHERE state IS NOT NULL AND device = ?1
             ORDER BY seq DESC LIMIT 1",
        )?
        .query_row([id_blob(device)], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?, r.get::<_, i64>(2)?))
        })
        .optional()?;
    Ok(row.map(|(seq, link, rowid)| (seq, state_blob(cat, link, rowid))))
}

/// How many bytes `device`'s records on the servers hold after its newest
/// checkpoint kept here (all of them if none).
pub fn bytes_since_checkpoint(cat: &Catalog, device: DeviceId) -> Result<u64, CatalogError> {
    let since: i64 = cat
        .conn()
        .prepare_cached(
            "SELECT COALESCE(SUM(LENGTH(bytes)), 0) FROM sync_log WHERE device = ?1 AND placed = 1
             AND seq > (SELECT COALESCE(MAX(seq), 0) FROM sync_checkpoints WHERE device = ?1)",
        )?
        .query_row([id_blob(device)], |r| r.get(0))?;
    Ok(since as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(seq: u64, size: u64) -> KeptCheckpoint {
        KeptCheckpoint {
            seq,
            link: [seq as u8; 32],
            cap: format!("cap {seq}"),
            size,
            made_ns: seq as i64,
        }
    }

    /// A checkpoint whose bytes cannot all be read leaves no row behind,
    /// not even inside a batch that commits other changes, and the
    /// checkpoint kept before keeps its state.
    #[test]
    fn a_checkpoint_that_fails_halfway_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalog::open(&dir.path().join("c.db")).unwrap();
        let state = br#"{"kept": 1}"#;
        put_checkpoint(&mut cat, 7, &kept(1, state.len() as u64), &state[..]).unwrap();
        cat.set_meta("other", "kept too").unwrap();
        // Says 100 bytes, has 5: as a scratch file cut short would.
        let err = put_checkpoint(&mut cat, 7, &kept(2, 100), &b"short"[..]).unwrap_err();
        assert!(err.to_string().contains("read as 5"), "{err}");
        // Again at the same number: the REPLACE is taken back too.
        put_checkpoint(&mut cat, 7, &kept(1, 100), &b"short"[..]).unwrap_err();
        cat.commit().unwrap();
        let seqs: Vec<u64> = checkpoints(&cat, 7).unwrap().iter().map(|c| c.seq).collect();
        assert_eq!(seqs, [1]);
        let row: Vec<u8> = cat
            .conn()
            .query_row("SELECT state FROM sync_checkpoints WHERE seq = 1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(row, state);
        assert_eq!(cat.meta("other").unwrap().as_deref(), Some("kept too"));
    }
}
