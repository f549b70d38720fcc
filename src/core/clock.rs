//! The clock verdicts are judged against: microseconds since 2000-01-01 UTC, what Postgres'
//! `GetCurrentTimestamp()` returns, from the same clock (CLOCK_REALTIME). Read here rather than
//! through Postgres so the hot path makes no guarded call for it, and so the rules that take a
//! time (`verdict`, the queue's writer deadline) can be given one in tests.

/// Microseconds since the Postgres epoch, as in `TimestampTz`.
pub type Micros = i64;

const UNIX_TO_POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;

/// Now, as a `TimestampTz` would hold it.
pub fn now() -> Micros {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX) - UNIX_TO_POSTGRES_EPOCH_US,
        Err(_) => i64::MIN, // a clock before 1970: every deadline is in the future
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_2026_in_postgres_epoch_micros() {
        // 2026-01-01 is 26 years (and 7 leap days) after the Postgres epoch.
        let jan_2026 = (26 * 365 + 7) * 86_400 * 1_000_000i64;
        assert!(now() > jan_2026);
    }
}
