//! FILETIME (100 ns ticks since 1601-01-01 UTC) to and from SystemTime.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 1970-01-01 as a FILETIME.
const UNIX_EPOCH_FILETIME: u64 = 116_444_736_000_000_000;
const TICKS_PER_SEC: u64 = 10_000_000;

/// A time as a FILETIME; times before 1601 become 0.
pub fn to_filetime(t: SystemTime) -> u64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => UNIX_EPOCH_FILETIME.saturating_add(ticks(after)),
        Err(before) => UNIX_EPOCH_FILETIME.saturating_sub(ticks(before.duration())),
    }
}

fn ticks(d: Duration) -> u64 {
    d.as_secs().saturating_mul(TICKS_PER_SEC) + u64::from(d.subsec_nanos()) / 100
}

/// A FILETIME as a SystemTime.
pub fn from_filetime(ft: u64) -> SystemTime {
    let since_or_before = |t: u64| Duration::new(t / TICKS_PER_SEC, ((t % TICKS_PER_SEC) * 100) as u32);
    if ft >= UNIX_EPOCH_FILETIME {
        UNIX_EPOCH + since_or_before(ft - UNIX_EPOCH_FILETIME)
    } else {
        UNIX_EPOCH - since_or_before(UNIX_EPOCH_FILETIME - ft)
    }
}

/// In SetBasicInfo, 0 means "leave this time as it is".
pub fn requested(ft: u64) -> Option<SystemTime> {
    (ft != 0).then(|| from_filetime(ft))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_epoch_is_the_known_filetime() {
        assert_eq!(to_filetime(UNIX_EPOCH), 116_444_736_000_000_000);
        assert_eq!(from_filetime(116_444_736_000_000_000), UNIX_EPOCH);
    }

    #[test]
    fn round_trips_at_100ns() {
        for ns in [0u64, 100, 1_234_567_800, 1_700_000_000_123_456_700] {
            let t = UNIX_EPOCH + Duration::from_nanos(ns);
            assert_eq!(from_filetime(to_filetime(t)), t);
        }
        // Finer than 100 ns is truncated, as NTFS does.
        let t = UNIX_EPOCH + Duration::from_nanos(1_000_000_099);
        assert_eq!(
            from_filetime(to_filetime(t)),
            UNIX_EPOCH + Duration::from_nanos(1_000_000_000)
        );
    }

    #[test]
    fn before_1970_and_before_1601() {
        let t = UNIX_EPOCH - Duration::from_secs(86_400);
        assert_eq!(to_filetime(t), 116_444_736_000_000_000 - 864_000_000_000);
        assert_eq!(from_filetime(to_filetime(t)), t);
        // Only Unix can hold a time before 1601 (Windows' SystemTime cannot,
        // as the run under wine showed).
        #[cfg(unix)]
        assert_eq!(to_filetime(UNIX_EPOCH - Duration::from_secs(400 * 365 * 86_400)), 0);
    }

    #[test]
    fn zero_means_unchanged() {
        assert_eq!(requested(0), None);
        assert_eq!(requested(116_444_736_000_000_000), Some(UNIX_EPOCH));
    }
}
