//! The refusal tarpit: a backend that refuses more than `token.max_refusal_rate` tokens a second
//! waits before answering each further refusal, so a connection flooding garbage tokens costs
//! the server that many refusals' work a second at most, and spends the rest of its time asleep
//! on its latch instead of on the CPU that legitimate connections need. The arithmetic (one
//! second of burst, then one refusal per `1/cap` s, waited in steps of at least 10 ms) is
//! `pg_token_core::tarpit`; this module keeps the backend's schedule and does the waiting.
//!
//! It must never delay an accepted token (only `validation`'s refusal path calls it), never
//! busy-wait, never wait where it cannot be interrupted, and never hold anything a wait could
//! leak: it is called after the refusal's events are queued and before the refusal is returned
//! or raised, with no LWLock or buffer pin of pg_token's held, and it is given nothing of the
//! token. The wait is `WaitLatch` with a timeout followed by `CHECK_FOR_INTERRUPTS`, so a
//! cancel, a statement timeout or a terminate ends it at once; the schedule keeps what was not
//! waited (cancelling does not buy refusals).

use std::cell::Cell;
use std::time::Instant;

use pg_token_core::clock::Micros;
use pg_token_core::tarpit::Tarpit;
use pgrx::pg_sys;

use crate::error;
use crate::guc;

thread_local! {
    /// This backend's refusal schedule, its clock's origin, and whether it logged being held.
    static STATE: Cell<(Tarpit, Option<Instant>, bool)> = const { Cell::new((Tarpit::new(), None, false)) };
}

/// Counts a refusal against this backend's cap and waits as long as the cap asks before the
/// refusal is answered. A debt under 10 ms is not waited now: the schedule keeps it, and a
/// later refusal waits it whole (fewer, longer sleeps cost the flooding backend less CPU).
pub fn hold_refusal() {
    let Ok(cap) = u32::try_from(guc::MAX_REFUSAL_RATE.get()) else { return };
    if cap == 0 {
        return;
    }
    // SAFETY: plain reads of this process's interrupt hold-off and critical-section counters.
    let held_off = unsafe { pg_sys::InterruptHoldoffCount > 0 || pg_sys::CritSectionCount > 0 };
    if held_off {
        return; // a wait that no cancel could end: answer at once
    }
    let (mut tarpit, origin, logged) = STATE.with(Cell::get);
    let origin = origin.unwrap_or_else(Instant::now);
    let now = since(origin);
    let wait = tarpit.refuse(now, cap);
    let held = wait > 0;
    STATE.with(|s| s.set((tarpit, Some(origin), logged || held)));
    if !held {
        return;
    }
    if !logged && guc::LOG_EVENTS.get() {
        error::log_server_only(format!(
            "pg_token: backend {} refused over {cap} tokens in a second; each further refusal waits so that it refuses at most {cap} a second (token.max_refusal_rate)",
            // SAFETY: reads this process's pid.
            unsafe { pg_sys::MyProcPid }
        ));
    }
    let deadline = now + wait;
    loop {
        let left_ms = (deadline - since(origin)) / 1000;
        if left_ms <= 0 {
            return;
        }
        // SAFETY: the standard wait on our own latch (set by every signal that asks this backend
        // to cancel, time out or die), with interrupts checked after.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                std::ffi::c_long::from(i32::try_from(left_ms).unwrap_or(i32::MAX)),
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pg_sys::check_for_interrupts!();
    }
}

/// Microseconds since `origin`, on the monotonic clock (a wall clock set back must not stall
/// refusals).
fn since(origin: Instant) -> Micros {
    Micros::try_from(origin.elapsed().as_micros()).unwrap_or(Micros::MAX)
}
