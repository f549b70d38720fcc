//! The one way a stored token is read on the hot path: a direct scan of the hash index on
//! `token.tokens.token_hash` under the latest snapshot, with no SPI and no planning; and the
//! sequential scans that load the (small) registry tables.
//!
//! Reads use `GetLatestSnapshot()`, not the statement's snapshot, so a cache hit and a miss
//! give the same answer: the latest committed state (plus this transaction's own changes), in
//! any isolation level. A revoke committed while a REPEATABLE READ transaction runs takes
//! effect in that transaction's next call.
//!
//! Columns are read by the attribute numbers `catalog` looked up, and copied into Rust values
//! (and the prebuilt identity row) before the scan moves on. Timestamps are read as the i64
//! they are (a `TimestampTz` datum is passed by value) rather than through pgrx's
//! `TimestampWithTimeZone`, which would make a guarded call per column on the miss path.

use std::cell::{Cell, OnceCell};

use pg_token_core::hash::TokenHash;
use pg_token_core::verdict::{Micros, TokenState};
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::catalog::Catalog;
use super::Stored;
use crate::datum::form_composite;

/// A registered snapshot of the latest committed state, released on drop (or by the
/// resource owner if an error unwinds past us).
pub struct LatestSnapshot(pg_sys::Snapshot);

impl LatestSnapshot {
    pub fn take() -> Self {
        // SAFETY: GetLatestSnapshot returns a static snapshot; RegisterSnapshot copies it.
        LatestSnapshot(unsafe { pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot()) })
    }
}

impl Drop for LatestSnapshot {
    fn drop(&mut self) {
        // SAFETY: registered in `take`.
        unsafe { pg_sys::UnregisterSnapshot(self.0) };
    }
}

fn timestamp(values: &[pg_sys::Datum], nulls: &[bool], i: usize) -> Option<Micros> {
    (!nulls[i]).then(|| values[i].value() as i64)
}

pub fn text(values: &[pg_sys::Datum], nulls: &[bool], i: usize) -> Option<String> {
    // SAFETY: column i is of type text.
    unsafe { String::from_datum(values[i], nulls[i]) }
}

/// Seq-scans a small table under `snap`, handing each row's datums to `f`.
pub fn scan_all(rel_oid: pg_sys::Oid, snap: &LatestSnapshot, mut f: impl FnMut(&[pg_sys::Datum], &[bool])) {
    // SAFETY: table_open/systable scans with a registered snapshot; tuples are deformed
    // with the relation's own descriptor and used before the scan ends.
    unsafe {
        let rel = pg_sys::table_open(rel_oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        let scan = pg_sys::systable_beginscan(rel, pg_sys::InvalidOid, false, snap.0, 0, std::ptr::null_mut());
        loop {
            let tup = pg_sys::systable_getnext(scan);
            if tup.is_null() {
                break;
            }
            pg_sys::heap_deform_tuple(tup, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            f(&values, &nulls);
        }
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}

/// One scan of the hash index on token_hash. Returns the row and whether this transaction
/// wrote it. A hash index returns every entry whose hash code matches, so each candidate row's
/// token_hash is compared with ours (a real match is the first candidate all but always).
pub fn scan_token(cat: &Catalog, hash: &TokenHash) -> Option<(Stored, bool)> {
    let snap = LatestSnapshot::take();
    let a = &cat.atts;
    // SAFETY: the relation and index are opened and closed here, under AccessShareLock (held
    // to the end of the transaction); the scan uses a registered snapshot. A candidate's
    // datums point into the pinned page and are copied (into Rust values and the identity
    // datum) before the slot moves on or is dropped.
    unsafe {
        let rel = pg_sys::table_open(cat.tokens, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let index = pg_sys::index_open(cat.hash_index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let key_datum = (&hash[..]).into_datum().unwrap_or(pg_sys::Datum::from(0));
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            1, // the index's first (only) column
            pg_sys::HTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::Oid::from(pg_sys::F_BYTEAEQ),
            key_datum,
        );
        let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        // PostgreSQL 18 added an instrumentation argument (NULL: none).
        #[cfg(not(feature = "pg18"))]
        let scan = pg_sys::index_beginscan(rel, index, snap.0, 1, 0);
        #[cfg(feature = "pg18")]
        let scan = pg_sys::index_beginscan(rel, index, snap.0, std::ptr::null_mut(), 1, 0);
        pg_sys::index_rescan(scan, &mut key, 1, std::ptr::null_mut(), 0);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        let mut found = None;
        while pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
            let mut should_free = false;
            let tup = pg_sys::ExecFetchSlotHeapTuple(slot, false, &mut should_free);
            pg_sys::heap_deform_tuple(tup, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            let (v, n) = (&values[..], &nulls[..]);
            let h = a.token_hash;
            if n[h] || pgrx::varlena::varlena_to_byte_slice(v[h].cast_mut_ptr()) != &hash[..] {
                continue; // same hash code, another token
            }
            // pgrx's inline version: PostgreSQL 18 also exports a function of the same name.
            let xmin = pg_sys::submodules::htup::HeapTupleHeaderGetXmin((*tup).t_data);
            let own = pg_sys::TransactionIdIsCurrentTransactionId(xmin);
            let id = pgrx::Uuid::from_datum(v[a.id], n[a.id]).map(|u| *u.as_bytes()).unwrap_or_default();
            let scopes = Vec::<String>::from_datum(v[a.scopes], n[a.scopes]).unwrap_or_default();
            // token.identity, in its column order.
            let identity = [a.id, a.account, a.key_type, a.environment, a.scopes, a.name, a.expires_at, a.revoke_after, a.metadata]
                .map(|i| (v[i], n[i]));
            let stored = Stored {
                state: TokenState {
                    id,
                    account: text(v, n, a.account).unwrap_or_default(),
                    key_type: text(v, n, a.key_type).unwrap_or_default(),
                    environment: text(v, n, a.environment).unwrap_or_default(),
                    scopes,
                    expires_at: timestamp(v, n, a.expires_at),
                    revoke_after: timestamp(v, n, a.revoke_after),
                    revoked_at: timestamp(v, n, a.revoked_at),
                },
                identity: form_composite(cat.identity_desc, identity),
                verdict: OnceCell::new(),
                last_used_at: Cell::new(timestamp(v, n, a.last_used_at)),
            };
            found = Some((stored, own));
            break;
        }
        pg_sys::index_endscan(scan);
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        drop(snap);
        found
    }
}

/// Calls `f(values, nulls)` for every row of `rel` that the btree `index` finds equal to the
/// text `key` on its first column, under the latest committed state (plus this transaction's
/// own changes), whatever the transaction's isolation level.
pub fn scan_text_equal(rel_oid: pg_sys::Oid, index_oid: pg_sys::Oid, key: &str, mut f: impl FnMut(&[pg_sys::Datum], &[bool])) {
    let snap = LatestSnapshot::take();
    let key_datum = key.into_datum().unwrap_or(pg_sys::Datum::from(0));
    // SAFETY: as in scan_token: relation and index opened and closed here under
    // AccessShareLock, a registered snapshot, tuples used before the slot moves on. The scan
    // key compares with the index's own collation, as the btree is ordered by it.
    unsafe {
        let rel = pg_sys::table_open(rel_oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let index = pg_sys::index_open(index_oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let mut skey: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut skey,
            1,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::Oid::from(pg_sys::F_TEXTEQ),
            key_datum,
        );
        skey.sk_collation = *(*index).rd_indcollation;
        let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        #[cfg(not(feature = "pg18"))]
        let scan = pg_sys::index_beginscan(rel, index, snap.0, 1, 0);
        #[cfg(feature = "pg18")]
        let scan = pg_sys::index_beginscan(rel, index, snap.0, std::ptr::null_mut(), 1, 0);
        pg_sys::index_rescan(scan, &mut skey, 1, std::ptr::null_mut(), 0);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        while pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
            let mut should_free = false;
            let tup = pg_sys::ExecFetchSlotHeapTuple(slot, false, &mut should_free);
            pg_sys::heap_deform_tuple(tup, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            f(&values, &nulls);
        }
        pg_sys::index_endscan(scan);
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    drop(snap);
}
