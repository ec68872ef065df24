//! Wall-clock time and retry jitter: the only places that read the clock for delivery, state and sinks.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 for a clock set before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Up to +25% of `d`, so that many retrying callers do not hit a recovering Redis in lockstep.
pub fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0) as u64;
    d + Duration::from_millis(nanos % (d.as_millis() as u64 / 4 + 1))
}

/// A time in milliseconds since the Unix epoch as `2026-12-04 10:02:03` (UTC), for people reading history.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm, proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn utc_reads_as_a_calendar_date() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_796_379_723_000), "2026-12-04 10:22:03");
    }

    #[test]
    fn jitter_adds_at_most_a_quarter() {
        for ms in [1, 4, 100, 2_000] {
            let d = Duration::from_millis(ms);
            let j = super::jitter(d);
            assert!(j >= d && j <= d + d / 4 + Duration::from_millis(1), "{ms}: {j:?}");
        }
    }
}
