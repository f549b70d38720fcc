//! Rate limits: at most `requests` accepted validations of a token per window (for example 100
//! per second and 10,000 per hour), counted across every backend of the server in one table in
//! shared memory (the edge holds it under a lock; this module is the arithmetic and the table).
//!
//! Fixed windows, counted exactly: in any window no more than `requests` are admitted, which is
//! what the RateLimit headers (limit, remaining, seconds to reset) describe. Each token's
//! windows are offset by a phase drawn from its id, so that not every token resets at the top
//! of the second or the hour. A refused request is not counted. With several limits, a request
//! is admitted only when every limit has room, and then counted in all of them.
//!
//! The table is bounded (`N` entries, probing at most `PROBE` of them); an entry whose window has
//! ended is free. When no entry is free for a token, the request is admitted untracked and the
//! caller counts it (`Admission::untracked`): the table is sized so that this means more tokens
//! with limits are in use within one window than it holds, an operator's matter, not a reason to
//! refuse good traffic. Pure: no Postgres, no clock (the time is passed in).

/// Limits per token or key type, at most.
pub const MAX_RATE_LIMITS: usize = 4;
/// The shortest and longest window, in microseconds: one second, thirty days.
pub const MIN_WINDOW_US: i64 = 1_000_000;
pub const MAX_WINDOW_US: i64 = 30 * 86_400 * 1_000_000;
/// Entries looked at from a key's home position.
pub const PROBE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub window_us: i64,
}

impl RateLimit {
    /// A limit from SQL: requests >= 1, a window of whole milliseconds from one second to
    /// thirty days.
    pub fn new(requests: i64, window_us: i64) -> Result<RateLimit, String> {
        let requests = u32::try_from(requests)
            .ok()
            .filter(|r| *r >= 1)
            .ok_or_else(|| format!("a rate limit allows 1 to {} requests per window", u32::MAX))?;
        if !(MIN_WINDOW_US..=MAX_WINDOW_US).contains(&window_us) || window_us % 1000 != 0 {
            return Err("a rate limit's window is whole milliseconds from 1 second to 30 days".into());
        }
        Ok(RateLimit { requests, window_us })
    }
}

impl RateLimit {
    /// A limit as a row holds it, however it got there (an UPDATE by hand can bypass the SQL
    /// functions' checks): the window clamped into range, a non-positive count allowing nothing.
    pub fn from_stored(requests: i64, window_us: i64) -> RateLimit {
        RateLimit {
            requests: u32::try_from(requests.max(0)).unwrap_or(u32::MAX),
            window_us: window_us.clamp(MIN_WINDOW_US, MAX_WINDOW_US),
        }
    }
}

/// A list of limits from SQL: at most `MAX_RATE_LIMITS`, one per window length.
pub fn check_list(limits: &[RateLimit]) -> Result<(), String> {
    if limits.len() > MAX_RATE_LIMITS {
        return Err(format!("at most {MAX_RATE_LIMITS} rate limits"));
    }
    for (i, l) in limits.iter().enumerate() {
        if limits[..i].iter().any(|o| o.window_us == l.window_us) {
            return Err("two rate limits with the same window".into());
        }
    }
    Ok(())
}

/// What a validation learns about its limits: whether it was admitted, and the limit that
/// binds (the one with the least room left; when refused, the one that is full and resets
/// last), for the caller's RateLimit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub admitted: bool,
    pub limit: u32,
    pub remaining: u32,
    /// When the binding window ends, in microseconds since the epoch.
    pub reset_at: i64,
    /// No table entry was free: admitted without counting.
    pub untracked: bool,
}

/// One window of one token's limit.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Entry {
    token_id: [u8; 16],
    window_us: i64,
    /// Start of the window being counted; the entry is free once `start + window_us <= now`
    /// (and when all-zero).
    start: i64,
    count: u32,
}

impl Entry {
    fn live(&self, now: i64) -> bool {
        self.window_us > 0 && self.start.saturating_add(self.window_us) > now
    }
}

/// The start of the window containing `now`, for a token whose windows are offset by `phase`.
pub fn window_start(now: i64, window_us: i64, phase: i64) -> i64 {
    let shifted = now.saturating_sub(phase);
    now.saturating_sub(shifted.rem_euclid(window_us))
}

/// A token's phase within a window: from its id, so every backend computes the same.
fn phase(token_id: &[u8; 16], window_us: i64) -> i64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&token_id[8..]);
    (u64::from_le_bytes(x) % (window_us as u64)) as i64
}

fn home(token_id: &[u8; 16], window_us: i64, n: usize) -> usize {
    let mut x = [0u8; 8];
    x.copy_from_slice(&token_id[..8]);
    let h = u64::from_le_bytes(x) ^ (window_us as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h.wrapping_mul(0xff51_afd7_ed55_8ccd) >> 17) as usize % n
}

/// `N` entries. All-zero is an empty table.
#[repr(C)]
pub struct Table<const N: usize> {
    entries: [Entry; N],
    /// Requests admitted without an entry (the table had no room).
    pub untracked: u64,
}

impl<const N: usize> Table<N> {
    /// The entry counting `token_id`'s `window_us` limit: the live one, or a free one claimed
    /// for the window containing `now`. None when all `PROBE` candidates are live for others.
    fn slot(&mut self, token_id: &[u8; 16], window_us: i64, now: i64) -> Option<usize> {
        let h = home(token_id, window_us, N);
        let mut free = None;
        for k in 0..PROBE.min(N) {
            let i = (h + k) % N;
            let e = &self.entries[i];
            if e.window_us == window_us && e.token_id == *token_id {
                if !e.live(now) {
                    self.entries[i].start = window_start(now, window_us, phase(token_id, window_us));
                    self.entries[i].count = 0;
                }
                return Some(i);
            }
            if free.is_none() && !e.live(now) {
                free = Some(i);
            }
        }
        let i = free?;
        self.entries[i] =
            Entry { token_id: *token_id, window_us, start: window_start(now, window_us, phase(token_id, window_us)), count: 0 };
        Some(i)
    }

    /// Admits one request of `token_id` under `limits` at `now`, or refuses it.
    pub fn admit(&mut self, token_id: &[u8; 16], limits: &[RateLimit], now: i64) -> Admission {
        let mut slots = [0usize; MAX_RATE_LIMITS];
        let limits = &limits[..limits.len().min(MAX_RATE_LIMITS)];
        for (k, l) in limits.iter().enumerate() {
            match self.slot(token_id, l.window_us, now) {
                Some(i) => slots[k] = i,
                None => {
                    self.untracked += 1;
                    let first = limits.first().map_or(0, |l| l.requests);
                    return Admission { admitted: true, limit: first, remaining: first, reset_at: now, untracked: true };
                }
            }
        }
        let admitted = limits.iter().zip(&slots).all(|(l, &i)| self.entries[i].count < l.requests);
        if admitted {
            for &i in &slots[..limits.len()] {
                self.entries[i].count += 1;
            }
        }
        // The binding limit: when admitted, the least room left (earliest reset on a tie);
        // when refused, among the full ones the one that resets last (the retry time).
        let mut best: Option<Admission> = None;
        for (l, &i) in limits.iter().zip(&slots) {
            let e = &self.entries[i];
            let a = Admission {
                admitted,
                limit: l.requests,
                remaining: l.requests.saturating_sub(e.count),
                reset_at: e.start.saturating_add(e.window_us),
                untracked: false,
            };
            let better = match best {
                None => true,
                Some(b) if admitted => a.remaining < b.remaining || (a.remaining == b.remaining && a.reset_at < b.reset_at),
                Some(b) => (a.remaining == 0 && b.remaining > 0) || (a.remaining == 0 && a.reset_at > b.reset_at),
            };
            if better {
                best = Some(a);
            }
        }
        best.unwrap_or(Admission { admitted: true, limit: 0, remaining: 0, reset_at: now, untracked: false })
    }

    /// Forgets a token's windows (its limits were changed).
    pub fn forget(&mut self, token_id: &[u8; 16]) {
        for e in self.entries.iter_mut().filter(|e| e.token_id == *token_id) {
            *e = Entry::default();
        }
    }

    /// Entries counting a window now.
    pub fn live(&self, now: i64) -> usize {
        self.entries.iter().filter(|e| e.live(now)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000;

    fn table<const N: usize>() -> Box<Table<N>> {
        Box::new(Table { entries: [Entry::default(); N], untracked: 0 })
    }

    fn id(n: u8) -> [u8; 16] {
        let mut a = [n; 16];
        a[15] = n.wrapping_mul(7);
        a
    }

    #[test]
    fn limits_from_sql_are_checked() {
        assert!(RateLimit::new(100, SEC).is_ok());
        assert!(RateLimit::new(0, SEC).is_err());
        assert!(RateLimit::new(1, SEC - 1).is_err());
        assert!(RateLimit::new(1, SEC + 1).is_err(), "whole milliseconds");
        assert!(RateLimit::new(1, MAX_WINDOW_US + 1000).is_err());
        let l = |r, w| RateLimit::new(r, w).expect("ok");
        assert!(check_list(&[l(100, SEC), l(10_000, 3600 * SEC)]).is_ok());
        assert!(check_list(&[l(100, SEC), l(5, SEC)]).is_err());
        assert!(check_list(&[l(1, SEC), l(1, 2 * SEC), l(1, 3 * SEC), l(1, 4 * SEC), l(1, 5 * SEC)]).is_err());
    }

    #[test]
    fn a_stored_limit_is_clamped_and_zero_admits_nothing() {
        assert_eq!(RateLimit::from_stored(-5, 10), RateLimit { requests: 0, window_us: MIN_WINDOW_US });
        let mut t = table::<16>();
        assert!(!t.admit(&id(4), &[RateLimit::from_stored(0, SEC)], 0).admitted);
    }

    #[test]
    fn a_window_admits_exactly_its_requests_then_resets() {
        let mut t = table::<64>();
        let lim = [RateLimit { requests: 3, window_us: SEC }];
        let tok = id(1);
        let start = window_start(10 * SEC, SEC, phase(&tok, SEC));
        let now = start + 10;
        let got: Vec<bool> = (0..5).map(|_| t.admit(&tok, &lim, now).admitted).collect();
        assert_eq!(got, [true, true, true, false, false]);
        let refused = t.admit(&tok, &lim, now);
        assert_eq!((refused.remaining, refused.reset_at), (0, start + SEC));
        let next = t.admit(&tok, &lim, start + SEC);
        assert!(next.admitted && next.remaining == 2, "a new window");
    }

    #[test]
    fn every_limit_must_have_room_and_only_admitted_requests_count() {
        let mut t = table::<64>();
        let lim = [RateLimit { requests: 10, window_us: SEC }, RateLimit { requests: 15, window_us: 3600 * SEC }];
        let tok = id(2);
        let mut admitted = 0;
        let mut now = 0;
        for _ in 0..100 {
            now += SEC / 20; // 20 per second for 5 seconds
            if t.admit(&tok, &lim, now).admitted {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 15, "the hourly limit binds after the per-second ones");
        let a = t.admit(&tok, &lim, now);
        assert!(!a.admitted && a.limit == 15, "the full hourly window is reported for the retry: {a:?}");
    }

    #[test]
    fn the_binding_limit_is_the_one_with_least_room() {
        let mut t = table::<64>();
        let lim = [RateLimit { requests: 100, window_us: SEC }, RateLimit { requests: 2, window_us: 60 * SEC }];
        let a = t.admit(&id(3), &lim, 5);
        assert_eq!((a.limit, a.remaining), (2, 1));
    }

    #[test]
    fn tokens_and_windows_are_counted_apart_and_phases_differ() {
        let mut t = table::<256>();
        let lim = [RateLimit { requests: 1, window_us: 3600 * SEC }];
        for n in 0..50 {
            assert!(t.admit(&id(n), &lim, SEC).admitted, "token {n}");
        }
        for n in 0..50 {
            assert!(!t.admit(&id(n), &lim, SEC + 1).admitted, "token {n} again");
        }
        assert_eq!(t.live(SEC + 1), 50);
        let starts: std::collections::HashSet<i64> =
            (0..50).map(|n| window_start(SEC, 3600 * SEC, phase(&id(n), 3600 * SEC))).collect();
        assert!(starts.len() > 40, "windows are spread over the hour");
    }

    #[test]
    fn a_full_table_admits_untracked_and_counts_it() {
        let mut t = table::<8>();
        let lim = [RateLimit { requests: 1, window_us: 60 * SEC }];
        for n in 0..8 {
            assert!(!t.admit(&id(n), &lim, 0).untracked);
        }
        let a = t.admit(&id(200), &lim, 0);
        assert!(a.admitted && a.untracked);
        assert_eq!(t.untracked, 1);
        // Once the windows end, the entries are free again.
        assert!(!t.admit(&id(200), &lim, 61 * SEC).untracked);
    }

    #[test]
    fn forget_resets_a_token() {
        let mut t = table::<16>();
        let lim = [RateLimit { requests: 1, window_us: SEC }];
        assert!(t.admit(&id(9), &lim, 0).admitted);
        assert!(!t.admit(&id(9), &lim, 1).admitted);
        t.forget(&id(9));
        assert!(t.admit(&id(9), &lim, 2).admitted);
    }
}
