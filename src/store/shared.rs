//! The validation cache every backend of a primary shares (`pg_token_core::shared`), in shared
//! memory of `token.shared_cache_size`: a token another backend read lately costs this one a
//! copy of its row and no index scan.
//!
//! It holds token rows as the table stores them (the heap tuple's bytes), under the key the
//! per-backend cache uses, scoped to this database and this incarnation of token.tokens (its
//! OID and the transaction that last wrote its pg_class row: a dropped and recreated table, or
//! an ALTER TABLE, never meets the old rows). A hit is deformed with the table's own descriptor
//! and built into a `Stored` exactly as a row read by the index scan is.
//!
//! It is used only where the change log keeps it exact (`changes::targeted`: a primary with
//! pg_token in shared_preload_libraries), never by a transaction that changed a token itself
//! (its own change is not in the shared table and must win), and never for a row this
//! transaction wrote or whose value lives in TOAST. `changes` removes what each commit changed,
//! after publishing it and before releasing its claim; see `pg_token_core::shared` for why no
//! entry can answer from before a visible commit.

use std::cell::UnsafeCell;
use std::ffi::CStr;
use std::ptr;

use pg_token_core::hash::TokenHash;
use pg_token_core::shared::{Bucket, Fill, Header, SharedCache, WORDS};
use pgrx::pg_sys;
use pgrx::PgSharedMemoryInitialization;

use super::{changes, Catalog};
use crate::events::queue::Zeroed;
use crate::guc;
use crate::metrics;

const SHMEM_NAME: &CStr = c"pg_token shared cache";

pub struct Shared {
    /// The header, followed by the buckets; null without shared memory.
    header: UnsafeCell<*mut Header>,
    buckets: UnsafeCell<usize>,
}

// SAFETY: written once, in the postmaster's shmem startup hook, before any backend exists;
// what they point to is atomics.
unsafe impl Sync for Shared {}

static SHARED: Shared = Shared { header: UnsafeCell::new(ptr::null_mut()), buckets: UnsafeCell::new(0) };

/// The bytes asked for: the header and whole buckets, never more than the setting.
fn size() -> usize {
    let buckets = SharedCache::buckets_for(guc::shared_cache_bytes());
    if buckets == 0 {
        return 0;
    }
    std::mem::size_of::<Header>() + buckets * std::mem::size_of::<Bucket>()
}

impl PgSharedMemoryInitialization for Shared {
    type Value = Zeroed;

    unsafe fn on_shmem_request(&'static self) {
        // SAFETY: called at the documented point for shared memory requests.
        unsafe { pg_sys::RequestAddinShmemSpace(size()) };
    }

    unsafe fn on_shmem_startup(&'static self, _value: Zeroed) {
        let bytes = size();
        if bytes == 0 {
            return;
        }
        // SAFETY: the standard add-in initialization under AddinShmemInitLock; all-zero is an
        // empty table; the pointers are written once, before any backend exists.
        unsafe {
            let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
            pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let mut found = false;
            let area = pg_sys::ShmemInitStruct(SHMEM_NAME.as_ptr(), bytes, &mut found).cast::<u8>();
            if !found {
                ptr::write_bytes(area, 0, bytes);
            }
            pg_sys::LWLockRelease(init_lock);
            *self.header.get() = area.cast::<Header>();
            *self.buckets.get() = SharedCache::buckets_for(bytes);
        }
    }
}

/// Asks for the table's shared memory; from _PG_init while shared_preload_libraries loads us.
pub fn init_shared_memory() {
    use pgrx::prelude::*;
    pgrx::pg_shmem_init!(SHARED = Zeroed);
}

fn table() -> Option<SharedCache<'static>> {
    // SAFETY: plain reads of values written once at startup; the area lives as long as the
    // server, and its buckets follow the header (both laid out by `on_shmem_startup`).
    unsafe {
        let header = (*SHARED.header.get()).as_ref()?;
        let first = (header as *const Header).add(1).cast::<Bucket>();
        Some(SharedCache::new(header, std::slice::from_raw_parts(first, *SHARED.buckets.get())))
    }
}

/// The table, when this call may use it: it exists, `token.shared_cache` is on, the change log
/// keeps it exact here, and this transaction changed no token.
pub fn usable() -> Option<SharedCache<'static>> {
    let t = table()?;
    (t.capacity() > 0 && guc::SHARED_CACHE.get() && changes::targeted() && !changes::own_pending()).then_some(t)
}

/// Entries the table can hold (0 without it).
pub fn capacity() -> usize {
    table().map_or(0, |t| t.capacity())
}

/// The row kept under `key`, built as the index scan builds it, if its token is still current
/// after the copy (not in flight, nothing published since `seen`).
pub fn get(t: SharedCache<'static>, cat: &Catalog, key: &TokenHash, seen: u64) -> Option<super::Stored> {
    let mut row = [0u64; WORDS];
    let (len, touched) = t.get(key, cat.shared_scope, &mut row)?;
    if !changes::still_current(key, seen) {
        return None;
    }
    metrics::shared_hit();
    // SAFETY: `row` holds a heap tuple of token.tokens, copied whole (no TOAST pointers) from
    // a tuple of the table's current definition (the scope names it), 8-byte aligned.
    let stored = unsafe { super::scan::stored_from_tuple(cat, row.as_mut_ptr().cast(), len) };
    // The row's last_used_at is as old as the copy; a use queued since by any backend is newer.
    if let Ok(at) = i64::try_from(touched) {
        if at > 0 && stored.last_used_at.get().is_none_or(|t| t < at) {
            stored.last_used_at.set(Some(at));
        }
    }
    Some(stored)
}

/// A last use of `stored` was queued at `at`: noted in its shared entry, so that the backends
/// that take its row from there next do not queue another within the interval.
pub fn touched(stored: &super::Stored, at: i64) {
    let (Some(t), Some((key, scope)), Ok(at)) = (table(), stored.shared_key.as_ref(), u64::try_from(at)) else { return };
    t.touch(key, *scope, at);
}

/// Keeps a row read from the table, unless anything was published since `seen` (checked
/// under the bucket's lock) or the epoch left `epoch`.
pub fn fill(t: SharedCache<'static>, cat: &Catalog, key: &TokenHash, epoch: u64, seen: u64, row: &[u8]) {
    if let Fill::Filled { .. } = t.fill(key, cat.shared_scope, epoch, row, || changes::still_current(key, seen)) {
        metrics::shared_fill();
    }
}

/// Drops what a commit changed (after it was published, before its claim is released).
pub fn forget(fingerprints: &[u64], everything: bool) {
    let Some(t) = table() else { return };
    if everything {
        t.forget_all();
    } else {
        for &fp in fingerprints {
            t.forget(fp);
        }
    }
}
