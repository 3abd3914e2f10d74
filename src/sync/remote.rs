//! Devices' records on the servers: writing this machine's to every
//! server, and finding and checking every other device's.

use std::collections::{BTreeMap, BTreeSet};

use super::device::PublicKey;
use super::log::{self, Head, LogError, Opened};
use super::merge::DeviceId;
use crate::grid::{Grid, GridServer};
use crate::namespace::RootCap;

/// Writes one record to every server; returns how many took it.
pub async fn put_all(grid: &Grid, name: &str, bytes: &[u8]) -> usize {
    let writes = grid
        .servers
        .iter()
        .map(|s| grid.timed(s.server.put_record(name, bytes.to_vec())));
    futures::future::join_all(writes)
        .await
        .into_iter()
        .filter(Result::is_ok)
        .count()
}

/// Writes record `seq` of `device` to every server (in parts if it is
/// long, `log::stored_as`); returns how many took all of it.
pub async fn put_log_record(grid: &Grid, root: &RootCap, device: DeviceId, seq: u64, bytes: &[u8]) -> usize {
    let objects = log::stored_as(root, device, seq, bytes);
    let writes = grid.servers.iter().map(|s| {
        let objects = &objects;
        async move {
            for (name, bytes) in objects {
                grid.timed(s.server.put_record(name, bytes.clone())).await?;
            }
            Ok::<_, crate::grid::ServerError>(())
        }
    });
    futures::future::join_all(writes)
        .await
        .into_iter()
        .filter(Result::is_ok)
        .count()
}

/// Every server's copy of record `name` (those that answered with one).
async fn copies<'g>(grid: &'g Grid, name: &str) -> Vec<(&'g GridServer, Vec<u8>)> {
    let reads = grid.servers.iter().map(|s| grid.timed(s.server.get_record(name)));
    grid.servers
        .iter()
        .zip(futures::future::join_all(reads).await)
        .filter_map(|(s, got)| match got {
            Ok(Some(bytes)) => Some((s, bytes)),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(server = %s.name, record = name, error = %e, "record unreadable");
                None
            }
        })
        .collect()
}

/// The doorbell as each server has it: it changes whenever any device
/// publishes.
pub async fn bells(grid: &Grid, root: &RootCap) -> BTreeSet<Vec<u8>> {
    copies(grid, &log::bell_name(root))
        .await
        .into_iter()
        .map(|(_, b)| b)
        .filter(|b| log::bell_rung(root, b))
        .collect()
}

pub async fn ring(grid: &Grid, root: &RootCap) -> usize {
    put_all(
        grid,
        &log::bell_name(root),
        &log::seal_bell(root, crate::catalog::now_ns()),
    )
    .await
}

/// Record `seq` of `device`, from the first server whose copy checks out
/// and is chained to `prev` (servers hold the same bytes; a bad copy is
/// one server's fault, not the record's).
pub async fn record(
    grid: &Grid,
    root: &RootCap,
    device: DeviceId,
    seq: u64,
    key: Option<&PublicKey>,
    prev: &log::Link,
) -> Result<(Opened, Vec<u8>), String> {
    let name = log::log_name(root, device, seq);
    let mut why = Vec::new();
    for (s, stored) in copies(grid, &name).await {
        let server = &s.name;
        let bytes = match whole(grid, s, root, device, seq, stored).await {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(%server, record = %name, error = %e, "refusing a device log record");
                why.push(format!("{server}: {e}"));
                continue;
            }
        };
        match log::open_record(root, &bytes, device, seq, key) {
            Ok(opened) if opened.prev == *prev => return Ok((opened, bytes)),
            Ok(_) => why.push(format!("{server}: not chained to record {}", seq - 1)),
            Err(e) => {
                tracing::warn!(%server, record = %name, error = %e, "refusing a device log record");
                why.push(format!("{server}: {e}"));
            }
        }
    }
    Err(if why.is_empty() {
        format!("record {seq} of device {device:032x} is on no server")
    } else {
        why.join("; ")
    })
}

/// The record a server stored as `stored` at its name: itself, or, for a
/// long record's stub, its parts from that server joined (each the length
/// the stub says, so no more is held than a record may be long).
async fn whole(
    grid: &Grid,
    s: &GridServer,
    root: &RootCap,
    device: DeviceId,
    seq: u64,
    stored: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let Some(parts) = log::parts(root, device, seq, &stored).map_err(|e| e.to_string())? else {
        return Ok(stored);
    };
    let mut bytes = Vec::with_capacity(parts.iter().map(|(_, len)| len).sum());
    for (name, len) in parts {
        match grid.timed(s.server.get_record(&name)).await {
            Ok(Some(part)) if part.len() == len => bytes.extend_from_slice(&part),
            Ok(Some(part)) => return Err(format!("part {name} is {} bytes, not {len}", part.len())),
            Ok(None) => return Err(format!("part {name} is missing")),
            Err(e) => return Err(format!("part {name}: {e}")),
        }
    }
    Ok(bytes)
}

/// This device's newest head as the servers have it, checked with its
/// own key: one it did not write means another machine signs as it.
pub async fn own_head(grid: &Grid, root: &RootCap, device: DeviceId, key: &PublicKey) -> Option<Head> {
    copies(grid, &log::head_name(root, device))
        .await
        .into_iter()
        .filter_map(|(_, bytes)| log::open_head(root, &bytes, device, key).ok())
        .max_by_key(|h| (h.seq, h.time_ns))
}

/// Whether some server holds, under record `seq` of `device`, a record
/// signed with `key` other than `bytes`: then another machine signs as
/// this one. A copy that does not verify is a server's doing, not that.
pub async fn signed_by_another(
    grid: &Grid,
    root: &RootCap,
    device: DeviceId,
    key: &PublicKey,
    seq: u64,
    bytes: &[u8],
) -> Option<String> {
    for (s, stored) in copies(grid, &log::log_name(root, device, seq)).await {
        let Ok(theirs) = whole(grid, s, root, device, seq, stored).await else {
            continue;
        };
        if theirs == bytes {
            continue;
        }
        let signed = match log::open_record(root, &theirs, device, seq, Some(key)) {
            Ok(opened) => seq > 1 || opened.payload.enrol.is_some_and(|e| e.key == *key),
            Err(_) => false,
        };
        if signed {
            return Some(format!(
                "server {} holds another record {seq} signed as this machine",
                s.name
            ));
        }
    }
    None
}

/// Whether any server lists a device head of this drive (a drive that
/// machines publish logs to, not only snapshots).
pub async fn any_device(grid: &Grid, root: &RootCap) -> bool {
    let prefix = log::head_prefix(root);
    let lists = grid.servers.iter().map(|s| grid.timed(s.server.list_records(&prefix)));
    futures::future::join_all(lists)
        .await
        .into_iter()
        .any(|l| l.is_ok_and(|names| !names.is_empty()))
}

/// The newest valid head of every device found on any server, with its
/// key (learnt from record 1 for devices not in `known`).
pub async fn heads(
    grid: &Grid,
    root: &RootCap,
    known: &BTreeMap<DeviceId, PublicKey>,
) -> BTreeMap<DeviceId, (Head, PublicKey)> {
    let prefix = log::head_prefix(root);
    let lists = grid.servers.iter().map(|s| grid.timed(s.server.list_records(&prefix)));
    let mut names = BTreeSet::new();
    for listed in futures::future::join_all(lists).await.into_iter().flatten() {
        names.extend(listed);
    }
    let mut best: BTreeMap<DeviceId, (Head, PublicKey)> = BTreeMap::new();
    let mut keys = known.clone();
    for name in names {
        for (s, bytes) in copies(grid, &name).await {
            let server = &s.name;
            let opened = match log::head_device(&bytes) {
                Ok(device) => match key_of(grid, root, device, &mut keys).await {
                    Some(key) => log::open_head(root, &bytes, device, &key).map(|h| (h, key)),
                    None => Err(LogError::NotEnrolled),
                },
                Err(e) => Err(e),
            };
            match opened {
                // A head under another device's name is as good as its
                // own: it is signed.
                Ok((head, key)) => {
                    // Of one number, the later (a checkpoint or pruning
                    // since, said in a head some server missed).
                    let newer = |b: &Head| (head.seq, head.time_ns) > (b.seq, b.time_ns);
                    if best.get(&head.device).is_none_or(|(b, _)| newer(b)) {
                        best.insert(head.device, (head, key));
                    }
                }
                Err(e) => tracing::warn!(%server, record = %name, error = %e, "refusing a device head"),
            }
        }
    }
    best
}

/// `device`'s key: known, or from its record 1.
async fn key_of(
    grid: &Grid,
    root: &RootCap,
    device: DeviceId,
    keys: &mut BTreeMap<DeviceId, PublicKey>,
) -> Option<PublicKey> {
    if let Some(key) = keys.get(&device) {
        return Some(*key);
    }
    match record(grid, root, device, 1, None, &log::NO_LINK).await {
        Ok((opened, _)) => {
            let key = opened.payload.enrol.as_ref()?.key;
            keys.insert(device, key);
            Some(key)
        }
        Err(why) => {
            tracing::warn!(device = format!("{device:032x}"), %why, "a device's first record");
            None
        }
    }
}
