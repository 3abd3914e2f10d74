//! The write-back rules: which queued version uploads next, whole or in a
//! pack, and when. Pure: the core's upload loop gives it the queue as it
//! stands and applies what it decides.

use std::time::{Duration, Instant};

use super::pack;
use crate::catalog::Ino;

/// A pack that is not full waits this long for more small files (a tree
/// being extracted) after its oldest member became ready, while more are on
/// their way and no `cairn sync` waits.
pub const PACK_LINGER: Duration = Duration::from_secs(1);

/// A sealed version waiting in the queue, as the rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    pub ino: Ino,
    pub num: i64,
    pub size: u64,
    pub sealed_at: Instant,
    /// After a failed attempt: not before then.
    pub retry_at: Option<Instant>,
    /// `cairn sync` asked for it: skip the write-back delay.
    pub flush: bool,
    pub uploading: bool,
}

/// When a file's newest queued version may upload: once the file has been
/// quiet for the write-back delay (a file saved again and again uploads
/// once), or once its oldest queued version has waited five delays (so a
/// file saved continuously still reaches the grid), and never while another
/// version of it is uploading. `versions` are one file's, oldest first.
/// `None`: not now.
pub fn ready_at(versions: &[Queued], delay: Duration, now: Instant) -> Option<Instant> {
    if versions.iter().any(|v| v.uploading) {
        return None;
    }
    let (oldest, newest) = (versions.first()?, versions.last()?);
    let mut at = (newest.sealed_at + delay).min(oldest.sealed_at + delay * 5);
    if versions.iter().any(|v| v.flush) {
        at = at.min(now);
    }
    Some(newest.retry_at.map_or(at, |r| r.max(at)))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// A version too big to pack: (ino, num).
    Whole(Ino, i64),
    /// Ready small versions, one pack.
    Pack(Vec<(Ino, i64)>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What to start now, if anything.
    pub job: Option<Job>,
    /// Otherwise, when to ask again (`None`: when woken).
    pub ask_at: Option<Instant>,
    /// Older versions of ready files: superseded before their upload
    /// started, never to be uploaded.
    pub superseded: Vec<(Ino, i64)>,
}

/// The next upload from `queue` (every queued version, ordered by file and
/// version number): a version too big to pack, or a pack of ready small
/// versions. A pack that is not full lingers up to [`PACK_LINGER`] for more
/// while more versions are on their way and no `cairn sync` waits.
pub fn next(queue: &[Queued], delay: Duration, now: Instant) -> Decision {
    let mut superseded = Vec::new();
    let (mut pack, mut pack_bytes) = (Vec::new(), 0);
    let (mut next_ready, mut oldest_member, mut flush) = (None::<Instant>, now, false);
    for file in queue.chunk_by(|a, b| a.ino == b.ino) {
        let ready_since = match ready_at(file, delay, now) {
            None => continue,
            Some(t) if t > now => {
                next_ready = Some(next_ready.map_or(t, |n| n.min(t)));
                continue;
            }
            Some(t) => t,
        };
        let (newest, older) = file.split_last().expect("a file in the queue has a version");
        superseded.extend(older.iter().map(|v| (v.ino, v.num)));
        let small = newest.size <= pack::MEMBER_MAX;
        if !small && !pack.is_empty() {
            continue; // next time, after this pack
        }
        if !small {
            return Decision {
                job: Some(Job::Whole(newest.ino, newest.num)),
                ask_at: None,
                superseded,
            };
        }
        pack_bytes += newest.size;
        flush |= newest.flush;
        oldest_member = oldest_member.min(ready_since);
        pack.push((newest.ino, newest.num));
        if pack_bytes >= pack::TARGET_BYTES || pack.len() >= pack::MAX_MEMBERS {
            flush = true; // full
            break;
        }
    }
    let linger_until = oldest_member + PACK_LINGER;
    let (job, ask_at) = if pack.is_empty() {
        (None, next_ready)
    } else if flush || next_ready.is_none() || linger_until <= now {
        (Some(Job::Pack(pack)), None)
    } else {
        (None, Some(next_ready.map_or(linger_until, |t| t.min(linger_until))))
    };
    Decision {
        job,
        ask_at,
        superseded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_secs(10);

    fn v(ino: Ino, num: i64, size: u64, sealed_at: Instant) -> Queued {
        Queued {
            ino,
            num,
            size,
            sealed_at,
            retry_at: None,
            flush: false,
            uploading: false,
        }
    }

    #[test]
    fn a_file_uploads_once_quiet_for_the_delay_or_after_five_delays_of_saves() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(ready_at(&[v(1, 1, 10, t0)], DELAY, t0), Some(t0 + DELAY));
        // Saved every 9 s: the newest never gets 10 quiet seconds.
        let saves: Vec<Queued> = (0..6).map(|i| v(1, i, 10, t0 + s(9 * i as u64))).collect();
        assert_eq!(ready_at(&saves, DELAY, t0), Some(t0 + DELAY * 5));
        let mut flushed = saves.clone();
        flushed[2].flush = true;
        assert_eq!(ready_at(&flushed, DELAY, t0 + s(1)), Some(t0 + s(1)));
        let mut retrying = vec![v(1, 1, 10, t0)];
        retrying[0].retry_at = Some(t0 + s(60));
        assert_eq!(ready_at(&retrying, DELAY, t0), Some(t0 + s(60)));
        let mut busy = saves;
        busy[0].uploading = true;
        assert_eq!(ready_at(&busy, DELAY, t0 + s(3600)), None);
    }

    #[test]
    fn a_big_ready_version_goes_whole_and_supersedes_the_older_ones() {
        let t0 = Instant::now();
        let big = pack::MEMBER_MAX + 1;
        let queue = [v(1, 1, big, t0), v(1, 2, big, t0)];
        let d = next(&queue, DELAY, t0 + DELAY);
        assert_eq!(d.job, Some(Job::Whole(1, 2)));
        assert_eq!(d.superseded, vec![(1, 1)]);
        assert_eq!(
            next(&queue, DELAY, t0).ask_at,
            Some(t0 + DELAY),
            "not yet: asked again then"
        );
    }

    #[test]
    fn small_versions_pack_and_a_pack_lingers_while_more_are_coming() {
        let t0 = Instant::now();
        let queue = [
            v(1, 1, 10, t0),
            v(2, 1, 10, t0),
            v(3, 1, 10, t0 + Duration::from_secs(5)),
        ];
        // Two ready, a third on its way: the pack waits (at most PACK_LINGER).
        let d = next(&queue, DELAY, t0 + DELAY);
        assert_eq!(d.job, None);
        assert_eq!(d.ask_at, Some(t0 + DELAY + PACK_LINGER));
        let d = next(&queue, DELAY, t0 + DELAY + PACK_LINGER);
        assert_eq!(d.job, Some(Job::Pack(vec![(1, 1), (2, 1)])));
        // Nothing else coming: no waiting.
        assert_eq!(
            next(&queue[..2], DELAY, t0 + DELAY).job,
            Some(Job::Pack(vec![(1, 1), (2, 1)]))
        );
    }

    #[test]
    fn a_big_version_waits_for_the_pack_being_built() {
        let t0 = Instant::now();
        let queue = [v(1, 1, 10, t0), v(2, 1, pack::MEMBER_MAX + 1, t0)];
        let d = next(&queue, DELAY, t0 + DELAY);
        assert_eq!(d.job, Some(Job::Pack(vec![(1, 1)])));
    }
}
