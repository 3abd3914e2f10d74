//! Retention and garbage collection: which committed versions stay, and
//! deleting the shares of the rest. A share is deleted only when no
//! retained version (of any file; `restore` reuses capabilities) and no
//! retained namespace snapshot names its capability.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use crate::catalog::{Catalog, CatalogError, Ino, PublishedNamespace, Version};
use crate::codec::FileCap;
use crate::config::RetentionConfig;
use crate::grid::{Grid, ServerError};

/// Namespace snapshots kept besides those younger than `keep_days`.
pub const NAMESPACES_KEPT: usize = 3;

const NS_PER_SEC: i64 = 1_000_000_000;
const NS_PER_HOUR: i64 = 3_600 * NS_PER_SEC;
const NS_PER_DAY: i64 = 24 * NS_PER_HOUR;

#[derive(Debug, Default, Serialize)]
pub struct Plan {
    /// (ino, version number, the encoded versions of it that go: its own
    /// or its pack, or those of a mapped version's objects no retained
    /// version uses) of versions to collect.
    pub versions: Vec<(Ino, i64, Vec<String>)>,
    /// (sequence number, capability) of namespace snapshots to collect.
    pub namespaces: Vec<(u64, String)>,
    /// Distinct capabilities whose shares go.
    pub caps: Vec<String>,
    pub bytes: u64,
    /// Retained versions whose manifest could not be read: while there
    /// are any, nothing is collected (what they share is not known).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<String>,
}

/// Each mapped version's objects (by its capability): every encoded
/// version its bytes lie in, with its size, read from its manifest.
pub type MappedObjects = HashMap<String, Vec<(String, u64)>>;

/// What `rules` retain of `versions` (committed ones) and `namespaces`.
/// Pure: `live` says whether a file still has a name; `mapped` gives the
/// objects of mapped versions (one missing: its manifest was not read).
/// An object goes only when no retained version lies in it, so a
/// segment shared by versions stays while any of them is retained; and
/// nothing goes while a retained version's objects are unknown.
pub fn plan(
    versions: &[Version],
    live: &dyn Fn(Ino) -> bool,
    namespaces: &[PublishedNamespace],
    rules: &RetentionConfig,
    now_ns: i64,
    mapped: &MappedObjects,
    pinned: &HashSet<(Ino, i64)>,
) -> Plan {
    let days = rules.keep_days as i64 * NS_PER_DAY;
    let young = |created_ns: i64| now_ns - created_ns < days;
    let every = (rules.keep_all_minutes as i64 * 60 * NS_PER_SEC).min(days);
    let hourly = (rules.keep_hourly_hours as i64 * NS_PER_HOUR).min(days);
    let mut by_file: BTreeMap<Ino, Vec<&Version>> = BTreeMap::new();
    for v in versions.iter().filter(|v| v.cap.is_some()) {
        by_file.entry(v.ino).or_default().push(v);
    }
    let mut out = Plan::default();
    let mut retained: HashSet<String> = HashSet::new();
    let mut candidates = Vec::new();
    for (ino, mut vs) in by_file {
        vs.sort_by_key(|v| std::cmp::Reverse(v.num));
        let alive = live(ino);
        // Newest first: the first version seen in an hour or a day is the
        // one of it that stays.
        let mut buckets: HashSet<(bool, i64)> = HashSet::new();
        for (i, v) in vs.into_iter().enumerate() {
            let age = now_ns - v.created_ns;
            let by_time = if age < every {
                true
            } else if age < hourly {
                buckets.insert((false, v.created_ns.div_euclid(NS_PER_HOUR)))
            } else if young(v.created_ns) {
                buckets.insert((true, v.created_ns.div_euclid(NS_PER_DAY)))
            } else {
                false
            };
            let keep =
                by_time || (alive && (i == 0 || i < rules.keep_versions as usize)) || pinned.contains(&(v.ino, v.num));
            match (keep, objects_of(v, mapped)) {
                (true, Some(objects)) => retained.extend(objects.into_iter().map(|(o, _)| o)),
                (true, None) => out.blocked.push(format!("file {} version {}", v.ino, v.num)),
                (false, objects) => candidates.push((v, objects)),
            }
        }
    }
    // A version whose own object a retained one uses cannot go: it stays
    // whole, with every object it uses (which may hold more), so that
    // every object left is some committed version's own, which repair
    // walks, and every committed version stays readable.
    let mut pending = candidates;
    loop {
        let before = pending.len();
        let mut rest = Vec::new();
        for (v, objects) in pending {
            if !retained.contains(&own_object(v)) {
                rest.push((v, objects));
                continue;
            }
            match objects {
                Some(objects) => retained.extend(objects.into_iter().map(|(o, _)| o)),
                None => out.blocked.push(format!("file {} version {}", v.ino, v.num)),
            }
        }
        pending = rest;
        if pending.len() == before {
            break;
        }
    }
    if !out.blocked.is_empty() {
        return out;
    }
    let mut caps: HashSet<String> = HashSet::new();
    for (v, objects) in pending {
        // Its own object goes; what else it used is other versions' own,
        // and goes (or stays) with them.
        let objects = objects.unwrap_or_else(|| vec![(own_object(v), v.size)]);
        let going: Vec<String> = objects
            .into_iter()
            .filter(|(object, _)| !retained.contains(object))
            .map(|(object, size)| {
                if caps.insert(object.clone()) {
                    out.bytes += size;
                }
                object
            })
            .collect();
        out.versions.push((v.ino, v.num, going));
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

/// The encoded version a file version's capability names: its own, its
/// pack, or a mapped version's own object.
fn own_object(v: &Version) -> String {
    let cap = v.cap.as_deref().expect("committed");
    cap.parse::<FileCap>()
        .map(|c| c.stored().to_string())
        .unwrap_or_else(|_| cap.to_owned())
}

/// The encoded versions holding a file version's bytes (its own or its
/// pack, or a mapped version's objects, its own first), with their sizes;
/// `None` for a mapped version not in `mapped`.
fn objects_of(v: &Version, mapped: &MappedObjects) -> Option<Vec<(String, u64)>> {
    let cap = v.cap.as_deref().expect("committed");
    match cap.parse::<FileCap>() {
        Ok(FileCap::Mapped { .. }) => mapped.get(cap).cloned(),
        Ok(parsed) => Some(vec![(parsed.stored().to_string(), parsed.stored().layout.size)]),
        Err(_) => Some(vec![(cap.to_owned(), v.size)]),
    }
}

/// Reads the manifest of every mapped version among `versions`; one that
/// cannot be read now is left out (see [`plan`]).
pub async fn mapped_objects(grid: &Arc<Grid>, versions: &[Version]) -> MappedObjects {
    let mut out = MappedObjects::new();
    for cap in versions.iter().filter_map(|v| v.cap.as_deref()) {
        let Ok(parsed @ FileCap::Mapped { .. }) = cap.parse::<FileCap>() else {
            continue;
        };
        if out.contains_key(cap) {
            continue;
        }
        match crate::download::FileReader::open(grid.clone(), parsed).await {
            Ok(reader) => {
                let objects = reader
                    .objects()
                    .iter()
                    .map(|c| (c.to_string(), c.layout.size))
                    .collect();
                out.insert(cap.to_owned(), objects);
            }
            Err(e) => tracing::warn!(error = %e, "a mapped version's manifest is not readable now"),
        }
    }
    out
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
    grid: &Arc<Grid>,
    catalog: &Catalog,
    rules: &RetentionConfig,
    pinned: &HashSet<(Ino, i64)>,
    dry_run: bool,
) -> Result<Report, CatalogError> {
    let versions = catalog.committed_versions()?;
    let mapped = mapped_objects(grid, &versions).await;
    let live = |ino| catalog.is_live(ino).unwrap_or(true);
    let plan = plan(
        &versions,
        &live,
        &catalog.namespaces()?,
        rules,
        crate::catalog::now_ns(),
        &mapped,
        pinned,
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
        for (ino, num, caps) in &plan.versions {
            if caps.iter().all(|cap| done.contains(cap)) {
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

    /// `plan` of live (or deleted) files' `versions` on day 1000.
    fn planned(versions: &[Version], alive: bool, rules: &RetentionConfig, mapped: &MappedObjects) -> Plan {
        plan(
            versions,
            &|_| alive,
            &[],
            rules,
            1000 * NS_PER_DAY,
            mapped,
            &HashSet::new(),
        )
    }

    fn rules(keep_versions: u32, keep_days: u32) -> RetentionConfig {
        RetentionConfig {
            keep_versions,
            keep_days,
            ..Default::default()
        }
    }

    #[test]
    fn versions_thin_to_every_one_for_an_hour_then_hourly_for_a_day_then_daily() {
        // A file saved every minute for three days.
        let now = 1000 * NS_PER_DAY + 17 * NS_PER_SEC;
        let minute = 60 * NS_PER_SEC;
        let versions: Vec<Version> = (0..3 * 1440)
            .map(|i| Version {
                created_ns: now - (3 * 1440 - i) * minute,
                ..v(1, i + 1, &format!("c{i}"), 0)
            })
            .collect();
        let plan_at =
            |rules: RetentionConfig| plan(&versions, &|_| true, &[], &rules, now, &HashMap::new(), &HashSet::new());
        let p = plan_at(rules(10, 30));
        let kept = versions.len() - p.versions.len();
        // 60 of the last hour, one for each of the 23 hours before (the
        // hour the last 60 minutes began in counts once), one for each
        // older day (the newest of each day's not already kept).
        assert!((60 + 23..=60 + 24 + 3).contains(&kept), "{kept}");
        let gone: HashSet<i64> = p.versions.iter().map(|x| x.1).collect();
        let alive = |age_min: i64| !gone.contains(&(3 * 1440 - age_min + 1));
        assert!((1..=60).all(alive), "the last hour is whole");
        // Within the day, the newest of each hour stays, the rest go.
        let hour_of = |age_min: i64| (now - age_min * minute).div_euclid(NS_PER_HOUR);
        for h in 2..24 {
            let in_hour: Vec<i64> = (61..1440).filter(|&a| hour_of(a) == hour_of(h * 60 + 30)).collect();
            assert_eq!(in_hour.iter().filter(|&&a| alive(a)).count(), 1, "hour {h}");
            assert!(alive(*in_hour.iter().min().unwrap()), "the newest of hour {h}");
        }
        // With keep_days = 0 nothing is kept by age: only the newest 10.
        let p = plan_at(rules(10, 0));
        assert_eq!(versions.len() - p.versions.len(), 10);
    }

    #[test]
    fn keeps_the_newest_the_last_n_and_the_young() {
        let versions: Vec<Version> = (1..=6).map(|n| v(10, n, &format!("c{n}"), 100 - n)).collect();
        let p = planned(&versions, true, &rules(2, 96), &HashMap::new());
        // 6 and 5 are the last two; 4 (96 days old) is not young; 5 and 6 are.
        let collected: Vec<i64> = p.versions.iter().map(|x| x.1).collect();
        assert_eq!(collected, vec![4, 3, 2, 1]);
        let p = planned(&versions, true, &rules(0, 0), &HashMap::new());
        assert!(!p.versions.iter().any(|x| x.1 == 6), "the newest is always kept");
    }

    #[test]
    fn a_capability_still_used_by_a_retained_version_is_never_collected() {
        // Version 3 is a restore of version 1: same capability.
        let versions = vec![v(1, 1, "shared", 90), v(1, 2, "old", 80), v(1, 3, "shared", 1)];
        let p = planned(&versions, true, &rules(1, 30), &HashMap::new());
        assert_eq!(p.caps, vec!["old".to_string()]);
        assert!(p.versions.iter().all(|x| x.2 != ["shared"]));
    }

    #[test]
    fn deleted_files_keep_only_young_versions() {
        let versions = vec![v(7, 1, "a", 40), v(7, 2, "b", 5)];
        let p = planned(&versions, false, &rules(10, 30), &HashMap::new());
        assert_eq!(p.caps, vec!["a".to_string()]);
    }

    #[test]
    fn a_segment_object_goes_only_when_no_retained_version_lies_in_it() {
        let cap = |seed: u8| {
            let params = crate::codec::Params::new(1, 1, 16).unwrap();
            crate::codec::encode_all(params, [seed; 16], &[seed; 40]).0
        };
        let mapped_cap = |seed: u8| {
            FileCap::Mapped {
                size: 40,
                manifest_at: 1,
                own: cap(seed),
            }
            .to_string()
        };
        let (m1, m2, m3) = (mapped_cap(1), mapped_cap(2), mapped_cap(3));
        let obj = |seed: u8| (cap(seed).to_string(), 40);
        // 2 takes segments from 1's object, 3 from 1's and 2's.
        let mapped: MappedObjects = [
            (m1.clone(), vec![obj(1)]),
            (m2.clone(), vec![obj(2), obj(1)]),
            (m3.clone(), vec![obj(3), obj(1), obj(2)]),
        ]
        .into();
        let versions = vec![v(1, 1, &m1, 90), v(1, 2, &m2, 80), v(1, 3, &m3, 1)];
        let p = planned(&versions, true, &rules(1, 30), &mapped);
        assert!(p.caps.is_empty() && p.versions.is_empty(), "{p:?}");
        // The file deleted long ago: every object goes.
        let old = vec![v(1, 1, &m1, 90), v(1, 2, &m2, 80), v(1, 3, &m3, 70)];
        let p = planned(&old, false, &rules(1, 30), &mapped);
        assert_eq!(p.caps.len(), 3);
        assert_eq!(p.bytes, 120);
        // A retained version whose manifest was not read blocks it all.
        let mut unknown = mapped.clone();
        unknown.remove(&m3);
        let p = planned(&versions, true, &rules(0, 0), &unknown);
        assert!(p.caps.is_empty() && !p.blocked.is_empty(), "{p:?}");
        // ... while one that goes anyway goes with its own object.
        let mut unknown = mapped.clone();
        unknown.remove(&m1);
        let p = planned(&old, false, &rules(1, 30), &unknown);
        assert_eq!(p.caps.len(), 3, "{p:?}");
        assert_eq!(p.versions.len(), 3);
        // A version whose own object a kept one uses stays whole, with
        // what it takes from others: 3 is kept; 2 (whose object 3 uses)
        // stays, and so does 1 (which 2 uses) ...
        let p = planned(&versions, true, &rules(0, 0), &mapped);
        assert!(p.caps.is_empty() && p.versions.is_empty(), "{p:?}");
        // ... but not when 2 takes nothing from 1.
        let apart: MappedObjects = [
            (m1.clone(), vec![obj(1)]),
            (m2.clone(), vec![obj(2)]),
            (m3.clone(), vec![obj(3), obj(2)]),
        ]
        .into();
        let p = planned(&versions, true, &rules(0, 0), &apart);
        assert_eq!(p.caps, vec![obj(1).0], "{p:?}");
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
        let p = plan(
            &[],
            &|_| true,
            &ns,
            &rules(10, 30),
            1000 * NS_PER_DAY,
            &HashMap::new(),
            &HashSet::new(),
        );
        let seqs: Vec<u64> = p.namespaces.iter().map(|x| x.0).collect();
        assert_eq!(seqs, vec![3, 2, 1]);
    }
}
