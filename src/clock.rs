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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn jitter_adds_at_most_a_quarter() {
        for ms in [1, 4, 100, 2_000] {
            let d = Duration::from_millis(ms);
            let j = super::jitter(d);
            assert!(j >= d && j <= d + d / 4 + Duration::from_millis(1), "{ms}: {j:?}");
        }
    }
}
