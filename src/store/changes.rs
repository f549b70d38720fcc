//! Targeted, gap-free cache invalidation on the primary: the shared-memory change log of
//! `pg_token_core::changes`, fed by the triggers on pg_token's tables and read by every
//! validation.
//!
//! A transaction that changes a token notes its fingerprints (its hash, and the key it is
//! cached under as a parent) in `note_token_change`, a row trigger; a registry change or a
//! truncation notes everything (`invalidate_caches`). At commit, the transaction
//! claims what it noted as in flight (`XACT_EVENT_PRE_COMMIT`, before the commit is visible),
//! publishes it once the commit is visible (`XACT_EVENT_COMMIT`), then releases the claim. So a
//! backend drops only the entries that changed, and never answers from a cached entry while
//! its change is visible but not yet published (`store::Backend` checks both on every hit).
//! The changing backend drops its own entries at once, and everything it read on abort. The
//! shared cache (`shared`) loses what a commit changed between publication and release.
//!
//! The triggers still queue Postgres' invalidation message for `token.cache_signal`: standbys
//! replay it and empty their caches (no trigger runs there), and it is the whole mechanism
//! when pg_token is not in `shared_preload_libraries` (no shared memory). On a primary with the
//! log, `freshness` ignores it.
//!
//! Never: raise from the commit or abort callbacks (only the prepare refusal raises), hold the
//! claim past the end of the transaction, or publish before the commit is visible.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::ffi::CStr;
use std::mem::size_of;
use std::ptr;

use pg_token_core::changes::{fingerprint, id_key, stands_for_everything, ChangeLog, Claim, Since, EVERYTHING, MAX_NAMED};
use pg_token_core::hash::TokenHash;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSharedMemoryInitialization;

use crate::error;
use crate::events::queue::{attach_zeroed, Zeroed};
use crate::guc;

const SHMEM_NAME: &CStr = c"pg_token change log";

pub struct SharedLog {
    log: UnsafeCell<*mut ChangeLog>,
}

// SAFETY: the pointer is written once, in the postmaster's shmem startup hook, before any
// backend exists; what it points to is atomics.
unsafe impl Sync for SharedLog {}

static SHARED: SharedLog = SharedLog { log: UnsafeCell::new(ptr::null_mut()) };

impl PgSharedMemoryInitialization for SharedLog {
    type Value = Zeroed;

    unsafe fn on_shmem_request(&'static self) {
        // SAFETY: called at the documented point for shared memory requests.
        unsafe { pg_sys::RequestAddinShmemSpace(size_of::<ChangeLog>()) };
    }

    unsafe fn on_shmem_startup(&'static self, _value: Zeroed) {
        // SAFETY: an all-zero ChangeLog is empty, nothing in flight; the pointer is written once, before any backend exists.
        unsafe {
            *self.log.get() = attach_zeroed::<ChangeLog>(SHMEM_NAME, |_| {});
        }
    }
}

/// Asks for the log's shared memory; from _PG_init while shared_preload_libraries loads us.
pub fn init_shared_memory() {
    pgrx::pg_shmem_init!(SHARED = Zeroed);
}

fn log() -> Option<&'static ChangeLog> {
    // SAFETY: a plain read of a pointer written once at startup; the log lives as long as the
    // server.
    unsafe { (*SHARED.log.get()).as_ref() }
}

/// Whether this backend's caches follow the log (a primary with the shared memory), rather than
/// Postgres' invalidation messages for token.cache_signal. Safe in a relcache callback.
pub fn targeted() -> bool {
    // SAFETY: reads shared recovery state; no allocation, no error.
    log().is_some() && !unsafe { pg_sys::RecoveryInProgress() }
}

/// What this transaction changed, and what this backend must drop from its own cache.
#[derive(Default)]
struct Pending {
    /// At most MAX_NAMED + 1: more, or EVERYTHING among them, and the log treats them as
    /// everything (`ChangeLog::claim` and `publish` decide).
    fingerprints: Vec<u64>,
    claim: Option<Claim>,
}

thread_local! {
    static PENDING: RefCell<Pending> = RefCell::new(Pending::default());
    /// Fingerprints this backend's own cache must drop at the next call (its own changes,
    /// seen at once; everything read during an aborted change). EVERYTHING in it: everything.
    static OWN: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

fn note(fps: impl IntoIterator<Item = u64>) {
    register_once();
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        OWN.with(|o| {
            let mut o = o.borrow_mut();
            for fp in fps {
                if p.fingerprints.len() <= MAX_NAMED {
                    p.fingerprints.push(fp);
                }
                if o.len() < MAX_NAMED {
                    o.push(fp);
                } else {
                    *o = vec![EVERYTHING];
                }
            }
        });
    });
}

/// This transaction changed a token (its hash and id): its entries must go everywhere.
pub fn note_token(hash: &TokenHash, id: &[u8; 16]) {
    note([fingerprint(hash), fingerprint(&id_key(id))]);
}

/// This transaction changed what every verdict may depend on.
pub fn note_everything() {
    note([EVERYTHING]);
}

/// What this backend's cache must drop now: fingerprints, EVERYTHING for everything.
pub fn take_own(mut each: impl FnMut(u64)) {
    let own = OWN.with(|o| std::mem::take(&mut *o.borrow_mut()));
    for fp in own {
        each(fp);
    }
}

/// Whether this transaction changed a token or the registry (its own changes are not in the
/// shared cache, and must win over what is).
pub fn own_pending() -> bool {
    PENDING.with(|p| !p.borrow().fingerprints.is_empty())
}

/// Entries published so far (0 without the log).
pub fn published() -> u64 {
    log().map_or(0, ChangeLog::published)
}

/// Reads the log from `seen`: fingerprints to `each`, or `Since::Everything`.
pub fn since(seen: u64, each: impl FnMut(u64)) -> Since {
    match log() {
        Some(l) => l.since(seen, each),
        None => Since::Nothing,
    }
}

/// Whether a cached entry under `key`, filled or last checked when the log stood at `seen`,
/// may answer: its token is not being committed and nothing was published since.
pub fn still_current(key: &TokenHash, seen: u64) -> bool {
    match log() {
        // The in-flight check comes first: a change that is no longer in flight was published
        // before the claim was released, so the second load sees it.
        Some(l) => !l.in_flight(fingerprint(key)) && l.published() == seen,
        None => true,
    }
}

fn register_once() {
    if REGISTERED.with(|r| r.replace(true)) {
        return;
    }
    // SAFETY: documented registration APIs; the commit/abort paths never raise.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), ptr::null_mut());
        pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => pre_commit(),
        XACT_EVENT_COMMIT => end(true),
        XACT_EVENT_ABORT => end(false),
        XACT_EVENT_PRE_PREPARE => {
            if PENDING.with(|p| !p.borrow().fingerprints.is_empty()) {
                error::fail(
                    error::Kind::FeatureNotSupported,
                    "cannot PREPARE a transaction that changed pg_token's tokens or registry".into(),
                    Some("Commit it directly: caches are told about a change when it commits."),
                );
            }
        }
        _ => {}
    }
}

fn pre_commit() {
    let Some(l) = log() else { return };
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        if p.fingerprints.is_empty() || p.claim.is_some() {
            return;
        }
        p.claim = Some(l.claim(&p.fingerprints));
    });
}

/// At commit (visible by now): publish, then release. At abort: release, and drop from this
/// backend's cache what it may have read of its own changes.
fn end(committed: bool) {
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if pending.fingerprints.is_empty() {
        return;
    }
    if let Some(l) = log() {
        if committed {
            hold_for_test();
            l.publish(&pending.fingerprints);
            super::shared::forget(&pending.fingerprints, stands_for_everything(&pending.fingerprints));
        }
        if let Some(c) = pending.claim {
            l.release(c);
        }
    }
    if !committed {
        OWN.with(|o| *o.borrow_mut() = vec![EVERYTHING]);
    }
}

/// `token.test_commit_publish_delay`: a test build's way to hold the window between a commit
/// becoming visible and its publication open (tests/e2e/test_cache.py). 0 in production.
fn hold_for_test() {
    let ms = guc::TEST_COMMIT_PUBLISH_DELAY_MS.get();
    if ms > 0 {
        // SAFETY: a plain sleep; nothing is held that others wait for but our claim.
        unsafe { pg_sys::pg_usleep(i64::from(ms) * 1000) };
    }
}

/// A backend that exits holding a claim (a FATAL between pre-commit and commit) publishes
/// everything and releases it: never a claim left behind, never a change unannounced.
#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if let (Some(l), Some(c)) = (log(), pending.claim) {
        l.publish(&[EVERYTHING]);
        super::shared::forget(&[], true);
        l.release(c);
    }
}

/// Row trigger on token.tokens (UPDATE of a column verdicts read, DELETE; and the replica
/// triggers for logical replication's apply worker): notes the old row's token, and queues the
/// invalidation standbys replay.
#[pg_trigger]
fn note_token_change<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let old = trigger.old();
    let parts = old.as_ref().map(|row| {
        let hash: Option<TokenHash> = row.get_by_name::<&[u8]>("token_hash").ok().flatten().and_then(|h| h.try_into().ok());
        let id: Option<pgrx::Uuid> = row.get_by_name("id").ok().flatten();
        (hash, id)
    });
    match parts {
        Some((Some(hash), Some(id))) => note_token(&hash, id.as_bytes()),
        // Not a row we can name (it should not happen): everything goes.
        _ => note_everything(),
    }
    signal_standbys();
    Ok(None)
}

/// Queues the relcache invalidation for token.cache_signal, which every backend (standbys
/// included) receives when the transaction commits, and this backend at once.
pub fn signal_standbys() {
    let ns = super::catalog::token_namespace();
    let signal = super::catalog::relid(ns, c"cache_signal");
    // SAFETY: registers a transactional invalidation message for an existing relation.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(signal) };
}

/// Statement trigger on pg_token's registry tables and on TRUNCATE of token.tokens (and row
/// trigger, for logical replication's apply worker): every cached verdict may have changed.
#[pg_trigger]
fn invalidate_caches<'a>(
    _trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    note_everything();
    signal_standbys();
    Ok(None)
}
