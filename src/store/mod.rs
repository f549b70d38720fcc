//! What this backend knows about tokens: the validation cache, the prefix/key-type registry,
//! and where pg_token's objects are, kept fresh by Postgres' invalidation messages.
//!
//! - `freshness`: the relcache callback and the trigger; when to throw things away.
//! - `catalog`: relation OIDs, attribute numbers and row descriptors.
//! - `scan`: the hash-index scan that reads one token, and the registry scans.
//!
//! Every validation enters through `with`, which first processes invalidations (so a change
//! committed anywhere is seen by this call), then hands the verdict rules a registry and a
//! finder that looks in the cache before scanning. An entry is not cached when it was read from
//! this transaction's own uncommitted insert (it may roll back), or when an invalidation
//! arrived during the read. A new kind of state that decides verdicts (a column, a table) is
//! loaded here and announced by the trigger in `freshness`.

mod catalog;
pub mod freshness;
mod scan;

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use pg_token_core::cache::{heap_chunk, Footprint, TokenCache};
use pg_token_core::hash::TokenHash;
use pg_token_core::verdict::{KeyTypeInfo, Micros, PrefixInfo, Registry, Stateful, TokenState};
use pgrx::pg_sys;
use pgrx::prelude::*;

pub use catalog::Catalog;

use crate::datum::{deform_composite, form_composite, palloc_copy, DatumBytes};
use crate::error;
use crate::guc;

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

impl Stateful for Stored {
    fn state(&self) -> &TokenState {
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

/// The prefixes and key types, as the verdict rules read them.
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

struct Backend {
    data_seen: u64,
    catalog_seen: u64,
    catalog: Option<Catalog>,
    registry: Option<RegistryCache>,
    cache: TokenCache<Stored>,
}

thread_local! {
    static BACKEND: RefCell<Backend> = RefCell::new(Backend {
        data_seen: 0,
        catalog_seen: 0,
        catalog: None,
        registry: None,
        cache: TokenCache::new(0),
    });
}

impl Backend {
    /// Run at the start of every call: receive invalidations and drop what they touched.
    fn refresh(&mut self) {
        freshness::accept_invalidations();
        let (data, catalog) = (freshness::data_generation(), freshness::catalog_generation());
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
            freshness::watch(found.data_relations, found.catalog_relations());
            if replaced_from.is_some_and(|old| old != found.relations()) {
                self.cache.clear();
                self.registry = None;
            }
            self.catalog = Some(found);
        }
    }

    fn load_registry(cat: &Catalog) -> RegistryCache {
        let mut reg = RegistryCache::default();
        let snap = scan::LatestSnapshot::take();
        scan::scan_all(cat.key_types, &snap, |values, nulls| {
            if let Some(name) = scan::text(values, nulls, 0) {
                // SAFETY: key_types.can_validate (column 3) is text[] NOT NULL.
                let can = unsafe { Vec::<String>::from_datum(values[2], nulls[2]) }.unwrap_or_default();
                reg.key_types.insert(name, KeyTypeInfo { can_validate: can });
            }
        });
        scan::scan_all(cat.prefixes, &snap, |values, nulls| {
            let column = |i| scan::text(values, nulls, i);
            if let (Some(p), Some(kt), Some(env)) = (column(0), column(1), column(2)) {
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
        let before = freshness::data_generation();
        let (stored, own_uncommitted) = scan::scan_token(cat, hash)?;
        if own_uncommitted || freshness::data_generation() != before {
            return Some(Rc::new(stored));
        }
        Some(cache.insert(*hash, stored))
    }
}

/// A finder: a stored token by hash, from the cache or one index scan.
pub type Find<'a> = dyn FnMut(&TokenHash) -> Option<Rc<Stored>> + 'a;

/// Runs `f` with this backend's state, refreshed.
pub fn with<R>(f: impl FnOnce(&Catalog, &RegistryCache, &mut Find<'_>) -> R) -> R {
    BACKEND.with(|b| {
        let mut b = b.borrow_mut();
        b.refresh();
        let Backend { catalog, registry, cache, .. } = &mut *b;
        let Some(cat) = catalog.as_ref() else { error::not_installed() };
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
            None => error::not_installed(),
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
