//! Retention and garbage collection: which committed versions stay, and
//! deleting the shares of the rest. A share is deleted only when no
//! retained version (of any file; `restore` reuses capabilities) and no
//! retained namespace snapshot names its capability.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::catalog::{Catalog, CatalogError, Ino, PublishedNamespace, Version};
use crate::codec::FileCap;
use crate::config::RetentionConfig;
use crate::grid::{Grid, ServerError};

/// Namespace snapshots kept besides those younger than `keep_days`.
pub const NAMESPACES_KEPT: usize = 3;

const NS_PER_DAY: i64 = 86_400 * 1_000_000_000;

#[derive(Debug, Default, Serialize)]
pub struct Plan {
    /// (ino, version number, stored capability: its own or its pack's) of
    /// versions to collect.
    pub versions: Vec<(Ino, i64, String)>,
    /// (sequence number, capability) of namespace snapshots to collect.
    pub namespaces: Vec<(u64, String)>,
    /// Distinct capabilities whose shares go.
    pub caps: Vec<String>,
    pub bytes: u64,
}

/// What `rules` retain of `versions` (committed ones) and `namespaces`.
/// Pure: `live` says whether a file still has a name.
pub fn plan(
    versions: &[Version],
    live: &dyn Fn(Ino) -> bool,
    namespaces: &[PublishedNamespace],
    rules: &RetentionConfig,
    now_ns: i64,
) -> Plan {
    let young = |created_ns: i64| now_ns - created_ns < rules.keep_days as i64 * NS_PER_DAY;
    let mut by_file: BTreeMap<Ino, Vec<&Version>> = BTreeMap::new();
    for v in versions.iter().filter(|v| v.cap.is_some()) {
        by_file.entry(v.ino).or_default().push(v);
    }
    let mut retained: HashSet<String> = HashSet::new();
    let mut candidates = Vec::new();
    for (ino, mut vs) in by_file {
        vs.sort_by_key(|v| std::cmp::Reverse(v.num));
        let alive = live(ino);
        for (i, v) in vs.into_iter().enumerate() {
            let keep = young(v.created_ns) || (alive && (i == 0 || i < rules.keep_versions as usize));
            let (stored, _) = stored_of(v.cap.as_deref().expect("filtered"));
            if keep {
                retained.insert(stored);
            } else {
                candidates.push(v);
            }
        }
    }
    let mut out = Plan::default();
    let mut caps: HashSet<String> = HashSet::new();
    for v in candidates {
        let (stored, size) = stored_of(v.cap.as_deref().expect("filtered"));
        // A pack goes only when no retained version lies in it.
        if !retained.contains(&stored) {
            if caps.insert(stored.clone()) {
                out.bytes += size.unwrap_or(v.size);
            }
            out.versions.push((v.ino, v.num, stored));
        }
    }
    for (i, ns) in namespaces.iter().enumerate() {
        // `namespaces` comes newest first.
        if i >= NAMESPACES_KEPT && !young(ns.created_ns) {
            caps.insert(ns.cap.clone());
            out.namespaces.push((ns.seq, ns.cap.clone()));
        }
    }
    out.caps = caps.into_iter().collect();
    out.caps.sort();
    out
}

/// The capability of the encoded version holding a file version's bytes
/// (itself, or its pack), with that version's size.
fn stored_of(cap: &str) -> (String, Option<u64>) {
    match cap.parse::<FileCap>() {
        Ok(parsed) => (parsed.stored().to_string(), Some(parsed.stored().layout.size)),
        Err(_) => (cap.to_owned(), None),
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub plan: Plan,
    pub shares_deleted: usize,
    /// Servers that could not be asked; their versions stay on record and
    /// the next `cairn gc` tries again.
    pub failures: Vec<(String, String)>,
}

/// Plans from the catalog and, unless `dry_run`, deletes and records.
pub async fn collect(
    grid: &Grid,
    catalog: &Catalog,
    rules: &RetentionConfig,
    dry_run: bool,
) -> Result<Report, CatalogError> {
    let versions = catalog.committed_versions()?;
    let live = |ino| catalog.is_live(ino).unwrap_or(true);
    let plan = plan(
        &versions,
        &live,
        &catalog.namespaces()?,
        rules,
        crate::catalog::now_ns(),
    );
    let mut report = Report::default();
    let mut done: HashSet<String> = HashSet::new();
    if !dry_run {
        for cap in &plan.caps {
            let Ok(parsed) = cap.parse::<crate::codec::Capability>() else {
                continue;
            };
            match delete_shares(grid, parsed.storage_index()).await {
                Ok(n) => {
                    report.shares_deleted += n;
                    done.insert(cap.clone());
                }
                Err(failures) => report.failures.extend(failures),
            }
        }
        for (ino, num, cap) in &plan.versions {
            if done.contains(cap) {
                catalog.set_version_state(*ino, *num, crate::catalog::VersionState::Collected)?;
            }
        }
        for (seq, cap) in &plan.namespaces {
            if done.contains(cap) {
                catalog.collect_namespace(*seq)?;
            }
        }
    }
    report.plan = plan;
    Ok(report)
}

/// Deletes every share of `si` on every server; fails (having deleted what
/// it could) if any server could not be asked.
pub(crate) async fn delete_shares(grid: &Grid, si: crate::codec::StorageIndex) -> Result<usize, Vec<(String, String)>> {
    let mut deleted = 0;
    let mut failures = Vec::new();
    for s in &grid.servers {
        let result: Result<usize, ServerError> = async {
            let mut n = 0;
            for share in grid.timed(s.server.shares(si)).await? {
                grid.timed(s.server.delete(si, share)).await?;
                n += 1;
            }
            Ok(n)
        }
        .await;
        match result {
            Ok(n) => deleted += n,
            Err(e) => failures.push((s.name.clone(), e.to_string())),
        }
    }
    if failures.is_empty() {
        Ok(deleted)
    } else {
        Err(failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::VersionState;

    fn v(ino: Ino, num: i64, cap: &str, age_days: i64) -> Version {
        Version {
            ino,
            num,
            size: 100,
            sha256: String::new(),
            state: VersionState::Committed,
            cap: Some(cap.into()),
            created_ns: 1000 * NS_PER_DAY - age_days * NS_PER_DAY,
        }
    }

    fn rules(keep_versions: u32, keep_days: u32) -> RetentionConfig {
        RetentionConfig {
            keep_versions,
            keep_days,
        }
    }

    #[test]
    fn keeps_the_newest_the_last_n_and_the_young() {
        let versions: Vec<Version> = (1..=6).map(|n| v(10, n, &format!("c{n}"), 100 - n)).collect();
        let p = plan(&versions, &|_| true, &[], &rules(2, 96), 1000 * NS_PER_DAY);
        // 6 and 5 are the last two; 4 (96 days old) is not young; 5 and 6 are.
        let collected: Vec<i64> = p.versions.iter().map(|x| x.1).collect();
        assert_eq!(collected, vec![4, 3, 2, 1]);
        let p = plan(&versions, &|_| true, &[], &rules(0, 0), 1000 * NS_PER_DAY);
        assert!(!p.versions.iter().any(|x| x.1 == 6), "the newest is always kept");
    }

    #[test]
    fn a_capability_still_used_by_a_retained_version_is_never_collected() {
        // Version 3 is a restore of version 1: same capability.
        let versions = vec![v(1, 1, "shared", 90), v(1, 2, "old", 80), v(1, 3, "shared", 1)];
        let p = plan(&versions, &|_| true, &[], &rules(1, 30), 1000 * NS_PER_DAY);
        assert_eq!(p.caps, vec!["old".to_string()]);
        assert!(p.versions.iter().all(|x| x.2 != "shared"));
    }

    #[test]
    fn deleted_files_keep_only_young_versions() {
        let versions = vec![v(7, 1, "a", 40), v(7, 2, "b", 5)];
        let p = plan(&versions, &|_| false, &[], &rules(10, 30), 1000 * NS_PER_DAY);
        assert_eq!(p.caps, vec!["a".to_string()]);
    }

    #[test]
    fn recent_namespaces_are_kept() {
        let ns: Vec<PublishedNamespace> = (1..=6)
            .rev()
            .map(|seq| PublishedNamespace {
                seq,
                cap: format!("ns{seq}"),
                created_ns: 0,
            })
            .collect();
        let p = plan(&[], &|_| true, &ns, &rules(10, 30), 1000 * NS_PER_DAY);
        let seqs: Vec<u64> = p.namespaces.iter().map(|x| x.0).collect();
        assert_eq!(seqs, vec![3, 2, 1]);
    }
}
