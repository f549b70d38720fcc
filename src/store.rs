//! What this backend knows about tokens, and the one way a stored token is read on the hot
//! path: a direct index scan of `token.tokens` by hash, under a fresh MVCC snapshot.
//!
//! # Freshness
//! The validation cache (`cache`) and the prefix/key-type registry are dropped whenever
//! Postgres delivers a relcache invalidation for `token.cache_signal`, an empty composite
//! type that nothing but pg_token's triggers invalidates. Statement triggers on
//! `token.tokens`, `token.key_types` and `token.prefixes` (`invalidate_caches`, ENABLE ALWAYS,
//! so they also fire for logical replication and restores) queue that invalidation for every
//! change except the worker's `last_used_at` writes. Invalidations of the tables themselves
//! (DDL, and every VACUUM and ANALYZE, which the writer's updates make frequent) only make us
//! look the catalog up again; the cache goes too if a table was replaced (new OID). We chose
//! Postgres' own invalidation messages over a shared-memory change counter because they are:
//! - transactional: sent only when the changing transaction commits, locally applied at each
//!   command boundary and undone on abort, so no backend drops its cache for a change that
//!   never happens, and the changing session sees its own change at once;
//! - replayed on hot standbys from the commit record, so a revoke on the primary also
//!   empties the standbys' caches (a counter in the primary's shared memory would not reach
//!   them);
//! - processed by `AcceptInvalidationMessages()`, which costs one shared-memory read when
//!   nothing is pending; every call makes it first.
//!
//! The price: any change empties every backend's cache (not just the changed token's entry).
//! Revokes and rotations are rare next to validations, so this is cheap in practice.
//!
//! # Snapshots
//! Reads use `GetLatestSnapshot()`, not the statement's snapshot, so a cache hit and a miss
//! give the same answer: the latest committed state (plus this transaction's own changes), in
//! any isolation level. A revoke committed while a REPEATABLE READ transaction runs takes
//! effect in that transaction's next call. An entry is not cached when it was read from this
//! transaction's own uncommitted insert (it may roll back), or when an invalidation arrived
//! during the read.
//!
//! The relcache callback only bumps counters; the cache is emptied at the start of the next
//! call, never under a caller's feet.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use crate::cache::{heap_chunk, Footprint, TokenCache};
use crate::guc;
use crate::hash::TokenHash;
use crate::verdict::{KeyTypeInfo, Micros, PrefixInfo, Registry, TokenState};

/// A stored token as this backend holds it: the verdict inputs, and the identity row already
/// built as a composite datum, so that returning it costs one palloc and a memcpy.
#[derive(Debug)]
pub struct Stored {
    pub state: TokenState,
    /// The `token.identity` row as a flat composite datum (header included), built once from
    /// the table row when the token is read.
    identity: DatumBytes,
    /// The `token.verdict` row of an accepted token, built on the first check_token.
    verdict: OnceCell<DatumBytes>,
    /// The last `last_used_at` this backend read or queued.
    pub last_used_at: Cell<Option<Micros>>,
}

impl Stored {
    /// The identity row, copied into the current memory context.
    pub fn identity_datum(&self) -> pg_sys::Datum {
        palloc_copy(self.identity.as_bytes())
    }

    /// The verdict row of this accepted token, copied into the current memory context.
    pub fn verdict_datum(&self, cat: &Catalog) -> pg_sys::Datum {
        let bytes = self.verdict.get_or_init(|| {
            // SAFETY: `identity` is a composite datum of the identity type, which `cat` holds
            // the descriptor of (both are dropped together when the type changes).
            let values = unsafe { deform_composite(self.identity.as_bytes(), cat.identity_desc) };
            let head = [(pg_sys::Datum::from(true), false), (pg_sys::Datum::from(0), true)];
            form_composite(cat.verdict_desc, head.into_iter().chain(values))
        });
        palloc_copy(bytes.as_bytes())
    }
}

/// A datum's bytes in 8-byte-aligned storage: Postgres reads the columns of a tuple at
/// aligned offsets from its start.
#[derive(Debug)]
pub struct DatumBytes {
    words: Box<[u64]>,
    len: usize,
}

impl DatumBytes {
    fn new(bytes: &[u8]) -> DatumBytes {
        let mut words = vec![0u64; bytes.len().div_ceil(8)].into_boxed_slice();
        // SAFETY: `words` has room for at least `bytes.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr().cast::<u8>(), bytes.len()) };
        DatumBytes { words, len: bytes.len() }
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of `words` were written in `new`.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn footprint(&self) -> usize {
        self.words.len() * 8
    }
}

impl AsRef<TokenState> for Stored {
    fn as_ref(&self) -> &TokenState {
        &self.state
    }
}

impl AsRef<TokenState> for Rc<Stored> {
    fn as_ref(&self) -> &TokenState {
        &self.state
    }
}

impl Footprint for Stored {
    /// Every allocation an entry owns, as malloc sizes it, with room reserved for the verdict
    /// row a check_token builds later (the identity row plus two columns).
    fn footprint(&self) -> usize {
        let s = &self.state;
        let text = |x: &String| heap_chunk(x.capacity());
        heap_chunk(16 + std::mem::size_of::<Stored>()) // the Rc allocation
            + text(&s.account)
            + text(&s.key_type)
            + text(&s.environment)
            + heap_chunk(s.scopes.capacity() * std::mem::size_of::<String>())
            + s.scopes.iter().map(text).sum::<usize>()
            + heap_chunk(self.identity.footprint())
            + heap_chunk(self.identity.footprint() + 16)
    }
}

#[derive(Default)]
pub struct RegistryCache {
    prefixes: HashMap<String, PrefixInfo>,
    key_types: HashMap<String, KeyTypeInfo>,
}

impl Registry for RegistryCache {
    fn prefix(&self, prefix: &str) -> Option<&PrefixInfo> {
        self.prefixes.get(prefix)
    }
    fn key_type(&self, name: &str) -> Option<&KeyTypeInfo> {
        self.key_types.get(name)
    }
}

/// Attribute numbers in token.tokens, looked up by name (robust to column order).
struct TokenAtts {
    id: usize,
    token_hash: i16,
    account: usize,
    key_type: usize,
    environment: usize,
    name: usize,
    scopes: usize,
    metadata: usize,
    expires_at: usize,
    revoke_after: usize,
    revoked_at: usize,
    last_used_at: usize,
}

/// Where pg_token's objects are in this database.
pub struct Catalog {
    /// token.cache_signal's relation: what the triggers invalidate.
    signal: pg_sys::Oid,
    tokens: pg_sys::Oid,
    hash_index: pg_sys::Oid,
    key_types: pg_sys::Oid,
    prefixes: pg_sys::Oid,
    pub identity_desc: pg_sys::TupleDesc,
    pub verdict_desc: pg_sys::TupleDesc,
    atts: TokenAtts,
}

pub struct Backend {
    data_seen: u64,
    catalog_seen: u64,
    catalog: Option<Catalog>,
    registry: Option<RegistryCache>,
    pub cache: TokenCache<Stored>,
}

thread_local! {
    static BACKEND: RefCell<Backend> = RefCell::new(Backend {
        data_seen: 0,
        catalog_seen: 0,
        catalog: None,
        registry: None,
        cache: TokenCache::new(0),
    });
    /// Bumped by the relcache callback when what verdicts are made of may have changed;
    /// compared at the start of each call.
    static DATA_GENERATION: Cell<u64> = const { Cell::new(1) };
    /// Bumped when one of our tables gets an invalidation of its own.
    static CATALOG_GENERATION: Cell<u64> = const { Cell::new(1) };
    /// token.cache_signal, and the relations behind the identity and verdict types (cached
    /// rows are built for them): their invalidation empties our caches.
    static DATA_WATCHED: Cell<[u32; 3]> = const { Cell::new([0; 3]) };
    /// tokens, key_types, prefixes: their invalidation makes us look the catalog up again.
    static CATALOG_WATCHED: Cell<[u32; 3]> = const { Cell::new([0; 3]) };
}

pub fn data_generation() -> u64 {
    DATA_GENERATION.with(Cell::get)
}

fn bump(generation: &'static std::thread::LocalKey<Cell<u64>>) {
    generation.with(|g| g.set(g.get() + 1));
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let relid = relid.to_u32();
    if relid == pg_sys::InvalidOid.to_u32() {
        // A reset (the invalidation queue overflowed): anything may have changed.
        bump(&DATA_GENERATION);
        bump(&CATALOG_GENERATION);
    } else if DATA_WATCHED.with(Cell::get).contains(&relid) {
        bump(&DATA_GENERATION);
    } else if CATALOG_WATCHED.with(Cell::get).contains(&relid) {
        bump(&CATALOG_GENERATION);
    }
}

/// Registers the invalidation callback; once per backend, from _PG_init.
pub fn register_callbacks() {
    // SAFETY: the documented registration API; the callback never errors or allocates.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), pg_sys::Datum::from(0)) };
}

fn not_installed() -> ! {
    ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        "pg_token is not installed in this database",
        "CREATE EXTENSION pg_token; it must also be in shared_preload_libraries."
    );
}

fn relid(ns: pg_sys::Oid, name: &std::ffi::CStr) -> pg_sys::Oid {
    // SAFETY: a syscache lookup by name.
    let oid = unsafe { pg_sys::get_relname_relid(name.as_ptr(), ns) };
    if oid == pg_sys::InvalidOid {
        not_installed();
    }
    oid
}

fn attnum(rel: pg_sys::Oid, name: &std::ffi::CStr) -> i16 {
    // SAFETY: a syscache lookup by name.
    let n = unsafe { pg_sys::get_attnum(rel, name.as_ptr()) };
    if n <= 0 {
        not_installed();
    }
    n
}

fn row_desc(ns: pg_sys::Oid, name: &std::ffi::CStr) -> (u32, pg_sys::TupleDesc) {
    let rel = relid(ns, name);
    // SAFETY: a composite type's relation has a row type; the copy lives in
    // TopMemoryContext for as long as this backend keeps the catalog.
    unsafe {
        let typ = pg_sys::get_rel_type_id(rel);
        let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
        let desc = pg_sys::lookup_rowtype_tupdesc_copy(typ, -1);
        pg_sys::MemoryContextSwitchTo(old);
        (rel.to_u32(), desc)
    }
}

impl Catalog {
    fn load() -> Catalog {
        // SAFETY: a syscache lookup by name.
        let ns = unsafe { pg_sys::get_namespace_oid(c"token".as_ptr(), true) };
        if ns == pg_sys::InvalidOid {
            not_installed();
        }
        let tokens = relid(ns, c"tokens");
        let att = |n: &std::ffi::CStr| (attnum(tokens, n) - 1) as usize;
        let atts = TokenAtts {
            id: att(c"id"),
            token_hash: attnum(tokens, c"token_hash"),
            account: att(c"account"),
            key_type: att(c"key_type"),
            environment: att(c"environment"),
            name: att(c"name"),
            scopes: att(c"scopes"),
            metadata: att(c"metadata"),
            expires_at: att(c"expires_at"),
            revoke_after: att(c"revoke_after"),
            revoked_at: att(c"revoked_at"),
            last_used_at: att(c"last_used_at"),
        };
        let key_types = relid(ns, c"key_types");
        let prefixes = relid(ns, c"prefixes");
        let signal = relid(ns, c"cache_signal");
        let (identity_rel, identity_desc) = row_desc(ns, c"identity");
        let (verdict_rel, verdict_desc) = row_desc(ns, c"verdict");
        DATA_WATCHED.with(|w| w.set([signal.to_u32(), identity_rel, verdict_rel]));
        CATALOG_WATCHED.with(|w| w.set([tokens.to_u32(), key_types.to_u32(), prefixes.to_u32()]));
        Catalog {
            signal,
            tokens,
            hash_index: relid(ns, c"tokens_token_hash_excl"),
            key_types,
            prefixes,
            identity_desc,
            verdict_desc,
            atts,
        }
    }
}

impl Catalog {
    /// The relations this catalog found: a different set means the extension was dropped and
    /// created again, and nothing cached from the old tables may be used.
    fn relations(&self) -> [pg_sys::Oid; 5] {
        [self.signal, self.tokens, self.hash_index, self.key_types, self.prefixes]
    }
}

impl Drop for Catalog {
    fn drop(&mut self) {
        // SAFETY: both descriptors were copied into TopMemoryContext by `row_desc`.
        unsafe {
            pg_sys::FreeTupleDesc(self.identity_desc);
            pg_sys::FreeTupleDesc(self.verdict_desc);
        }
    }
}

/// A registered snapshot of the latest committed state, released on drop (or by the
/// resource owner if an error unwinds past us).
struct LatestSnapshot(pg_sys::Snapshot);

impl LatestSnapshot {
    fn take() -> Self {
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

fn text(values: &[pg_sys::Datum], nulls: &[bool], i: usize) -> Option<String> {
    // SAFETY: column i is of type text.
    unsafe { String::from_datum(values[i], nulls[i]) }
}

impl Backend {
    /// Run at the start of every call: receive invalidations and drop what they touched.
    fn refresh(&mut self) {
        // SAFETY: may run our callback, which only bumps the generations.
        unsafe { pg_sys::AcceptInvalidationMessages() };
        let (data, catalog) = (data_generation(), CATALOG_GENERATION.with(Cell::get));
        let mut replaced_from = None;
        if data != self.data_seen {
            self.cache.clear();
            self.registry = None;
            self.catalog = None;
        } else if catalog != self.catalog_seen {
            replaced_from = self.catalog.take().map(|c| c.relations());
        }
        self.data_seen = data;
        self.catalog_seen = catalog;
        let budget = guc::cache_budget_bytes();
        if budget != self.cache.budget() {
            self.cache.set_budget(budget);
        }
        if self.catalog.is_none() {
            let found = Catalog::load();
            if replaced_from.is_some_and(|old| old != found.relations()) {
                self.cache.clear();
                self.registry = None;
            }
            self.catalog = Some(found);
        }
    }

    fn load_registry(cat: &Catalog) -> RegistryCache {
        let mut reg = RegistryCache::default();
        let snap = LatestSnapshot::take();
        scan_all(cat.key_types, &snap, |values, nulls| {
            if let Some(name) = text(values, nulls, 0) {
                // SAFETY: key_types.can_validate (column 3) is text[] NOT NULL.
                let can = unsafe { Vec::<String>::from_datum(values[2], nulls[2]) }.unwrap_or_default();
                reg.key_types.insert(name, KeyTypeInfo { can_validate: can });
            }
        });
        scan_all(cat.prefixes, &snap, |values, nulls| {
            if let (Some(p), Some(kt), Some(env)) = (text(values, nulls, 0), text(values, nulls, 1), text(values, nulls, 2)) {
                reg.prefixes.insert(p, PrefixInfo { key_type: kt, environment: env });
            }
        });
        reg
    }

    /// Finds a stored token by hash: cache first, then one index scan.
    fn find(cat: &Catalog, cache: &mut TokenCache<Stored>, hash: &TokenHash) -> Option<Rc<Stored>> {
        if let Some(hit) = cache.get(hash) {
            return Some(hit);
        }
        let before = data_generation();
        let (stored, own_uncommitted) = scan_token(cat, hash)?;
        if own_uncommitted || data_generation() != before {
            return Some(Rc::new(stored));
        }
        Some(cache.insert(*hash, stored))
    }
}

/// Runs `f` with this backend's state, refreshed.
pub fn with<R>(f: impl FnOnce(&Catalog, &RegistryCache, &mut dyn FnMut(&TokenHash) -> Option<Rc<Stored>>) -> R) -> R {
    BACKEND.with(|b| {
        let mut b = b.borrow_mut();
        b.refresh();
        let Backend { catalog, registry, cache, .. } = &mut *b;
        let Some(cat) = catalog.as_ref() else { not_installed() };
        let reg = registry.get_or_insert_with(|| Backend::load_registry(cat));
        let mut find = |h: &TokenHash| Backend::find(cat, cache, h);
        f(cat, reg, &mut find)
    })
}

/// Runs `f` with this backend's catalog, without processing invalidations first: for use
/// right after `with`, when nothing has run since that could have changed it.
pub fn catalog<R>(f: impl FnOnce(&Catalog) -> R) -> R {
    BACKEND.with(|b| {
        let mut b = b.borrow_mut();
        if b.catalog.is_none() {
            b.refresh();
        }
        match b.catalog.as_ref() {
            Some(cat) => f(cat),
            None => not_installed(),
        }
    })
}

pub struct CacheStats {
    pub entries: u64,
    pub bytes: u64,
    pub budget: u64,
    pub hits: u64,
    pub misses: u64,
}

/// This backend's cache: its size, budget, and the hits and misses counted since it started.
pub fn cache_stats() -> CacheStats {
    BACKEND.with(|b| {
        let mut b = b.borrow_mut();
        b.refresh();
        let c = &b.cache;
        let n = |x: usize| x as u64;
        CacheStats { entries: n(c.len()), bytes: n(c.bytes()), budget: n(c.budget()), hits: c.hits(), misses: c.misses() }
    })
}

/// Seq-scans a small table under `snap`, handing each row's datums to `f`.
fn scan_all(rel_oid: pg_sys::Oid, snap: &LatestSnapshot, mut f: impl FnMut(&[pg_sys::Datum], &[bool])) {
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
fn scan_token(cat: &Catalog, hash: &TokenHash) -> Option<(Stored, bool)> {
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
        let scan = pg_sys::index_beginscan(rel, index, snap.0, 1, 0);
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
            let h = usize::try_from(a.token_hash - 1).unwrap_or(0);
            if n[h] || pgrx::varlena::varlena_to_byte_slice(v[h].cast_mut_ptr()) != &hash[..] {
                continue; // same hash code, another token
            }
            let xmin = pg_sys::HeapTupleHeaderGetXmin((*tup).t_data);
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

/// Builds a row of `desc` as a flat composite datum (external TOAST values inlined, as a
/// composite datum requires) and keeps its bytes.
pub fn form_composite(desc: pg_sys::TupleDesc, columns: impl IntoIterator<Item = (pg_sys::Datum, bool)>) -> DatumBytes {
    let (mut values, mut nulls): (Vec<pg_sys::Datum>, Vec<bool>) = columns.into_iter().unzip();
    // SAFETY: `desc` is a live descriptor; callers pass one (value, isnull) per column of it,
    // of the column's type. heap_copy_tuple_as_datum returns a palloc'd varlena whose length
    // is its varlena header; both pallocs are freed once copied.
    unsafe {
        if values.len() != (*desc).natts as usize {
            ereport!(ERROR, PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, "pg_token: row type has changed; reconnect");
        }
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let datum = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
        let ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
        let bytes = DatumBytes::new(std::slice::from_raw_parts(ptr.cast::<u8>(), pgrx::varlena::varsize_4b(ptr)));
        pg_sys::pfree(ptr.cast());
        pg_sys::heap_freetuple(tuple);
        bytes
    }
}

/// The (value, isnull) pairs of a composite datum built by `form_composite` for `desc`. The
/// values point into `bytes`.
unsafe fn deform_composite(bytes: &[u8], desc: pg_sys::TupleDesc) -> Vec<(pg_sys::Datum, bool)> {
    // SAFETY: `bytes` is a whole composite datum of `desc`'s type (see the caller).
    unsafe {
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        let mut tuple: pg_sys::HeapTupleData = std::mem::zeroed();
        tuple.t_len = bytes.len() as u32;
        tuple.t_data = bytes.as_ptr().cast_mut().cast();
        pg_sys::heap_deform_tuple(&mut tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        values.into_iter().zip(nulls).collect()
    }
}

/// A palloc'd copy of a datum kept as bytes.
pub fn palloc_copy(bytes: &[u8]) -> pg_sys::Datum {
    // SAFETY: palloc returns at least `len` writable bytes (or raises); the bytes are a whole
    // varlena datum, so the copy is one too.
    unsafe {
        let p = pg_sys::palloc(bytes.len()).cast::<u8>();
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        pg_sys::Datum::from(p)
    }
}

/// A palloc'd text datum.
pub fn text_datum(s: &str) -> pg_sys::Datum {
    // SAFETY: allocates header + payload in the current memory context and sets the 4-byte
    // header.
    unsafe {
        let total = pg_sys::VARHDRSZ + s.len();
        let p = pg_sys::palloc(total).cast::<u8>();
        pgrx::varlena::set_varsize_4b(p.cast(), total as i32);
        std::ptr::copy_nonoverlapping(s.as_ptr(), p.add(pg_sys::VARHDRSZ), s.len());
        pg_sys::Datum::from(p)
    }
}

/// Statement trigger on token.tokens, token.key_types and token.prefixes: queues a relcache
/// invalidation for token.cache_signal, which every backend (standbys included) receives when
/// the transaction commits, and this backend at once.
#[pg_trigger]
fn invalidate_caches<'a>(
    _trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    // SAFETY: a syscache lookup by name.
    let ns = unsafe { pg_sys::get_namespace_oid(c"token".as_ptr(), true) };
    if ns == pg_sys::InvalidOid {
        not_installed();
    }
    let signal = relid(ns, c"cache_signal");
    // SAFETY: registers a transactional invalidation message for an existing relation.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(signal) };
    Ok(None)
}
