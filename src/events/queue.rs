//! The shared memory between backends and the event writer (`writer`).
//!
//! A backend that refuses a token must leave a trace even if its transaction then rolls back,
//! and a successful validation must update `last_used_at` without writing or waiting on a row
//! lock. Both needs are met the same way: the backend records what happened in shared memory
//! for its database, outside any transaction, and a background worker connected to that
//! database writes it in its own transactions.
//!
//! Each database using pg_token claims one of `MAX_DATABASES` slots. A slot holds:
//! - refusals, counted into a fixed table (`pg_token_core::aggregate::Table`, `EVENT_KEYS`
//!   entries): one entry per key and window, made into a row at once and then only counted, so
//!   no amount of refusals can grow memory, rows or the writer's work (the core says how);
//! - last-use updates (`Touch`, 32 bytes, `TOUCH_LEN` of them in a ring), which the writer
//!   lets accumulate for up to `TOUCH_DELAY` so that one transaction applies thousands (a
//!   last-use time is only kept to the `token.last_used_interval` anyway). When the ring is
//!   full, new ones are dropped and counted (a last use is queued again at the next use after
//!   the interval).
//!
//! The memory is requested at postmaster start, so pg_token must be in
//! `shared_preload_libraries`.
//!
//! Never put a token in shared memory: keys and samples hold prefixes and 4-character hints
//! only. A new kind of record that must outlive the caller's transaction gets its own place in
//! `Slot` (its own bound and count), not a field squeezed into an existing one.
//!
//! # Shared memory through pgrx
//! `pg_shmem_init!` installs the request and startup hooks (chaining whatever was installed
//! before, and using PostgreSQL 14's request-in-_PG_init where 15+ has a request hook), through
//! our `PgSharedMemoryInitialization` impl. We do not use `PgLwLock<T>` itself: it builds the
//! initial `T` by value on the postmaster's stack and moves it into place, and `Shared` is
//! several megabytes (the refusal tables and last-use rings); we zero the area where it
//! lies instead, which is a valid empty state for every field. Every access goes through
//! `locked`, whose guard releases the LWLock when dropped, on unwind too.

use std::cell::UnsafeCell;
use std::ffi::CStr;
use std::mem::size_of;
use std::ptr;

use pg_token_core::aggregate::{Counted, Entry, Key, Limits, Sample, Table};
use pg_token_core::clock;
use pg_token_core::ring::Ring;
use pg_token_core::uses::{self, Request, Reserved, Step};
use pgrx::pg_sys;
use pgrx::{PGRXSharedMemory, PgSharedMemoryInitialization};

use super::family;
use crate::error;

pub const MAX_DATABASES: usize = 8;
/// Refusal keys counted per database at once (16 of them are the reasons' overflow rows).
pub const EVENT_KEYS: usize = 512;
/// Last-use updates queued per database.
pub const TOUCH_LEN: usize = 8192;
/// Capped tokens with reserved uses per database at once.
pub const USE_ENTRIES: usize = 1024;
/// Refusal rows written per writer transaction (every entry: one transaction).
pub const BATCH: usize = EVENT_KEYS;
/// How long the writer lets count increments gather before writing them (a new row is
/// written at once).
pub const EVENT_DELAY: std::time::Duration = std::time::Duration::from_secs(1);
/// Last-use updates written per writer transaction; the writer is woken when this many wait.
pub const TOUCH_BATCH: usize = 2048;
/// How long the writer lets last-use updates accumulate before writing them.
pub const TOUCH_DELAY: std::time::Duration = std::time::Duration::from_millis(100);
/// A writer registered this long ago that never attached is taken for lost (the postmaster
/// could not start it) and replaced by the next record.
const STARTING_TIMEOUT_US: i64 = 60_000_000;
const SHMEM_NAME: &CStr = c"pg_token";

/// A successful validation: set `last_used_at` of `token_id` to `at`, unless the row was used
/// less than `interval_s` seconds before `at` (the validating session's setting).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Touch {
    pub token_id: [u8; 16],
    pub at: i64,
    pub interval_s: i32,
}

#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Stopped = 0,
    Starting = 1,
    Running = 2,
}

/// What the writer is writing, so that an abnormal exit is charged to the right ring.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle = 0,
    Events = 1,
    Touches = 2,
    Uses = 3,
}

#[repr(C)]
struct Slot {
    dboid: pg_sys::Oid,
    state: WorkerState,
    worker_pid: i32,
    latch: *mut pg_sys::Latch,
    /// When the current writer was registered (state Starting), in microseconds.
    starting_since: i64,
    phase: Phase,
    /// Consecutive abnormal writer exits while writing each ring; after three, that ring's
    /// batch at the tail is discarded (something in it cannot be written).
    event_failures: u32,
    touch_failures: u32,
    /// flush_events() is waiting for the last-use updates up to this sequence number, and
    /// for the refusals counted up to this number: write them without delay until then.
    flush_touches_until: u64,
    flush_refusals_until: u64,
    /// Refusals that could not be written (a batch discarded after three failed attempts).
    refusals_dropped: u64,
    refusals: Table<EVENT_KEYS>,
    touches: Ring<Touch, TOUCH_LEN>,
    /// Usage-cap reservations (`pg_token_core::uses`): blocks of uses the writer reserved for
    /// this database's backends to spend, and the requests for more.
    uses: uses::Table<USE_ENTRIES>,
    /// Token families revoked for a reuse: marked at once, written by the writer (`family`).
    families: family::Table,
}

impl Slot {
    fn is_empty(&self) -> bool {
        self.refusals_pending() == 0 && self.touches.is_empty() && !self.uses.has_requests() && !self.families.has_requests()
    }

    fn refusals_pending(&self) -> u64 {
        self.refusals.pending().saturating_sub(self.refusals_dropped)
    }

    fn poisoned(&self) -> bool {
        self.event_failures >= 3 || self.touch_failures >= 3
    }

    /// Marks the slot as having a writer on its way; the caller registers one.
    fn starting(&mut self) {
        self.state = WorkerState::Starting;
        self.starting_since = clock::now();
    }

    /// Whether a writer must be registered: none is running or on its way, or the one on its
    /// way has not attached for too long.
    fn needs_writer(&self) -> bool {
        match self.state {
            WorkerState::Stopped => true,
            WorkerState::Starting => clock::now().saturating_sub(self.starting_since) > STARTING_TIMEOUT_US,
            WorkerState::Running => false,
        }
    }
}

#[repr(C)]
struct Shared {
    lock: *mut pg_sys::LWLock,
    slots: [Slot; MAX_DATABASES],
}

/// The queue in shared memory: set once per process in the shmem startup hook (postmaster,
/// inherited by fork), read-only afterwards; the pointee is only touched under `Shared::lock`.
pub struct EventQueue {
    shared: UnsafeCell<*mut Shared>,
}

// SAFETY: the pointer is written once, before any backend exists, and never again.
unsafe impl Sync for EventQueue {}

pub static QUEUE: EventQueue = EventQueue { shared: UnsafeCell::new(ptr::null_mut()) };

/// The initial value `pg_shmem_init!` passes: "zero the area in place".
#[derive(Clone, Copy)]
pub struct Zeroed;

// SAFETY: a unit value with no pointers.
unsafe impl PGRXSharedMemory for Zeroed {}

impl PgSharedMemoryInitialization for EventQueue {
    type Value = Zeroed;

    unsafe fn on_shmem_request(&'static self) {
        // SAFETY: called at the documented point for shared memory requests.
        unsafe {
            pg_sys::RequestAddinShmemSpace(size_of::<Shared>());
            pg_sys::RequestNamedLWLockTranche(SHMEM_NAME.as_ptr(), 1);
        }
    }

    unsafe fn on_shmem_startup(&'static self, _value: Zeroed) {
        // SAFETY: standard add-in initialization under AddinShmemInitLock (MainLWLockArray[21],
        // as pgrx's own PgLwLock does); an all-zero `Shared` is a valid empty state (Stopped
        // slots, empty rings), so the area is zeroed where it lies, never built on the stack.
        unsafe {
            let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
            pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let mut found = false;
            let shared = pg_sys::ShmemInitStruct(SHMEM_NAME.as_ptr(), size_of::<Shared>(), &mut found).cast::<Shared>();
            if !found {
                ptr::write_bytes(shared.cast::<u8>(), 0, size_of::<Shared>());
                (*shared).lock = &raw mut (*pg_sys::GetNamedLWLockTranche(SHMEM_NAME.as_ptr())).lock;
            }
            *self.shared.get() = shared;
            pg_sys::LWLockRelease(init_lock);
        }
    }
}

/// Asks for the queue's shared memory; from _PG_init while shared_preload_libraries loads us.
pub fn init_shared_memory() {
    use pgrx::prelude::*;
    pgrx::pg_shmem_init!(QUEUE = Zeroed);
}

/// Whether the queue exists (pg_token was preloaded).
pub fn available() -> bool {
    // SAFETY: a plain read of a pointer written once at startup.
    unsafe { !(*QUEUE.shared.get()).is_null() }
}

/// Raises 55000 unless pg_token was preloaded (its shared memory exists).
pub fn require_preload() {
    if !available() {
        error::not_preloaded();
    }
}

/// Holds the queue lock; releases it when dropped, also when unwinding.
struct Locked(*mut Shared);

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: acquired in `locked`; `self.0` points at the live shared state.
        unsafe { pg_sys::LWLockRelease((*self.0).lock) };
    }
}

/// Runs `f` on the shared state under the queue lock. `f` should not raise an error (it runs
/// with an LWLock held), but if it does the guard releases the lock on the way out.
fn locked<R>(f: impl FnOnce(&mut Shared) -> R) -> Option<R> {
    // SAFETY: the pointer was set at startup and points into shared memory sized for
    // `Shared`; the LWLock serializes all access to it.
    unsafe {
        let shared = *QUEUE.shared.get();
        if shared.is_null() {
            return None;
        }
        pg_sys::LWLockAcquire((*shared).lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let guard = Locked(shared);
        let r = f(&mut *guard.0);
        drop(guard);
        Some(r)
    }
}

pub enum Pushed {
    /// Queued; the caller must start a writer for the database (none was running).
    QueuedStartWorker(usize),
    Queued,
    /// The ring was full or no slot was free; the record was counted as dropped.
    Dropped,
    /// pg_token was not preloaded.
    Unavailable,
}

fn slot_for(shared: &mut Shared, dboid: pg_sys::Oid, claim: bool) -> Option<usize> {
    if let Some(i) = shared.slots.iter().position(|s| s.dboid == dboid) {
        return Some(i);
    }
    if !claim {
        return None;
    }
    // Reuse a slot whose database has no writer and either nothing queued or writers that
    // keep failing (its database was dropped, say): its records can never be written.
    let i = shared
        .slots
        .iter()
        .position(|s| s.state == WorkerState::Stopped && (s.is_empty() || s.poisoned()))?;
    let s = &mut shared.slots[i];
    s.refusals.reset();
    s.touches.reset();
    s.uses.reset();
    s.families.reset();
    s.dboid = dboid;
    s.event_failures = 0;
    s.touch_failures = 0;
    s.flush_touches_until = 0;
    s.flush_refusals_until = 0;
    s.refusals_dropped = 0;
    s.phase = Phase::Idle;
    Some(i)
}

/// Counts a refusal into its database's table; the writer is woken when it made a new row
/// (which is written at once: the first refusal of a key is visible within the writer's delay).
pub fn push_refusal(dboid: pg_sys::Oid, key: &Key, sample: &Sample, limits: &Limits) -> Pushed {
    let now = clock::now();
    push(dboid, |slot| Some(slot.refusals.count(key, sample, now, limits) == Counted::NewRow))
}

/// On a hot standby nothing can be written: counts a refusal and reports whether it made a
/// new key (the caller logs that one line), marking it written at once so the table keeps
/// making room. None when pg_token was not preloaded or no slot was free.
pub fn count_on_standby(dboid: pg_sys::Oid, key: &Key, sample: &Sample, limits: &Limits) -> Option<bool> {
    let now = clock::now();
    locked(|shared| {
        let i = slot_for(shared, dboid, true)?;
        let table = &mut shared.slots[i].refusals;
        let new = table.count(key, sample, now, limits) == Counted::NewRow;
        let mut out = Vec::new();
        table.to_write(&mut out, EVENT_KEYS);
        for (j, e) in &out {
            table.mark_written(*j, e, -1);
        }
        table.expire_overflow(now, limits.window_us);
        Some(new)
    })
    .flatten()
}

/// Queues a last-use update; the writer is woken when the ring was empty (to start its delay)
/// and when a whole batch is waiting.
pub fn push_touch(dboid: pg_sys::Oid, touch: &Touch) -> Pushed {
    push(dboid, |slot| slot.touches.push(touch).map(|before| before == 0 || before + 1 == TOUCH_BATCH))
}

/// `append` returns whether the writer should be woken, or None when the ring was full.
fn push(dboid: pg_sys::Oid, append: impl FnOnce(&mut Slot) -> Option<bool>) -> Pushed {
    locked(|shared| {
        let Some(i) = slot_for(shared, dboid, true) else { return Pushed::Dropped };
        let slot = &mut shared.slots[i];
        let Some(wake) = append(slot) else { return Pushed::Dropped };
        if slot.needs_writer() {
            slot.starting();
            return Pushed::QueuedStartWorker(i);
        }
        match slot.state {
            WorkerState::Stopped | WorkerState::Starting => Pushed::Queued,
            WorkerState::Running => {
                // Setting a latch the writer waits on costs a syscall: only when needed.
                if wake {
                    // SAFETY: the latch belongs to the running worker's PGPROC, in shared memory.
                    unsafe { pg_sys::SetLatch(slot.latch) };
                }
                Pushed::Queued
            }
        }
    })
    .unwrap_or(Pushed::Unavailable)
}

/// Spends one use of a capped token (see `pg_token_core::uses`), asking the writer for a block
/// when none is reserved. Returns the step, and a slot whose writer the caller must start.
pub fn spend_use(dboid: pg_sys::Oid, token_id: &[u8; 16], version: i64, table_remaining: i64, refills: bool) -> (Step, Option<usize>) {
    let now = clock::now();
    locked(|shared| {
        let Some(i) = slot_for(shared, dboid, true) else { return (Step::Full, None) };
        let slot = &mut shared.slots[i];
        let step = slot.uses.spend(token_id, version, table_remaining, refills, now);
        let ask = matches!(step, Step::Requested | Step::Spent { asked: true, .. });
        if !ask {
            return (step, None);
        }
        if slot.needs_writer() {
            slot.starting();
            return (step, Some(i));
        }
        if slot.state == WorkerState::Running {
            // SAFETY: the latch belongs to the running worker's PGPROC, in shared memory.
            unsafe { pg_sys::SetLatch(slot.latch) };
        }
        (step, None)
    })
    .unwrap_or((Step::Full, None))
}

/// Marks a token family as revoked on this server and (unless `standby`) asks the writer to
/// revoke it. Returns the family's state, and a slot whose writer the caller must start.
pub fn ask_family(dboid: pg_sys::Oid, request: family::Request, standby: bool) -> (family::Asked, Option<usize>) {
    locked(|shared| {
        let Some(i) = slot_for(shared, dboid, true) else { return (family::Asked::Full, None) };
        let slot = &mut shared.slots[i];
        let initial = if standby { family::state::UNWRITTEN } else { family::state::REQUESTED };
        let asked = slot.families.ask(request, initial);
        if standby || !matches!(asked, family::Asked::In(family::state::REQUESTED)) {
            return (asked, None);
        }
        if slot.needs_writer() {
            slot.starting();
            return (asked, Some(i));
        }
        if slot.state == WorkerState::Running {
            // SAFETY: the latch belongs to the running worker's PGPROC, in shared memory.
            unsafe { pg_sys::SetLatch(slot.latch) };
        }
        (asked, None)
    })
    .unwrap_or((family::Asked::Full, None))
}

/// Whether a token family is marked revoked on this server.
pub fn family_marked(dboid: pg_sys::Oid, family_id: &[u8; 16]) -> bool {
    locked(|shared| slot_for(shared, dboid, false).is_some_and(|i| shared.slots[i].families.marked(family_id))).unwrap_or(false)
}

/// The writer takes the family revocations waiting.
pub fn worker_take_families(slot: usize, out: &mut Vec<family::Request>) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        s.families.take(out);
        s.phase = Phase::Uses;
    });
}

/// The writer committed the revocation of these families.
pub fn worker_revoked_families(slot: usize, done: &[[u8; 16]]) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        s.families.complete(done);
        s.phase = Phase::Idle;
    });
}

/// Uses reserved in this server's shared memory and not yet spent for a token, whether a
/// reservation for it is in flight, and how many reservations have completed.
pub fn reserved_uses(dboid: pg_sys::Oid, token_id: &[u8; 16]) -> (i64, bool, u64) {
    locked(|shared| {
        slot_for(shared, dboid, false).map_or((0, false, 0), |i| {
            let u = &shared.slots[i].uses;
            let (n, busy) = u.reserved(token_id);
            (n, busy, u.completed)
        })
    })
    .unwrap_or((0, false, 0))
}

/// Asks a running writer to write everything now, or reports that one must be started.
pub fn nudge(dboid: pg_sys::Oid) -> Option<usize> {
    locked(|shared| {
        let i = slot_for(shared, dboid, false)?;
        let slot = &mut shared.slots[i];
        slot.flush_touches_until = slot.flush_touches_until.max(slot.touches.head());
        slot.flush_refusals_until = slot.flush_refusals_until.max(slot.refusals.counted);
        if slot.is_empty() {
            return None;
        }
        if slot.needs_writer() {
            slot.starting();
            return Some(i);
        }
        match slot.state {
            WorkerState::Running => {
                // SAFETY: as in `push`.
                unsafe { pg_sys::SetLatch(slot.latch) };
                None
            }
            _ => None,
        }
    })
    .flatten()
}

/// Marks a slot's writer as not starting after all (registration failed).
pub fn start_failed(slot: usize) {
    locked(|shared| shared.slots[slot].state = WorkerState::Stopped);
}

/// How far a database's records go: (refusals counted, last-use updates queued).
pub type Marks = (u64, u64);

/// Everything recorded so far for a database.
pub fn head(dboid: pg_sys::Oid) -> Option<Marks> {
    locked(|shared| {
        slot_for(shared, dboid, false).map(|i| (shared.slots[i].refusals.counted, shared.slots[i].touches.head()))
    })
    .flatten()
}

/// Whether everything up to `marks` has been committed by the writer.
pub fn written_up_to(dboid: pg_sys::Oid, marks: Marks) -> bool {
    locked(|shared| {
        slot_for(shared, dboid, false).is_none_or(|i| {
            let s = &shared.slots[i];
            s.refusals.written + s.refusals_dropped >= marks.0 && s.touches.tail() >= marks.1 && !s.families.in_flight()
        })
    })
    .unwrap_or(true)
}

/// Counts of one ring: queued now, written and dropped since the slot was claimed.
#[derive(Clone, Copy)]
pub struct RingStatus {
    pub queued: u64,
    pub written: u64,
    pub dropped: u64,
}

/// Counts of a database's refusals since the slot was claimed.
#[derive(Clone, Copy)]
pub struct RefusalStatus {
    /// Refusals counted, written (into rows), counted into folded rows, and dropped (a batch
    /// that could not be written three times running).
    pub counted: u64,
    pub written: u64,
    pub folded: u64,
    pub dropped: u64,
    /// Rows made, and the table entries in use now.
    pub rows: u64,
    pub keys: u64,
}

pub struct SlotStatus {
    pub database: pg_sys::Oid,
    pub worker_pid: Option<i32>,
    pub refusals: RefusalStatus,
    pub touches: RingStatus,
}

pub fn status() -> Vec<SlotStatus> {
    fn ring<T: Copy, const N: usize>(r: &Ring<T, N>) -> RingStatus {
        RingStatus { queued: r.len() as u64, written: r.tail(), dropped: r.dropped() }
    }
    locked(|shared| {
        shared
            .slots
            .iter()
            .filter(|s| s.dboid != pg_sys::InvalidOid)
            .map(|s| SlotStatus {
                database: s.dboid,
                worker_pid: (s.state == WorkerState::Running).then_some(s.worker_pid),
                refusals: RefusalStatus {
                    counted: s.refusals.counted,
                    written: s.refusals.written,
                    folded: s.refusals.folded,
                    dropped: s.refusals_dropped,
                    rows: s.refusals.rows,
                    keys: s.refusals.in_use() as u64,
                },
                touches: ring(&s.touches),
            })
            .collect()
    })
    .unwrap_or_default()
}

/// What a scraper reads about this database's event writer (`token.metrics`).
pub struct WriterMetrics {
    pub refusals_pending: u64,
    pub refusals_dropped: u64,
    pub rows: u64,
    pub touches_queued: u64,
    pub touches_dropped: u64,
    pub writer_running: bool,
    /// How long the oldest record still unwritten (refusal or last-use update) has waited.
    pub lag_us: i64,
}

pub fn writer_metrics() -> WriterMetrics {
    // SAFETY: MyDatabaseId is set in a connected backend.
    let db = unsafe { pg_sys::MyDatabaseId };
    let now = clock::now();
    locked(|shared| {
        slot_for(shared, db, false).map(|i| {
            let s = &shared.slots[i];
            let oldest = [s.refusals.oldest_pending(), s.touches.oldest().map(|t| t.at)].into_iter().flatten().min();
            WriterMetrics {
                refusals_pending: s.refusals_pending(),
                refusals_dropped: s.refusals_dropped,
                rows: s.refusals.rows,
                touches_queued: s.touches.len() as u64,
                touches_dropped: s.touches.dropped(),
                writer_running: s.state == WorkerState::Running,
                lag_us: oldest.map_or(0, |t| now.saturating_sub(t).max(0)),
            }
        })
    })
    .flatten()
    .unwrap_or(WriterMetrics {
        refusals_pending: 0,
        refusals_dropped: 0,
        rows: 0,
        touches_queued: 0,
        touches_dropped: 0,
        writer_running: false,
        lag_us: 0,
    })
}

// ---- The worker's side ----

/// Called by the writer once connected: takes ownership of the slot, unless another writer
/// already has it (one registered later, when this one seemed lost). Returns its database and
/// whether batches were discarded because earlier writers kept failing on them.
pub fn worker_attach(slot: usize) -> Option<(pg_sys::Oid, bool)> {
    locked(|shared| {
        let s = shared.slots.get_mut(slot)?;
        if s.state != WorkerState::Starting {
            return None;
        }
        s.state = WorkerState::Running;
        // SAFETY: MyProcPid and MyLatch are this process's own, valid for its lifetime.
        unsafe {
            s.worker_pid = pg_sys::MyProcPid;
            s.latch = pg_sys::MyLatch;
        }
        s.phase = Phase::Idle;
        let mut discarded = false;
        if s.event_failures >= 3 {
            // Something in the pending refusals cannot be written: give up on them, counted.
            let mut out = Vec::new();
            s.refusals.to_write(&mut out, EVENT_KEYS);
            for (i, e) in &out {
                s.refusals_dropped += e.count - e.written;
                s.refusals.mark_written(*i, e, e.row_id);
            }
            s.refusals.written -= out.iter().map(|(_, e)| e.count - e.written).sum::<u64>();
            s.event_failures = 0;
            discarded = true;
        }
        if s.touch_failures >= 3 {
            s.touches.discard(TOUCH_BATCH);
            s.touch_failures = 0;
            discarded = true;
        }
        Some((s.dboid, discarded))
    })
    .flatten()
}

pub fn worker_database(slot: usize) -> Option<pg_sys::Oid> {
    locked(|shared| shared.slots.get(slot).map(|s| s.dboid)).flatten()
}

/// What waits for the writer.
pub struct Waiting {
    /// A refusal key needs its row (write it now).
    pub new_rows: bool,
    /// Refusals counted but not written.
    pub refusals: u64,
    /// Someone waits in flush_events for the refusals.
    pub flush_refusals: bool,
    pub touches: usize,
    pub flush_touches: bool,
    /// Backends wait for use reservations.
    pub reservations: bool,
    /// Backends wait for token families to be revoked.
    pub families: bool,
}

pub fn worker_counts(slot: usize) -> Waiting {
    locked(|shared| {
        let s = &shared.slots[slot];
        Waiting {
            new_rows: s.refusals.has_new_rows(),
            refusals: s.refusals_pending(),
            flush_refusals: s.refusals.written + s.refusals_dropped < s.flush_refusals_until,
            touches: s.touches.len(),
            flush_touches: s.touches.tail() < s.flush_touches_until,
            reservations: s.uses.has_requests(),
            families: s.families.has_requests(),
        }
    })
    .unwrap_or(Waiting {
        new_rows: false,
        refusals: 0,
        flush_refusals: false,
        touches: 0,
        flush_touches: false,
        reservations: false,
        families: false,
    })
}

/// Copies the refusal entries with something to write, and records that the writer is now
/// writing refusals.
pub fn worker_peek_refusals(slot: usize, out: &mut Vec<(usize, Entry)>) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        s.refusals.to_write(out, BATCH);
        s.phase = Phase::Events;
    });
}

/// Gives the entries that have no row yet their row ids (drawn from token.events_id_seq in the
/// writer's transaction), before the rows are written: if the transaction fails, the next
/// attempt writes the same ids again, so a row is never made twice. Updates `out` too.
pub fn worker_assign_rows(slot: usize, out: &mut [(usize, Entry)], ids: &[i64]) {
    locked(|shared| {
        let table = &mut shared.slots[slot].refusals;
        let mut ids = ids.iter();
        for (i, e) in out.iter_mut().filter(|(_, e)| e.row_id == 0) {
            if let Some(&id) = ids.next() {
                e.row_id = id;
                table.assign_row(*i, e, id);
            }
        }
    });
}

/// Records that the refusal entries in `written` (as copied) are committed, and frees the
/// overflow rows whose window has ended.
pub fn worker_wrote_refusals(slot: usize, written: &[(usize, Entry)], window_us: i64) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        for (i, e) in written {
            s.refusals.mark_written(*i, e, e.row_id);
        }
        s.refusals.expire_overflow(clock::now(), window_us);
        s.event_failures = 0;
        s.phase = Phase::Idle;
    });
}

/// The same for up to `TOUCH_BATCH` last-use updates.
pub fn worker_peek_touches(slot: usize, out: &mut Vec<Touch>) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        s.touches.peek(out, TOUCH_BATCH);
        s.phase = Phase::Touches;
    });
}

/// Consumes the last-use updates the writer just committed (those it peeked last).
pub fn worker_consumed_touches(slot: usize, n: usize) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        s.touches.consume(n);
        s.touch_failures = 0;
        s.phase = Phase::Idle;
    });
}

/// The writer takes the reservation requests waiting.
pub fn worker_take_reservations(slot: usize, out: &mut Vec<Request>) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        s.uses.take_requests(out);
        s.phase = Phase::Uses;
    });
}

/// The writer committed these reservations (None: no cap at that version).
pub fn worker_reserved(slot: usize, answers: &[(Request, Option<Reserved>)]) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        for (r, a) in answers {
            s.uses.complete(r, *a);
        }
        s.phase = Phase::Idle;
    });
}

/// Leaves the slot if nothing is queued; returns false (stay) if records arrived meanwhile.
pub fn worker_try_detach(slot: usize) -> bool {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        if !s.is_empty() {
            return false;
        }
        s.state = WorkerState::Stopped;
        s.latch = ptr::null_mut();
        true
    })
    .unwrap_or(true)
}

/// The writer is exiting (normally or not, attached or not): release the slot so that the
/// next record starts a new writer. Only one writer is ever starting per slot, so a slot still
/// `Starting` is ours.
pub fn worker_exited(slot: usize, abnormal: bool) {
    locked(|shared| {
        if let Some(s) = shared.slots.get_mut(slot) {
            // SAFETY: reading our own pid.
            let mine = s.worker_pid == unsafe { pg_sys::MyProcPid } && s.state == WorkerState::Running;
            if mine || s.state == WorkerState::Starting {
                s.state = WorkerState::Stopped;
                s.latch = ptr::null_mut();
                if abnormal {
                    match s.phase {
                        Phase::Events => s.event_failures += 1,
                        Phase::Touches => s.touch_failures += 1,
                        Phase::Uses | Phase::Idle => {}
                    }
                }
                // Reservations in progress were not committed (or were, and are lost: never
                // granted twice): the next writer takes the requests again.
                s.uses.retry_in_progress();
                s.families.retry_in_progress();
                s.phase = Phase::Idle;
            }
        }
    });
}
