//! The shared-memory queue from backends to the event writer (`worker`).
//!
//! A backend that refuses a token must leave a trace even if its transaction then rolls back,
//! and a successful validation must update `last_used_at` without writing or waiting on a row
//! lock. Both needs are met the same way: the backend copies a fixed-size `Record` into a ring
//! for its database, outside any transaction, and a background worker connected to that
//! database writes the records in its own transactions.
//!
//! Each database using pg_token claims one of `MAX_DATABASES` slots. A slot's ring holds
//! `QUEUE_LEN` records; when full, new records are dropped and counted (the event is still in
//! the server log). The queue lives in shared memory requested at postmaster start, so
//! pg_token must be in `shared_preload_libraries`.
//!
//! Never put a token in a record: records hold prefixes and 4-character hints only.

use std::ffi::CStr;
use std::mem::size_of;
use std::ptr;

use pgrx::pg_sys;

pub const MAX_DATABASES: usize = 8;
pub const QUEUE_LEN: usize = 1024;
const SHMEM_NAME: &CStr = c"pg_token";

/// A string of at most `N` bytes, cut at a character boundary.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FixedStr<const N: usize> {
    len: u16,
    present: bool,
    bytes: [u8; N],
}

impl<const N: usize> FixedStr<N> {
    pub const EMPTY: Self = FixedStr { len: 0, present: false, bytes: [0; N] };

    pub fn new(s: Option<&str>) -> Self {
        let Some(s) = s else { return Self::EMPTY };
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; N];
        bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        FixedStr { len: end as u16, present: true, bytes }
    }

    pub fn get(&self) -> Option<&str> {
        if !self.present {
            return None;
        }
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).ok()
    }
}

#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// A successful validation: set `last_used_at` of `token_id`.
    Touch = 1,
    /// A refused validation: insert an event row.
    Refused = 2,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Record {
    pub kind: Kind,
    pub reason: u8,
    pub at: i64,
    pub token_id: Option<[u8; 16]>,
    pub caller_token_id: Option<[u8; 16]>,
    pub backend_pid: i32,
    pub account: FixedStr<128>,
    pub prefix: FixedStr<32>,
    pub hint: FixedStr<40>,
    pub environment: FixedStr<32>,
    pub client_addr: FixedStr<64>,
    pub application_name: FixedStr<64>,
    pub db_user: FixedStr<64>,
    pub detail: FixedStr<200>,
}

impl Record {
    pub fn touch(token_id: [u8; 16], at: i64) -> Record {
        Record {
            kind: Kind::Touch,
            reason: 0,
            at,
            token_id: Some(token_id),
            caller_token_id: None,
            backend_pid: 0,
            account: FixedStr::EMPTY,
            prefix: FixedStr::EMPTY,
            hint: FixedStr::EMPTY,
            environment: FixedStr::EMPTY,
            client_addr: FixedStr::EMPTY,
            application_name: FixedStr::EMPTY,
            db_user: FixedStr::EMPTY,
            detail: FixedStr::EMPTY,
        }
    }
}

#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Stopped = 0,
    Starting = 1,
    Running = 2,
}

#[repr(C)]
struct Slot {
    dboid: pg_sys::Oid,
    state: WorkerState,
    worker_pid: i32,
    latch: *mut pg_sys::Latch,
    /// Sequence numbers: `head` is the next to write, `tail` the next to read. The worker
    /// moves `tail` only after the records are committed, so `tail` is also "written".
    head: u64,
    tail: u64,
    dropped: u64,
    /// Consecutive abnormal worker exits; after three, the batch at the tail is discarded.
    failures: u32,
    records: [Record; QUEUE_LEN],
}

#[repr(C)]
struct Shared {
    lock: *mut pg_sys::LWLock,
    slots: [Slot; MAX_DATABASES],
}

// SAFETY: set once per process in the shmem startup hook (postmaster, inherited by fork), and
// read-only afterwards; every access to the pointee goes through `Shared::lock`.
static mut SHARED: *mut Shared = ptr::null_mut();
static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

/// Installs the shared-memory hooks. Only meaningful while shared_preload_libraries loads us.
pub fn install_hooks() {
    // SAFETY: _PG_init runs once per process, before any concurrent access; chaining the
    // previous hooks keeps other extensions working.
    unsafe {
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: called by the postmaster at the documented point for shared memory requests.
    unsafe {
        if let Some(prev) = PREV_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(size_of::<Shared>());
        pg_sys::RequestNamedLWLockTranche(SHMEM_NAME.as_ptr(), 1);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: standard add-in initialization under AddinShmemInitLock (MainLWLockArray[21]);
    // an all-zero `Shared` is a valid empty state (Stopped slots, empty rings).
    unsafe {
        if let Some(prev) = PREV_STARTUP_HOOK {
            prev();
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let shared = pg_sys::ShmemInitStruct(SHMEM_NAME.as_ptr(), size_of::<Shared>(), &mut found)
            .cast::<Shared>();
        if !found {
            ptr::write_bytes(shared.cast::<u8>(), 0, size_of::<Shared>());
            (*shared).lock = &raw mut (*pg_sys::GetNamedLWLockTranche(SHMEM_NAME.as_ptr())).lock;
        }
        SHARED = shared;
        pg_sys::LWLockRelease(init_lock);
    }
}

/// Whether the queue exists (pg_token was preloaded).
pub fn available() -> bool {
    // SAFETY: a plain read of a pointer written once at startup.
    unsafe { !SHARED.is_null() }
}

/// Runs `f` on the shared state under the queue lock. `f` must not raise an error.
fn locked<R>(f: impl FnOnce(&mut Shared) -> R) -> Option<R> {
    // SAFETY: SHARED points into shared memory sized for `Shared`; the LWLock serializes
    // all access, and Postgres releases it on error (LWLockReleaseAll) should one escape.
    unsafe {
        let shared = SHARED;
        if shared.is_null() {
            return None;
        }
        pg_sys::LWLockAcquire((*shared).lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let r = f(&mut *shared);
        pg_sys::LWLockRelease((*shared).lock);
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
        .position(|s| s.state == WorkerState::Stopped && (s.head == s.tail || s.failures >= 3))?;
    let s = &mut shared.slots[i];
    s.dropped += s.head - s.tail;
    s.tail = s.head;
    s.dboid = dboid;
    s.failures = 0;
    Some(i)
}

pub fn push(dboid: pg_sys::Oid, record: &Record) -> Pushed {
    locked(|shared| {
        let Some(i) = slot_for(shared, dboid, true) else { return Pushed::Dropped };
        let slot = &mut shared.slots[i];
        if slot.head - slot.tail >= QUEUE_LEN as u64 {
            slot.dropped += 1;
            return Pushed::Dropped;
        }
        let was_empty = slot.head == slot.tail;
        slot.records[(slot.head % QUEUE_LEN as u64) as usize] = *record;
        slot.head += 1;
        match slot.state {
            WorkerState::Stopped => {
                slot.state = WorkerState::Starting;
                Pushed::QueuedStartWorker(i)
            }
            WorkerState::Starting => Pushed::Queued,
            WorkerState::Running => {
                // Wake the writer only when the queue was empty: it sleeps only after finding
                // it empty, and re-reads it after every batch, so later records need no
                // signal. (Setting a latch the writer waits on costs a syscall; one per
                // validation was most of a cache miss's cost.)
                if was_empty {
                    // SAFETY: the latch belongs to the running worker's PGPROC, in shared memory.
                    unsafe { pg_sys::SetLatch(slot.latch) };
                }
                Pushed::Queued
            }
        }
    })
    .unwrap_or(Pushed::Unavailable)
}

/// Asks a running writer to wake up, or reports that one must be started.
pub fn nudge(dboid: pg_sys::Oid) -> Option<usize> {
    locked(|shared| {
        let i = slot_for(shared, dboid, false)?;
        let slot = &mut shared.slots[i];
        match slot.state {
            WorkerState::Stopped if slot.head > slot.tail => {
                slot.state = WorkerState::Starting;
                Some(i)
            }
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

/// The head sequence number for a database: everything queued so far.
pub fn head(dboid: pg_sys::Oid) -> Option<u64> {
    locked(|shared| slot_for(shared, dboid, false).map(|i| shared.slots[i].head)).flatten()
}

/// Whether everything up to `seq` has been committed by the writer.
pub fn written_up_to(dboid: pg_sys::Oid, seq: u64) -> bool {
    locked(|shared| slot_for(shared, dboid, false).is_none_or(|i| shared.slots[i].tail >= seq)).unwrap_or(true)
}

pub struct SlotStatus {
    pub database: pg_sys::Oid,
    pub worker_pid: Option<i32>,
    pub queued: u64,
    pub written: u64,
    pub dropped: u64,
}

pub fn status() -> Vec<SlotStatus> {
    locked(|shared| {
        shared
            .slots
            .iter()
            .filter(|s| s.dboid != pg_sys::InvalidOid)
            .map(|s| SlotStatus {
                database: s.dboid,
                worker_pid: (s.state == WorkerState::Running).then_some(s.worker_pid),
                queued: s.head - s.tail,
                written: s.tail,
                dropped: s.dropped,
            })
            .collect()
    })
    .unwrap_or_default()
}

// ---- The worker's side ----

/// Called by the writer once connected: takes ownership of the slot. Returns its database and
/// whether the previous writers failed repeatedly (the caller then skips the batch at the tail).
pub fn worker_attach(slot: usize) -> Option<(pg_sys::Oid, bool)> {
    locked(|shared| {
        let s = shared.slots.get_mut(slot)?;
        s.state = WorkerState::Running;
        // SAFETY: MyProcPid and MyLatch are this process's own, valid for its lifetime.
        unsafe {
            s.worker_pid = pg_sys::MyProcPid;
            s.latch = pg_sys::MyLatch;
        }
        let poisoned = s.failures >= 3;
        if poisoned {
            let skip = (s.head - s.tail).min(BATCH as u64);
            s.tail += skip;
            s.dropped += skip;
            s.failures = 0;
        }
        Some((s.dboid, poisoned))
    })
    .flatten()
}

pub fn worker_database(slot: usize) -> Option<pg_sys::Oid> {
    locked(|shared| shared.slots.get(slot).map(|s| s.dboid)).flatten()
}

/// Records taken per transaction.
pub const BATCH: usize = 512;

/// Copies up to `BATCH` records from the tail without consuming them.
pub fn worker_peek(slot: usize, out: &mut Vec<Record>) {
    out.clear();
    locked(|shared| {
        let s = &shared.slots[slot];
        let n = (s.head - s.tail).min(BATCH as u64);
        for seq in s.tail..s.tail + n {
            out.push(s.records[(seq % QUEUE_LEN as u64) as usize]);
        }
    });
}

/// Consumes `n` records after they were committed.
pub fn worker_consumed(slot: usize, n: usize) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        s.tail += n as u64;
        s.failures = 0;
    });
}

/// Leaves the slot if nothing is queued; returns false (stay) if records arrived meanwhile.
pub fn worker_try_detach(slot: usize) -> bool {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        if s.head != s.tail {
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
                    s.failures += 1;
                }
            }
        }
    });
}
