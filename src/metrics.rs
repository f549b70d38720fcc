//! Counters for monitoring, summed over every backend: validations accepted, refusals by
//! reason, cache hits and misses. Each backend counts into its own slot of a shared-memory
//! array (indexed by its process number), written by no one else, so counting costs a plain
//! load and store on a cache line no other backend touches; readers sum the slots. Slots are
//! cumulative across the backends that reuse them: the totals run from server start.
//!
//! The SQL side (`token.metrics`, `token.refusal_metrics`) adds what the event writers know per
//! database (`events::queue`): refusals waiting and dropped, last-use updates, writer lag.
//! `examples/prometheus/queries.yaml` is the postgres_exporter file that reads them. A new
//! counter goes into `Counters` and both views.

use std::cell::UnsafeCell;
use std::ffi::CStr;
use std::mem::size_of;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use pg_token_core::reason::Reason;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSharedMemoryInitialization;

use crate::events;
use crate::events::queue::{attach_zeroed, Zeroed};

/// Backends counted in slots of their own; process numbers beyond share the last slot (with
/// atomic additions there).
const SLOTS: usize = 4096;
const REASONS: usize = Reason::SLOTS;
const SHMEM_NAME: &CStr = c"pg_token metrics";

/// One backend's counts. All-zero to start.
#[repr(C)]
struct Counters {
    validations: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    refusals: [AtomicU64; REASONS],
    /// Local misses the shared cache answered, and rows this backend added to it.
    shared_hits: AtomicU64,
    shared_fills: AtomicU64,
    /// Pads a slot to whole cache lines (3 + 32 + 2 + 3 = 40 words, five lines), so neighbours
    /// never share one.
    _pad: [u64; 3],
}

#[repr(C)]
struct Shared {
    slots: [Counters; SLOTS],
}

pub struct Metrics {
    shared: UnsafeCell<*mut Shared>,
}

// SAFETY: the pointer is written once, in the postmaster's shmem startup hook, before any
// backend exists; the counters it points to are atomics.
unsafe impl Sync for Metrics {}

pub static METRICS: Metrics = Metrics { shared: UnsafeCell::new(ptr::null_mut()) };

impl PgSharedMemoryInitialization for Metrics {
    type Value = Zeroed;

    unsafe fn on_shmem_request(&'static self) {
        // SAFETY: called at the documented point for shared memory requests.
        unsafe { pg_sys::RequestAddinShmemSpace(size_of::<Shared>()) };
    }

    unsafe fn on_shmem_startup(&'static self, _value: Zeroed) {
        // SAFETY: all-zero counters; the pointer is written once, before any backend exists.
        unsafe {
            *self.shared.get() = attach_zeroed::<Shared>(SHMEM_NAME, |_| {});
        }
    }
}

/// Asks for the counters' shared memory; from _PG_init while shared_preload_libraries loads us.
pub fn init_shared_memory() {
    use pgrx::prelude::*;
    pgrx::pg_shmem_init!(METRICS = Zeroed);
}

fn process_number() -> usize {
    // SAFETY: reads this backend's own process number (MyProc is set for every backend).
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    let n = unsafe { pg_sys::MyProcNumber };
    #[cfg(not(any(feature = "pg17", feature = "pg18")))]
    let n = unsafe { if pg_sys::MyProc.is_null() { -1 } else { (*pg_sys::MyProc).pgprocno } };
    usize::try_from(n).unwrap_or(SLOTS - 1).min(SLOTS - 1)
}

/// Adds one to a counter of this backend's slot.
fn bump(f: impl FnOnce(&Counters) -> &AtomicU64) {
    // SAFETY: a plain read of a pointer written once at startup.
    let shared = unsafe { *METRICS.shared.get() };
    if shared.is_null() {
        return;
    }
    let i = process_number();
    // SAFETY: `i` < SLOTS; the slot lives in shared memory for the server's life.
    let counter = f(unsafe { &(*shared).slots[i] });
    if i == SLOTS - 1 {
        counter.fetch_add(1, Ordering::Relaxed); // shared by the overflow backends
    } else {
        // Only this backend writes its slot: a load and a store, no locked instruction.
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

pub fn accepted() {
    bump(|c| &c.validations);
}

pub fn refused(reason: Reason) {
    bump(|c| &c.refusals[(reason as usize) % REASONS]);
}

pub fn cache_hit() {
    bump(|c| &c.cache_hits);
}

pub fn cache_miss() {
    bump(|c| &c.cache_misses);
}

pub fn shared_hit() {
    bump(|c| &c.shared_hits);
}

pub fn shared_fill() {
    bump(|c| &c.shared_fills);
}

/// The shared cache's counters summed over the slots: (hits, fills).
pub fn shared_totals() -> (u64, u64) {
    // SAFETY: a plain read of a pointer written once at startup.
    let shared = unsafe { *METRICS.shared.get() };
    if shared.is_null() {
        return (0, 0);
    }
    // SAFETY: the array lives in shared memory for the server's life; its fields are atomics.
    unsafe { &(*shared).slots }
        .iter()
        .fold((0, 0), |(h, f), c| (h + c.shared_hits.load(Ordering::Relaxed), f + c.shared_fills.load(Ordering::Relaxed)))
}

/// The slots summed: (validations, cache hits, cache misses, refusals by reason).
fn totals() -> (u64, u64, u64, [u64; REASONS]) {
    // SAFETY: a plain read of a pointer written once at startup.
    let shared = unsafe { *METRICS.shared.get() };
    let mut t = (0, 0, 0, [0u64; REASONS]);
    if shared.is_null() {
        return t;
    }
    // SAFETY: the array lives in shared memory for the server's life; its fields are atomics.
    for c in unsafe { &(*shared).slots } {
        t.0 += c.validations.load(Ordering::Relaxed);
        t.1 += c.cache_hits.load(Ordering::Relaxed);
        t.2 += c.cache_misses.load(Ordering::Relaxed);
        for (sum, r) in t.3.iter_mut().zip(&c.refusals) {
            *sum += r.load(Ordering::Relaxed);
        }
    }
    t
}

/// One row for a scraper: server-wide counters since start, and this database's event writer.
#[pg_extern(volatile, parallel_restricted)]
fn metrics() -> TableIterator<
    'static,
    (
        name!(validations_total, i64),
        name!(refusals_total, i64),
        name!(cache_hits_total, i64),
        name!(cache_misses_total, i64),
        name!(refusals_pending, i64),
        name!(refusals_dropped_total, i64),
        name!(event_rows_total, i64),
        name!(touches_queued, i64),
        name!(touches_dropped_total, i64),
        name!(writer_running, bool),
        name!(writer_lag_seconds, f64),
        name!(rate_limit_untracked_total, i64),
    ),
> {
    events::require_preload();
    let (validations, hits, misses, refusals) = totals();
    let w = events::queue::writer_metrics();
    let n = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
    TableIterator::once((
        n(validations),
        n(refusals.iter().sum()),
        n(hits),
        n(misses),
        n(w.refusals_pending),
        n(w.refusals_dropped),
        n(w.rows),
        n(w.touches_queued),
        n(w.touches_dropped),
        w.writer_running,
        w.lag_us as f64 / 1e6,
        n(crate::quota::untracked()),
    ))
}

/// Refusals by reason, server-wide since start: one row per reason (zeros included).
#[pg_extern(volatile, parallel_restricted)]
fn refusal_metrics() -> TableIterator<'static, (name!(reason, &'static str), name!(refusals_total, i64))> {
    events::require_preload();
    let (_, _, _, refusals) = totals();
    TableIterator::new(
        Reason::ALL.iter().map(move |r| (r.as_str(), i64::try_from(refusals[(*r as usize) % REASONS]).unwrap_or(i64::MAX))),
    )
}
