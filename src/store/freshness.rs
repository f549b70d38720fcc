//! When this backend's cached tokens and registry must be thrown away wholesale: Postgres'
//! invalidation messages, received through a relcache callback, and the trigger that sends them.
//!
//! On a primary with pg_token's shared memory, what changed is dropped entry by entry through
//! the change log (`changes`), which also closes the window between a commit becoming visible
//! and its invalidation messages arriving. The messages stay for what the log cannot reach:
//! - hot standbys replay them from the commit record (no trigger runs there, so no log entry);
//!   a standby empties its cache on each change, as every server did before the log;
//! - without shared_preload_libraries there is no log, and they are the whole mechanism;
//! - DDL on our tables and replaced relations (new OIDs), which make us look the catalog up again.
//!
//! Statement triggers on `token.key_types`, `token.prefixes` and the legacy issuer tables, and
//! on TRUNCATE of `token.tokens` (`changes::invalidate_caches`, ENABLE ALWAYS, so they also fire for
//! data-only restores) note "everything" in the log and queue a relcache invalidation for
//! `token.cache_signal`, an empty composite type that nothing else invalidates. Row changes of
//! `token.tokens` go through `changes::note_token_change`, which queues the same message. The
//! logical replication apply worker fires no statement triggers: row triggers, ENABLE REPLICA,
//! call the same functions there (for tokens only when a column other than the writer's changed).
//! Invalidations of the tables themselves (DDL, and every VACUUM and ANALYZE, which the
//! writer's updates make frequent) only make us look the catalog up again; the cache goes too
//! if a table was replaced (new OID). The messages are transactional (sent only at commit,
//! applied locally at each command boundary and undone on abort) and processed by
//! `AcceptInvalidationMessages()`, which costs one shared-memory read when nothing is pending;
//! every call makes it first.
//!
//! The callback only bumps counters (it must not allocate or raise); the cache is emptied at
//! the start of the next call (`store::Backend::refresh`), never under a caller's feet. A new
//! table whose rows decide verdicts gets the same trigger in `sql/finalize.sql`.

use std::cell::Cell;

use pgrx::pg_sys;
use pgrx::prelude::*;

thread_local! {
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

/// Changes to what verdicts are made of, counted since the backend started.
pub fn data_generation() -> u64 {
    DATA_GENERATION.with(Cell::get)
}

/// Invalidations of pg_token's own tables, counted since the backend started.
pub fn catalog_generation() -> u64 {
    CATALOG_GENERATION.with(Cell::get)
}

/// Tells the callback which relations to watch (after the catalog is looked up).
pub fn watch(data: [u32; 3], catalog: [u32; 3]) {
    DATA_WATCHED.with(|w| w.set(data));
    CATALOG_WATCHED.with(|w| w.set(catalog));
}

/// Receives pending invalidation messages; may run our callback, which only bumps counters.
pub fn accept_invalidations() {
    // SAFETY: the standard call at a point where catalog state may be re-read.
    unsafe { pg_sys::AcceptInvalidationMessages() };
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
        // token.cache_signal (the first watched relation) is what the triggers send; on a
        // primary with the change log, the log has said what changed, entry by entry.
        let signal = DATA_WATCHED.with(Cell::get)[0];
        if relid != signal || !super::changes::targeted() {
            bump(&DATA_GENERATION);
        }
    } else if CATALOG_WATCHED.with(Cell::get).contains(&relid) {
        bump(&CATALOG_GENERATION);
    }
}

/// Registers the invalidation callback; once per backend, from _PG_init.
pub fn register_callbacks() {
    // SAFETY: the documented registration API; the callback never errors or allocates.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), pg_sys::Datum::from(0)) };
}
