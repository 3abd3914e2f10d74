//! Repair: put back the shares of a version that servers lost, corrupted or
//! never received (a server that was down during the upload).
//!
//! Encoding is deterministic given the key and the plaintext, so the missing
//! shares are rebuilt exactly: read the version from any k valid shares
//! (verified), encode it again with the capability's key, and write only the
//! missing share numbers. The result must reproduce the capability's
//! integrity root, or nothing is published.

use futures::StreamExt;
use std::collections::HashSet;
use std::sync::Arc;

use serde::Serialize;

use crate::codec::{Capability, VersionEncoder, SHARE_MAGIC};
use crate::download::{check, GridReader};
use crate::grid::{Grid, ShareSink};

#[derive(Debug, Serialize)]
pub struct RepairReport {
    pub storage_index: String,
    /// Share numbers that were missing or invalid before.
    pub missing: Vec<u16>,
    /// (share, server) written by this repair.
    pub placed: Vec<(u16, String)>,
    /// (server, error) of attempts that failed.
    pub failures: Vec<(String, String)>,
    /// Every share present and valid afterwards.
    pub healthy: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("{0}")]
    Download(#[from] crate::download::DownloadError),
    #[error("{0}")]
    Codec(#[from] crate::codec::CodecError),
    #[error("re-encoding did not reproduce the capability's integrity root; nothing was written")]
    RootMismatch,
}

pub async fn repair(grid: Arc<Grid>, cap: Capability) -> Result<RepairReport, RepairError> {
    let layout = cap.layout;
    let si = cap.storage_index();
    let before = check(grid.clone(), cap.clone()).await;
    let mut report = RepairReport {
        storage_index: si.to_string(),
        missing: before.missing_shares.clone(),
        placed: Vec::new(),
        failures: Vec::new(),
        healthy: before.healthy,
    };
    if before.healthy {
        return Ok(report);
    }

    // Where each missing share goes: over an invalid copy on the same
    // server, else on a server that holds no share of this version.
    let holding: HashSet<&str> = before
        .findings
        .shares
        .iter()
        .filter(|f| f.state == crate::download::ShareState::Ok)
        .map(|f| f.server.as_str())
        .collect();
    let unreachable: HashSet<&str> = before
        .findings
        .unreachable_servers
        .iter()
        .map(|(s, _)| s.as_str())
        .collect();
    let mut free: Vec<usize> = grid
        .permuted(si)
        .into_iter()
        .filter(|&i| {
            let name = grid.servers[i].name.as_str();
            !holding.contains(name) && !unreachable.contains(name)
        })
        .collect();
    let mut sinks: Vec<(u16, String, Box<dyn ShareSink>)> = Vec::new();
    // One share per server: a server whose copies all read as invalid (a
    // lying one) takes back at most one of them, the rest go elsewhere.
    let mut used: HashSet<usize> = HashSet::new();
    for &share in &before.missing_shares {
        let invalid_on = before
            .findings
            .shares
            .iter()
            .find(|f| f.share == share && f.state != crate::download::ShareState::Ok)
            .and_then(|f| grid.servers.iter().position(|s| s.name == f.server));
        let target = match invalid_on.filter(|i| !used.contains(i)) {
            Some(i) => {
                free.retain(|&f| f != i);
                Some(i)
            }
            None if !free.is_empty() => Some(free.remove(0)),
            None => None,
        };
        used.extend(target);
        let Some(idx) = target else {
            report
                .failures
                .push(("-".into(), format!("no server available for share {share}")));
            continue;
        };
        let server = &grid.servers[idx];
        match grid.timed(server.server.create_share(si, share)).await {
            Ok(sink) => sinks.push((share, server.name.clone(), sink)),
            Err(e) => report.failures.push((server.name.clone(), e.to_string())),
        }
    }
    if sinks.is_empty() {
        return Ok(report);
    }

    let reader = GridReader::open(grid.clone(), cap.clone()).await?;
    let mut encoder = VersionEncoder::new(layout.params, cap.key, layout.size);
    let mut failed: HashSet<u16> = HashSet::new();
    write_all(&grid, &mut sinks, &mut failed, &mut report, |_| SHARE_MAGIC.to_vec()).await;
    let mut segments = futures::stream::iter(0..layout.num_segments())
        .map(|j| reader.read_segment(j))
        .buffered(crate::download::READ_AHEAD);
    while let Some(plaintext) = segments.next().await {
        let plaintext = plaintext?;
        let blocks = encoder.encode_segment(&plaintext)?;
        write_all(&grid, &mut sinks, &mut failed, &mut report, |share| {
            blocks[share as usize].clone()
        })
        .await;
    }
    let encoded = encoder.finish()?;
    if encoded.cap.root != cap.root {
        for (_, _, sink) in sinks {
            sink.abort().await;
        }
        return Err(RepairError::RootMismatch);
    }
    write_all(&grid, &mut sinks, &mut failed, &mut report, |share| {
        encoded.tails[share as usize].clone()
    })
    .await;
    for (share, server, mut sink) in sinks {
        if failed.contains(&share) {
            sink.abort().await;
            continue;
        }
        let done = match grid.timed(sink.seal()).await {
            Ok(()) => grid.timed(sink.publish()).await,
            Err(e) => {
                sink.abort().await;
                Err(e)
            }
        };
        match done {
            Ok(()) => report.placed.push((share, server)),
            Err(e) => report.failures.push((server, e.to_string())),
        }
    }
    report.healthy = check(grid, cap).await.healthy;
    Ok(report)
}

/// Writes one piece to every sink still working; a failing sink is noted
/// and skipped from then on.
async fn write_all(
    grid: &Grid,
    sinks: &mut [(u16, String, Box<dyn ShareSink>)],
    failed: &mut HashSet<u16>,
    report: &mut RepairReport,
    piece: impl Fn(u16) -> Vec<u8>,
) {
    for (share, server, sink) in sinks.iter_mut() {
        if failed.contains(share) {
            continue;
        }
        if let Err(e) = grid.timed(sink.write(piece(*share).into())).await {
            failed.insert(*share);
            report.failures.push((server.clone(), e.to_string()));
        }
    }
}
