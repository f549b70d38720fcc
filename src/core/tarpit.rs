//! The refusal tarpit's arithmetic: how long a backend waits before answering a refusal so that
//! its refusals are held at `cap` a second (`token.max_refusal_rate`), the way Vault and Unkey
//! slow failed attempts. The edge keeps one `Tarpit` per backend, counts only refusals into it
//! (an accepted token never waits) and does the waiting; this module only says how long.
//!
//! A generic cell rate algorithm with one second of burst: a backend may refuse `cap` tokens at
//! once without waiting, and after that each refusal is spaced `1/cap` s after the one before
//! (its interval rounded up to whole microseconds, so the rate stays at or under the cap). Over
//! any span of `t` seconds a backend answers at most `cap * (t + 1) + 1` refusals. A refusal
//! whose wait was cut short (a cancel, a statement timeout) leaves its debt in place, so the
//! next refusal waits for it: cancelling does not buy refusals.
//!
//! A debt under `MIN_WAIT_US` (10 ms) is not waited at once but carried until it reaches that:
//! a backend held at 1,000 a second sleeps 100 times a second for 10 ms, not 1,000 times for
//! 1 ms, since every sleep and wake-up costs CPU (measured: held 1 ms at a time, a refusal cost
//! the flood's backend and client twice the CPU of an unheld one). So over any span the bound
//! is `cap * (t + 1) + cap / 100 + 1`.
//!
//! Time is passed in (a monotonic clock in the edge), so the rules are tested here without one.
//! A clock that went backwards (or debts piled up by waits cut short) never makes one refusal
//! wait more than `MIN_WAIT_US` and two intervals.

use crate::clock::Micros;

/// The burst a backend may refuse without waiting, as time: one second of the cap.
pub const BURST_US: Micros = 1_000_000;

/// The shortest wait a refusal is held for; a smaller debt is carried to the next refusal.
pub const MIN_WAIT_US: Micros = 10_000;

/// One backend's refusal schedule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tarpit {
    /// When the schedule of refusals made so far ends (the "theoretical arrival time").
    scheduled_until: Micros,
}

impl Tarpit {
    pub const fn new() -> Tarpit {
        Tarpit { scheduled_until: 0 }
    }

    /// Counts a refusal made at `now` under a cap of `cap` refusals per second (0: no cap) and
    /// returns how long to wait before answering it, in microseconds (0: answer at once; a
    /// debt under `MIN_WAIT_US` is carried, not waited).
    pub fn refuse(&mut self, now: Micros, cap: u32) -> Micros {
        if cap == 0 {
            return 0;
        }
        let interval = interval_us(cap);
        // A schedule that ran out is restarted from now; one implausibly far ahead (the clock
        // went backwards) is held at the most a refusal can owe.
        let start = self.scheduled_until.clamp(now, now.saturating_add(BURST_US + MIN_WAIT_US + interval));
        let until = start.saturating_add(interval);
        self.scheduled_until = until;
        let owed = until - now - BURST_US;
        if owed < MIN_WAIT_US {
            0
        } else {
            owed
        }
    }
}

/// The spacing of refusals at `cap` per second, rounded up to whole microseconds (at least 1).
pub fn interval_us(cap: u32) -> Micros {
    Micros::from(1_000_000u32.div_ceil(cap.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = 1_000_000;
    const T0: Micros = 800_000_000 * S;

    #[test]
    fn no_cap_never_waits() {
        let mut t = Tarpit::new();
        for _ in 0..100_000 {
            assert_eq!(t.refuse(T0, 0), 0);
        }
    }

    #[test]
    fn the_first_cap_refusals_in_a_burst_do_not_wait_and_the_next_one_does() {
        let mut t = Tarpit::new();
        for i in 0..50 {
            assert_eq!(t.refuse(T0, 50), 0, "refusal {i} is within the burst");
        }
        assert_eq!(t.refuse(T0, 50), interval_us(50), "the 51st waits one interval");
        assert_eq!(t.refuse(T0, 50), 2 * interval_us(50), "the 52nd, two");
    }

    #[test]
    fn a_backend_that_waits_as_told_is_held_at_the_cap() {
        for cap in [1, 3, 50, 999, 1000, 7_000, 1_000_000] {
            let mut t = Tarpit::new();
            let mut now = T0;
            let mut answered = 0i64;
            let end = T0 + 10 * S;
            while now < end {
                now += t.refuse(now, cap);
                if now < end {
                    answered += 1;
                }
                now += 13; // the refusal's own work
            }
            let bound = i64::from(cap) * 11 + i64::from(cap) / 100 + 1;
            assert!(answered <= bound, "cap {cap}: {answered} refusals in 10 s, bound {bound}");
            assert!(answered >= i64::from(cap.min(76_000)) * 10, "cap {cap}: only {answered} in 10 s");
        }
    }

    #[test]
    fn a_debt_under_the_shortest_wait_is_carried_to_a_later_refusal() {
        let mut t = Tarpit::new();
        for _ in 0..1000 {
            assert_eq!(t.refuse(T0, 1000), 0);
        }
        // 1 ms owed per refusal past the burst: nothing waited until 10 ms are owed, then all 10.
        for i in 1..10 {
            assert_eq!(t.refuse(T0, 1000), 0, "refusal {i} past the burst carries its debt");
        }
        assert_eq!(t.refuse(T0, 1000), MIN_WAIT_US);
        assert!(MIN_WAIT_US <= 10_000, "held refusals never wait long for a pooled client behind them");
    }

    #[test]
    fn a_slow_refuser_never_waits() {
        let mut t = Tarpit::new();
        let mut now = T0;
        for _ in 0..10_000 {
            assert_eq!(t.refuse(now, 100), 0);
            now += 10_000; // exactly the cap: 100 a second
        }
    }

    #[test]
    fn an_idle_second_restores_the_burst() {
        let mut t = Tarpit::new();
        for _ in 0..200 {
            t.refuse(T0, 100);
        }
        assert!(t.refuse(T0, 100) > 0);
        let later = T0 + 3 * S;
        for _ in 0..100 {
            assert_eq!(t.refuse(later, 100), 0);
        }
        assert!(t.refuse(later, 100) > 0);
    }

    #[test]
    fn a_wait_cut_short_is_still_owed() {
        let mut t = Tarpit::new();
        for _ in 0..10 {
            t.refuse(T0, 10);
        }
        let owed = t.refuse(T0, 10);
        assert_eq!(owed, interval_us(10));
        // Cancelled at once: the next refusal owes the first wait and its own interval.
        assert_eq!(t.refuse(T0 + 1, 10), owed + interval_us(10) - 1);
    }

    #[test]
    fn a_clock_going_backwards_bounds_the_wait() {
        let mut t = Tarpit::new();
        for _ in 0..1000 {
            t.refuse(T0, 10);
        }
        let wait = t.refuse(T0 - 3600 * S, 10);
        assert!(wait <= MIN_WAIT_US + 2 * interval_us(10), "{wait}");
    }

    #[test]
    fn intervals_round_up_so_the_rate_stays_under_the_cap() {
        assert_eq!(interval_us(1), S);
        assert_eq!(interval_us(3), 333_334);
        assert_eq!(interval_us(1000), 1000);
        assert_eq!(interval_us(2_000_000), 1);
        for cap in 1..5000u32 {
            assert!(S / interval_us(cap) <= i64::from(cap));
        }
    }
}
