//! The clock verdicts are judged against: microseconds since 2000-01-01 UTC, what Postgres'
//! `GetCurrentTimestamp()` returns, from the same clock (CLOCK_REALTIME). Read here rather than
//! through Postgres so the hot path makes no guarded call for it, and so the rules that take a
//! time (`verdict`, the queue's writer deadline) can be given one in tests.

/// Microseconds since the Postgres epoch, as in `TimestampTz`.
pub type Micros = i64;

const UNIX_TO_POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;

/// Seconds since the Unix epoch (a JWT's NumericDate) as `Micros`.
pub fn from_unix_s(s: i64) -> Micros {
    s.saturating_mul(1_000_000).saturating_sub(UNIX_TO_POSTGRES_EPOCH_US)
}

/// `Micros` as whole seconds since the Unix epoch (rounded down).
pub fn to_unix_s(t: Micros) -> i64 {
    t.saturating_add(UNIX_TO_POSTGRES_EPOCH_US).div_euclid(1_000_000)
}

/// Now, as a `TimestampTz` would hold it.
pub fn now() -> Micros {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX) - UNIX_TO_POSTGRES_EPOCH_US,
        Err(_) => i64::MIN, // a clock before 1970: every deadline is in the future
    }
}

/// `t` in UTC as ISO 8601 to the second, e.g. "2027-01-01T00:00:00Z" (for messages).
pub fn iso_utc(t: Micros) -> String {
    let s = to_unix_s(t);
    let (days, secs) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
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

    #[test]
    fn unix_seconds_round_trip() {
        assert_eq!(from_unix_s(946_684_800), 0, "2000-01-01 in Unix seconds");
        assert_eq!(to_unix_s(from_unix_s(1_800_000_000)), 1_800_000_000);
        assert_eq!(to_unix_s(-1), 946_684_799);
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso_utc(0), "2000-01-01T00:00:00Z");
        assert_eq!(iso_utc(from_unix_s(1_798_761_600)), "2027-01-01T00:00:00Z");
        assert_eq!(iso_utc(from_unix_s(951_782_400 + 3_661)), "2000-02-29T01:01:01Z");
        assert_eq!(iso_utc(from_unix_s(0)), "1970-01-01T00:00:00Z");
    }
}
