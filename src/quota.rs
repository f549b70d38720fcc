//! Rate limits and usage caps, applied to a token the verdict rules accepted: the last checks
//! of a validation, because they count (a refused token spends nothing).
//!
//! Rate limits are counted in one table in shared memory for the whole server
//! (`pg_token_core::ratelimit`, under its own LWLock): exact fixed windows across every
//! backend. Usage caps are spent from blocks the event writer reserves in committed
//! transactions (`pg_token_core::uses`, through `events::spend_use`). A token with neither
//! pays one branch for this module.
//!
//! Order: the rate limit first, then the use. A request refused for its rate spends no use; one
//! refused because its cap is spent still counted against its rate (a spent cap is refused
//! until an administrator or the refill changes it, so that count matters little).

use std::cell::UnsafeCell;
use std::ffi::CStr;
use std::mem::size_of;
use std::ptr;

use pg_token_core::clock;
use pg_token_core::ratelimit::{self, Admission, RateLimit};
use pg_token_core::reason::Reason;
use pg_token_core::verdict::Micros;
use pgrx::pg_sys;
use pgrx::PgSharedMemoryInitialization;

use pg_token_core::verdict::TokenState;

use crate::events::{self, queue::{attach_zeroed, Zeroed}, UseOutcome};

/// Token windows counted at once, server-wide (an entry is one token's one window), in
/// `PARTITIONS` tables of their own, each under its own lock: validations of different tokens
/// rarely wait for each other.
pub const PARTITIONS: usize = 16;
pub const RATE_ENTRIES: usize = 16384;
const PER_PARTITION: usize = RATE_ENTRIES / PARTITIONS;
const SHMEM_NAME: &CStr = c"pg_token rate limits";

#[repr(C)]
struct Partition {
    lock: *mut pg_sys::LWLock,
    table: ratelimit::Table<PER_PARTITION>,
}

#[repr(C)]
struct Shared {
    partitions: [Partition; PARTITIONS],
}

pub struct RateTable {
    shared: UnsafeCell<*mut Shared>,
}

// SAFETY: the pointer is written once, in the postmaster's shmem startup hook, before any
// backend exists; the table behind it is only touched under its LWLock.
unsafe impl Sync for RateTable {}

pub static RATES: RateTable = RateTable { shared: UnsafeCell::new(ptr::null_mut()) };

impl PgSharedMemoryInitialization for RateTable {
    type Value = Zeroed;

    unsafe fn on_shmem_request(&'static self) {
        // SAFETY: called at the documented point for shared memory requests.
        unsafe {
            pg_sys::RequestAddinShmemSpace(size_of::<Shared>());
            pg_sys::RequestNamedLWLockTranche(SHMEM_NAME.as_ptr(), PARTITIONS as i32);
        }
    }

    unsafe fn on_shmem_startup(&'static self, _value: Zeroed) {
        // SAFETY: an all-zero table is empty; the tranche of PARTITIONS locks was requested
        // above; the pointer is written once, before any backend exists.
        unsafe {
            *self.shared.get() = attach_zeroed(SHMEM_NAME, |shared: *mut Shared| {
                let locks = pg_sys::GetNamedLWLockTranche(SHMEM_NAME.as_ptr());
                for (i, p) in (*shared).partitions.iter_mut().enumerate() {
                    p.lock = &raw mut (*locks.add(i)).lock;
                }
            });
        }
    }
}

/// Asks for the rate table's shared memory; from _PG_init while shared_preload_libraries loads us.
pub fn init_shared_memory() {
    use pgrx::prelude::*;
    pgrx::pg_shmem_init!(RATES = Zeroed);
}

/// Runs `f` on partition `i` of the rate table under its lock (None when pg_token was not
/// preloaded).
fn partition<R>(i: usize, f: impl FnOnce(&mut ratelimit::Table<PER_PARTITION>) -> R) -> Option<R> {
    // SAFETY: the pointer was set at startup; each partition's LWLock serializes access to it.
    // `f` is plain arithmetic that cannot raise, so the lock is always released.
    unsafe {
        let shared = *RATES.shared.get();
        if shared.is_null() {
            return None;
        }
        let p = &raw mut (*shared).partitions[i % PARTITIONS];
        pg_sys::LWLockAcquire((*p).lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let r = f(&mut (*p).table);
        pg_sys::LWLockRelease((*p).lock);
        Some(r)
    }
}

/// A token's partition.
fn partition_of(token_id: &[u8; 16]) -> usize {
    usize::from(token_id[15] ^ token_id[7]) % PARTITIONS
}

/// Requests admitted without a table entry since the server started (the table was full).
pub fn untracked() -> u64 {
    (0..PARTITIONS).filter_map(|i| partition(i, |t| t.untracked)).sum()
}

/// What an accepted validation returns besides the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerCall {
    pub uses_remaining: Option<i64>,
    pub rate: Option<Admission>,
}

impl PerCall {
    pub fn is_empty(&self) -> bool {
        self.uses_remaining.is_none() && self.rate.is_none()
    }
}

/// A refusal by this module: reason, detail, and the rate state when refused for its rate.
pub struct Limited {
    pub reason: Reason,
    pub detail: String,
    pub rate: Option<Admission>,
}

/// What applying the limits came to.
pub enum Applied {
    Accepted(PerCall),
    Refused(Limited),
    /// The token's cap changed since it was read: judge it again.
    Stale,
}

/// Counts one validation of an accepted token against its rate limits (`limits`: its own or
/// its key type's) and spends one of its uses.
pub fn apply(s: &TokenState, limits: &[RateLimit], hint: impl Fn() -> String, now: Micros) -> Applied {
    let mut per_call = PerCall::default();
    if !limits.is_empty() {
        let a = partition(partition_of(&s.id), |t| t.admit(&s.id, limits, now)).unwrap_or(Admission {
            admitted: true,
            limit: 0,
            remaining: 0,
            reset_at: now,
            untracked: true,
        });
        if !a.admitted {
            let wait = (a.reset_at - now).max(0) as f64 / 1e6;
            let hint = hint();
            let detail = format!("token {hint} reached its rate limit of {} per window; retry after {wait:.3} s", a.limit);
            return Applied::Refused(Limited { reason: Reason::RateLimited, detail, rate: Some(a) });
        }
        if !a.untracked {
            per_call.rate = Some(a);
        }
    }
    if let Some(uses) = s.uses {
        match events::spend_use(&s.id, uses.version, uses.remaining, uses.refills) {
            UseOutcome::Spent(left) => per_call.uses_remaining = Some(left),
            UseOutcome::Stale => return Applied::Stale,
            UseOutcome::Exhausted(refill_at) => {
                let detail = if refill_at > 0 {
                    let wait = (refill_at - clock::now()).max(0) as f64 / 1e6;
                    format!("token {} has no uses left until its refill in {wait:.0} s", hint())
                } else {
                    format!("token {} has no uses left", hint())
                };
                return Applied::Refused(Limited { reason: Reason::UsageExceeded, detail, rate: per_call.rate });
            }
            UseOutcome::Unavailable(why) => {
                let detail = format!("token {} is capped and no use could be spent: {why}", hint());
                return Applied::Refused(Limited { reason: Reason::UsageExceeded, detail, rate: per_call.rate });
            }
        }
    }
    Applied::Accepted(per_call)
}
