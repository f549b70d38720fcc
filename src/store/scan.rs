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
use pg_token_core::network::Network;
use pg_token_core::ratelimit::RateLimit;
use pg_token_core::verdict::{Micros, TokenState, Uses};
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::catalog::Catalog;
use super::Stored;
use crate::datum::{deform_composite, form_composite};

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

/// A row read from token.tokens: as this backend keeps it, whether this transaction wrote it,
/// and (when asked for, and it fits) the heap tuple's bytes for the shared cache.
pub struct Scanned {
    pub stored: Stored,
    pub own: bool,
    pub row: Option<Vec<u8>>,
}

/// One scan of the hash index on token_hash. A hash index returns every entry whose hash code
/// matches, so each candidate row's token_hash is compared with ours (a real match is the
/// first candidate all but always).
pub fn scan_token(cat: &Catalog, hash: &TokenHash, keep_row: bool) -> Option<Scanned> {
    let key = (&hash[..]).into_datum().unwrap_or(pg_sys::Datum::from(0));
    let h = cat.atts.token_hash;
    // SAFETY: token_hash is a bytea column; the datum points into the pinned tuple.
    let same = |v: &[pg_sys::Datum], n: &[bool]| !n[h] && unsafe { pgrx::varlena::varlena_to_byte_slice(v[h].cast_mut_ptr()) } == &hash[..];
    scan_one(cat, cat.hash_index, pg_sys::HTEqualStrategyNumber, pg_sys::F_BYTEAEQ, key, same, keep_row)
}

/// A token by id, through the primary key (a derived token's parents are found this way).
pub fn scan_token_by_id(cat: &Catalog, id: &[u8; 16], keep_row: bool) -> Option<Scanned> {
    let key = pgrx::Uuid::from_bytes(*id).into_datum().unwrap_or(pg_sys::Datum::from(0));
    scan_one(cat, cat.id_index, pg_sys::BTEqualStrategyNumber, pg_sys::F_UUID_EQ, key, |_, _| true, keep_row)
}

/// The first row of token.tokens that `index` finds equal to `key` and `want` accepts, read
/// under the latest committed state.
fn scan_one(
    cat: &Catalog,
    index_oid: pg_sys::Oid,
    strategy: u32,
    proc: u32,
    key_datum: pg_sys::Datum,
    want: impl Fn(&[pg_sys::Datum], &[bool]) -> bool,
    keep_row: bool,
) -> Option<Scanned> {
    let snap = LatestSnapshot::take();
    // SAFETY: the relation and index are opened and closed here, under AccessShareLock (held
    // to the end of the transaction); the scan uses a registered snapshot. A candidate's
    // datums point into the pinned page and are copied (into Rust values and the identity
    // datum) before the slot moves on or is dropped.
    unsafe {
        let rel = pg_sys::table_open(cat.tokens, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let index = pg_sys::index_open(index_oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            1, // the index's first (only) column
            strategy as pg_sys::StrategyNumber,
            pg_sys::Oid::from(proc),
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
            if !want(&values, &nulls) {
                continue; // same hash code, another token
            }
            // pgrx's inline version: PostgreSQL 18 also exports a function of the same name.
            let xmin = pg_sys::submodules::htup::HeapTupleHeaderGetXmin((*tup).t_data);
            let own = pg_sys::TransactionIdIsCurrentTransactionId(xmin);
            let t = &*tup;
            let whole = t.t_len as usize <= pg_token_core::shared::PAYLOAD
                && (*t.t_data).t_infomask & pg_sys::HEAP_HASEXTERNAL as u16 == 0;
            let row = (keep_row && !own && whole)
                .then(|| std::slice::from_raw_parts(t.t_data.cast::<u8>(), t.t_len as usize).to_vec());
            found = Some(Scanned { stored: stored_from_row(cat, &values, &nulls), own, row });
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

/// A token row kept by the shared cache, built as `scan_one` builds a row it read.
///
/// # Safety
/// `data` points to `len` bytes of a heap tuple of token.tokens as the table's current
/// definition (`cat.tokens_desc`) stores it, without TOAST pointers, aligned as a tuple is.
pub unsafe fn stored_from_tuple(cat: &Catalog, data: *mut pg_sys::HeapTupleHeaderData, len: usize) -> Stored {
    // SAFETY: per the contract; the datums point into `data`, which outlives their use here
    // (stored_from_row copies what it keeps).
    unsafe {
        let mut tup: pg_sys::HeapTupleData = std::mem::zeroed();
        tup.t_len = len as u32;
        tup.t_tableOid = cat.tokens;
        tup.t_data = data;
        let natts = (*cat.tokens_desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        pg_sys::heap_deform_tuple(&mut tup, cat.tokens_desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        stored_from_row(cat, &values, &nulls)
    }
}

/// A token row as this backend keeps it: the verdict inputs copied into Rust values, and the
/// identity row built from the row's columns.
///
/// # Safety
/// `v`/`n` are a deformed row of token.tokens whose by-reference datums are still valid.
unsafe fn stored_from_row(cat: &Catalog, v: &[pg_sys::Datum], n: &[bool]) -> Stored {
    let a = &cat.atts;
    let opt = |i: Option<usize>| i.filter(|i| !n[*i]);
    // SAFETY: per the contract; each column is read as its declared type.
    unsafe {
        let uuid = |i: usize| pgrx::Uuid::from_datum(v[i], n[i]).map(|u| *u.as_bytes());
        let scopes = Vec::<String>::from_datum(v[a.scopes], n[a.scopes]).unwrap_or_default();
        let uses = opt(a.uses_remaining).map(|i| Uses {
            version: a.uses_version.filter(|j| !n[*j]).map_or(0, |j| v[j].value() as i64),
            remaining: v[i].value() as i64,
            refills: a.refill_uses.is_some_and(|j| !n[j]),
        });
        // token.identity, in its column order: 0.1.0's nine, then (0.2.0) the parent and the
        // per-call columns, NULL here and filled in by each call that has them.
        let mut identity: Vec<(pg_sys::Datum, bool)> =
            [a.id, a.account, a.key_type, a.environment, a.scopes, a.name, a.expires_at, a.revoke_after, a.metadata]
                .map(|i| (v[i], n[i]))
                .to_vec();
        let natts = (*cat.identity_desc).natts as usize;
        if natts > identity.len() {
            identity.push(a.parent_id.map_or((pg_sys::Datum::from(0), true), |i| (v[i], n[i])));
        }
        identity.resize(natts, (pg_sys::Datum::from(0), true));
        Stored {
            state: TokenState {
                id: uuid(a.id).unwrap_or_default(),
                account: text(v, n, a.account).unwrap_or_default(),
                key_type: text(v, n, a.key_type).unwrap_or_default(),
                environment: text(v, n, a.environment).unwrap_or_default(),
                scopes,
                expires_at: timestamp(v, n, a.expires_at),
                revoke_after: timestamp(v, n, a.revoke_after),
                revoked_at: timestamp(v, n, a.revoked_at),
                disabled_at: a.disabled_at.and_then(|i| timestamp(v, n, i)),
                parent_id: opt(a.parent_id).and_then(uuid),
                networks: opt(a.allowed_networks).map(|i| networks(v[i])),
                rate_limits: opt(a.rate_limits).map(|i| rate_limits(cat, v[i])),
                uses,
                legacy: None,
                family_id: opt(a.family_id).and_then(uuid),
                family_revoked_at: a.family_revoked_at.and_then(|i| timestamp(v, n, i)),
            },
            identity: form_composite(cat.identity_desc, identity),
            verdict: OnceCell::new(),
            last_used_at: Cell::new(timestamp(v, n, a.last_used_at)),
            shared_key: None,
        }
    }
}

/// The elements of a one-dimensional array datum of `elem_type`, as (datum, isnull) pairs that
/// point into the (detoasted) array.
///
/// # Safety
/// `datum` is a non-NULL array of `elem_type`.
unsafe fn array_elements(datum: pg_sys::Datum, elem_type: pg_sys::Oid) -> Vec<(pg_sys::Datum, bool)> {
    // SAFETY: per the contract; deconstruct_array pallocs its outputs in the current context.
    unsafe {
        let arr = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
        let (mut len, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
        pg_sys::get_typlenbyvalalign(elem_type, &mut len, &mut byval, &mut align);
        let mut elems: *mut pg_sys::Datum = std::ptr::null_mut();
        let mut nulls: *mut bool = std::ptr::null_mut();
        let mut count = 0;
        pg_sys::deconstruct_array(arr, elem_type, i32::from(len), byval, align, &mut elems, &mut nulls, &mut count);
        let count = usize::try_from(count).unwrap_or(0);
        if count == 0 {
            return Vec::new();
        }
        let e = std::slice::from_raw_parts(elems, count);
        let m = std::slice::from_raw_parts(nulls, count);
        e.iter().copied().zip(m.iter().copied()).collect()
    }
}

/// A `cidr[]` column: each element is Postgres' inet struct (family, bits, 4 or 16 address
/// bytes). Unreadable elements are left out; a list with none left allows nobody.
///
/// # Safety
/// `datum` is a non-NULL cidr[].
pub unsafe fn networks(datum: pg_sys::Datum) -> Vec<Network> {
    const PGSQL_AF_INET: u8 = 2; // AF_INET + 0, as utils/inet.h has it
    const PGSQL_AF_INET6: u8 = 3;
    // SAFETY: per the contract; each element is a varlena inet struct.
    unsafe {
        array_elements(datum, pg_sys::CIDROID)
            .into_iter()
            .filter(|(_, null)| !null)
            .filter_map(|(d, _)| {
                let b = pgrx::varlena::varlena_to_byte_slice(d.cast_mut_ptr());
                match b {
                    [PGSQL_AF_INET, bits, rest @ ..] if rest.len() >= 4 => Network::new(false, *bits, &rest[..4]),
                    [PGSQL_AF_INET6, bits, rest @ ..] if rest.len() >= 16 => Network::new(true, *bits, &rest[..16]),
                    _ => None,
                }
            })
            .collect()
    }
}

/// A `token.rate_limit[]` column.
///
/// # Safety
/// `datum` is a non-NULL token.rate_limit[].
pub unsafe fn rate_limits(cat: &Catalog, datum: pg_sys::Datum) -> Vec<RateLimit> {
    // SAFETY: per the contract; each element is a composite datum of token.rate_limit
    // (integer, interval), deformed with that type's descriptor.
    unsafe {
        array_elements(datum, cat.rate_limit_type)
            .into_iter()
            .filter(|(_, null)| !null)
            .map(|(d, _)| {
                let p = d.cast_mut_ptr::<pg_sys::varlena>();
                let bytes = std::slice::from_raw_parts(p.cast::<u8>(), pgrx::varlena::varsize_any(p));
                let cols = deform_composite(bytes, cat.rate_limit_desc);
                let requests = cols.first().filter(|c| !c.1).map_or(0, |c| i64::from(c.0.value() as i32));
                let window = cols.get(1).filter(|c| !c.1).map_or(0, |c| {
                    let iv = &*c.0.cast_mut_ptr::<pg_sys::Interval>();
                    iv.time
                        .saturating_add(i64::from(iv.day).saturating_mul(86_400_000_000))
                        .saturating_add(i64::from(iv.month).saturating_mul(30 * 86_400_000_000))
                });
                RateLimit::from_stored(requests, window)
            })
            .collect()
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
