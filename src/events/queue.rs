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

use pg_token_core::aggregate::{Counted, Key, Limits, Sample, Table};
use pg_token_core::clock;
use pg_token_core::ring::Ring;
use pg_token_core::uses::{self, Step};
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

    /// Empties the slot for `dboid` (InvalidOid: free).
    fn reset(&mut self, dboid: pg_sys::Oid) {
        self.refusals.reset();
        self.touches.reset();
        self.uses.reset();
        self.families.reset();
        self.dboid = dboid;
        self.event_failures = 0;
        self.touch_failures = 0;
        self.flush_touches_until = 0;
        self.flush_refusals_until = 0;
        self.refusals_dropped = 0;
        self.phase = Phase::Idle;
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

/// Finds (or creates, zeroed where it lies, then hands to `init` once) the shared-memory struct
/// `name`, under AddinShmemInitLock (MainLWLockArray[21], as pgrx's own PgLwLock does): what
/// every one of pg_token's shmem startup hooks does. An all-zero `T` must be a valid state.
///
/// # Safety
/// Only from a shmem startup hook, with `name` requested at `size_of::<T>()` bytes.
pub unsafe fn attach_zeroed<T>(name: &std::ffi::CStr, init: impl FnOnce(*mut T)) -> *mut T {
    // SAFETY: the standard add-in initialization; the area is never built on the stack.
    unsafe {
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let shared = pg_sys::ShmemInitStruct(name.as_ptr(), size_of::<T>(), &mut found).cast::<T>();
        if !found {
            ptr::write_bytes(shared.cast::<u8>(), 0, size_of::<T>());
            init(shared);
        }
        pg_sys::LWLockRelease(init_lock);
        shared
    }
}

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
        // SAFETY: an all-zero `Shared` is a valid empty state (Stopped slots, empty rings); the
        // tranche was requested above; the pointer is written once, before any backend exists.
        unsafe {
            *self.shared.get() = attach_zeroed(SHMEM_NAME, |shared: *mut Shared| {
                (*shared).lock = &raw mut (*pg_sys::GetNamedLWLockTranche(SHMEM_NAME.as_ptr())).lock;
            });
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
    // keep failing on data they cannot write: those records can never be written.
    let i = shared
        .slots
        .iter()
        .position(|s| s.state == WorkerState::Stopped && (s.is_empty() || s.poisoned()))?;
    shared.slots[i].reset(dboid);
    Some(i)
}

/// Runs `f` on the slot of `dboid` under the queue lock, claiming one if it has none. When
/// every slot is taken, the slots of databases that no longer exist are freed first
/// (`free_dropped`) and the claim is tried once more. None when pg_token was not preloaded,
/// Some(None) when no slot could be had.
fn with_slot<R>(dboid: pg_sys::Oid, mut f: impl FnMut(&mut Slot, usize) -> R) -> Option<Option<R>> {
    let first = locked(|shared| slot_for(shared, dboid, true).map(|i| f(&mut shared.slots[i], i)))?;
    if first.is_some() || !free_dropped() {
        return Some(first);
    }
    locked(|shared| slot_for(shared, dboid, true).map(|i| f(&mut shared.slots[i], i)))
}

/// Frees the slots of databases dropped with records still queued: no writer can ever write
/// them (there is no database to connect to) and nothing else would release the slot. The
/// catalog is read outside the queue lock (a catalog read may wait on a lock), and a slot is
/// freed only if it is still the dropped database's and still has no writer. Returns whether
/// any slot was freed; each one freed gets a line in the server log.
fn free_dropped() -> bool {
    let stopped: Vec<pg_sys::Oid> = locked(|shared| {
        shared
            .slots
            .iter()
            .filter(|s| s.dboid != pg_sys::InvalidOid && s.state == WorkerState::Stopped)
            .map(|s| s.dboid)
            .collect()
    })
    .unwrap_or_default();
    let gone: Vec<pg_sys::Oid> = stopped.into_iter().filter(|&db| !database_exists(db)).collect();
    if gone.is_empty() {
        return false;
    }
    let freed: Vec<(pg_sys::Oid, u64, usize)> = locked(|shared| {
        let mut freed = Vec::new();
        for s in shared.slots.iter_mut().filter(|s| s.state == WorkerState::Stopped && gone.contains(&s.dboid)) {
            freed.push((s.dboid, s.refusals_pending(), s.touches.len()));
            s.reset(pg_sys::InvalidOid);
        }
        freed
    })
    .unwrap_or_default();
    for (db, refusals, touches) in &freed {
        crate::error::log_server_only(format!(
            "pg_token: freed the event queue slot of dropped database {} ({refusals} refusals and {touches} last-use updates unwritten)",
            db.to_u32()
        ));
    }
    !freed.is_empty()
}

/// Whether a database with this OID exists (committed). Outside a transaction the catalog
/// cannot be read: then it is taken to exist.
fn database_exists(db: pg_sys::Oid) -> bool {
    // SAFETY: a syscache probe by key, only inside a transaction (where catalog reads are
    // allowed); it reads pg_database, a shared catalog every backend can read.
    unsafe {
        if !pg_sys::IsTransactionState() {
            return true;
        }
        pg_sys::SearchSysCacheExists(
            pg_sys::SysCacheIdentifier::DATABASEOID as _,
            pg_sys::Datum::from(db),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        )
    }
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
    with_slot(dboid, |slot, _| {
        let table = &mut slot.refusals;
        let new = table.count(key, sample, now, limits) == Counted::NewRow;
        let mut out = Vec::new();
        table.to_write(&mut out, EVENT_KEYS);
        for (j, e) in &out {
            table.mark_written(*j, e, -1);
        }
        table.expire_overflow(now, limits.window_us);
        new
    })
    .flatten()
}

/// Queues a last-use update; the writer is woken when the ring was empty (to start its delay)
/// and when a whole batch is waiting.
pub fn push_touch(dboid: pg_sys::Oid, touch: &Touch) -> Pushed {
    push(dboid, |slot| slot.touches.push(touch).map(|before| before == 0 || before + 1 == TOUCH_BATCH))
}

/// `append` returns whether the writer should be woken, or None when the ring was full.
fn push(dboid: pg_sys::Oid, mut append: impl FnMut(&mut Slot) -> Option<bool>) -> Pushed {
    with_slot(dboid, |slot, i| {
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
    .map_or(Pushed::Unavailable, |r| r.unwrap_or(Pushed::Dropped))
}

/// Spends one use of a capped token (see `pg_token_core::uses`), asking the writer for a block
/// when none is reserved. Returns the step, and a slot whose writer the caller must start.
pub fn spend_use(dboid: pg_sys::Oid, token_id: &[u8; 16], version: i64, table_remaining: i64, refills: bool) -> (Step, Option<usize>) {
    let now = clock::now();
    with_slot(dboid, |slot, i| {
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
    .flatten()
    .unwrap_or((Step::Full, None))
}

/// Marks a token family as revoked on this server and (unless `standby`) asks the writer to
/// revoke it. Returns the family's state, and a slot whose writer the caller must start.
pub fn ask_family(dboid: pg_sys::Oid, request: family::Request, standby: bool) -> (family::Asked, Option<usize>) {
    with_slot(dboid, |slot, i| {
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
    .flatten()
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

mod status;
mod writer_side;

pub use status::*;
pub use writer_side::*;
