//! What this backend knows about tokens: the validation cache, the prefix/key-type registry,
//! and where pg_token's objects are, kept fresh by Postgres' invalidation messages.
//!
//! - `changes`: the shared-memory change log; which entries to drop, and when not to trust one.
//! - `freshness`: the relcache callback and the triggers; when to throw everything away.
//! - `catalog`: relation OIDs, attribute numbers and row descriptors.
//! - `scan`: the hash-index scan that reads one token, and the registry scans.
//! - `shared`: the validation cache all backends share, asked after this backend's own.
//! - `stored`: a token row as this backend keeps it, narrowed to what its key type allows.
//!
//! Every validation enters through `with`, which first processes invalidations and the change
//! log (so a change committed anywhere is seen by this call), then hands the verdict rules a registry and a
//! finder that looks in the cache before scanning. An entry is not cached when it was read from
//! this transaction's own uncommitted insert (it may roll back), or when an invalidation
//! arrived or a change was published or in flight during the read; a hit answers only if its
//! token is not in flight and nothing was published since the log was read. A new kind of state that decides verdicts (a column, a table) is
//! loaded here and announced by the trigger in `freshness`.

pub mod changes;
mod catalog;
pub mod freshness;
mod legacy;
mod scan;
pub mod shared;
mod stored;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pg_token_core::cache::{heap_chunk, TokenCache};
use pg_token_core::changes::{Since, EVERYTHING};
use pg_token_core::hash::TokenHash;
use pg_token_core::verdict::{KeyTypeInfo, PrefixInfo, Registry};
use pgrx::prelude::*;

pub use catalog::Catalog;
pub use stored::Stored;

use crate::error;
use crate::guc;
use crate::metrics;

/// The prefixes and key types, as the verdict rules read them.
#[derive(Default)]
pub struct RegistryCache {
    prefixes: HashMap<String, PrefixInfo>,
    key_types: HashMap<String, KeyTypeInfo>,
    legacy: legacy::Legacy,
}

impl RegistryCache {
    /// Heap bytes it holds, as malloc sizes them: counted against `token.cache_size`, so a
    /// registry an admin made large shrinks the token cache instead of growing every backend.
    fn footprint(&self) -> usize {
        let text = |x: &String| heap_chunk(x.capacity());
        // Each map entry: key String + value, in a bucket of a table kept at most 7/8 full.
        let bucket = |value: usize| heap_chunk(8) + (std::mem::size_of::<String>() + value) * 8 / 7;
        let prefixes: usize = self
            .prefixes
            .iter()
            .map(|(k, v)| text(k) + text(&v.key_type) + text(&v.environment) + bucket(std::mem::size_of::<PrefixInfo>()))
            .sum();
        let key_types: usize = self
            .key_types
            .iter()
            .map(|(k, v)| {
                text(k)
                    + heap_chunk(v.can_validate.capacity() * std::mem::size_of::<String>())
                    + v.can_validate.iter().map(text).sum::<usize>()
                    + v.allowed_scopes.as_ref().map_or(0, |a| {
                        heap_chunk(a.capacity() * std::mem::size_of::<String>()) + a.iter().map(text).sum::<usize>()
                    })
                    + bucket(std::mem::size_of::<KeyTypeInfo>())
            })
            .sum();
        prefixes + key_types + self.legacy.footprint()
    }
}

impl Registry for RegistryCache {
    fn prefix(&self, prefix: &str) -> Option<&PrefixInfo> {
        self.prefixes.get(prefix)
    }
    fn key_type(&self, name: &str) -> Option<&KeyTypeInfo> {
        self.key_types.get(name)
    }
    fn legacy_issuers(&self) -> &[pg_token_core::legacy::Issuer] {
        &self.legacy.issuers
    }
    fn legacy_revocations(&self) -> Option<&pg_token_core::legacy::Revocations> {
        Some(&self.legacy.revocations)
    }
}

struct Backend {
    data_seen: u64,
    /// How far this backend has read the change log (None until its first call).
    changes_seen: Option<u64>,
    catalog_seen: u64,
    catalog: Option<Catalog>,
    registry: Option<RegistryCache>,
    /// The registry's footprint when it was loaded (0 while it is not).
    registry_bytes: usize,
    cache: TokenCache<Stored>,
}

thread_local! {
    static BACKEND: RefCell<Backend> = RefCell::new(Backend {
        data_seen: 0,
        changes_seen: None,
        catalog_seen: 0,
        catalog: None,
        registry: None,
        registry_bytes: 0,
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
        self.follow_changes();
        self.apply_budget();
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

    /// Drops what this backend changed itself, and what the change log says others changed.
    fn follow_changes(&mut self) {
        let mut everything = false;
        changes::take_own(|fp| match fp {
            EVERYTHING => everything = true,
            fp => self.cache.forget(fp),
        });
        match self.changes_seen {
            // The first call: the cache is empty, whatever was published before is irrelevant.
            None => self.changes_seen = Some(changes::published()),
            Some(seen) => match changes::since(seen, |fp| self.cache.forget(fp)) {
                Since::Nothing => {}
                Since::Read(now) => self.changes_seen = Some(now),
                Since::Everything(now) => {
                    everything = true;
                    self.changes_seen = Some(now);
                }
            },
        }
        if everything {
            self.cache.clear();
            self.registry = None;
        }
    }

    /// The token cache gets what `token.cache_size` leaves after the registry.
    fn apply_budget(&mut self) {
        if self.registry.is_none() {
            self.registry_bytes = 0;
        }
        let budget = guc::cache_budget_bytes().saturating_sub(self.registry_bytes);
        if budget != self.cache.budget() {
            self.cache.set_budget(budget);
        }
    }

    fn load_registry(cat: &Catalog) -> RegistryCache {
        let mut reg = RegistryCache::default();
        let snap = scan::LatestSnapshot::take();
        let a = &cat.key_type_atts;
        scan::scan_all(cat.key_types, &snap, |v, n| {
            let set = |i: Option<usize>| i.filter(|i| !n[*i]);
            if let Some(name) = scan::text(v, n, a.name) {
                // SAFETY: each column is read as its declared type: can_validate text[] NOT
                // NULL, allowed_scopes text[], allowed_networks cidr[], rate_limits
                // token.rate_limit[], conceal boolean.
                let info = unsafe {
                    KeyTypeInfo {
                        can_validate: Vec::<String>::from_datum(v[a.can_validate], n[a.can_validate]).unwrap_or_default(),
                        networks: set(a.allowed_networks).map(|i| scan::networks(v[i])),
                        rate_limits: set(a.rate_limits).map(|i| scan::rate_limits(cat, v[i])).unwrap_or_default(),
                        conceal_cross_account: set(a.conceal_cross_account).is_some_and(|i| v[i].value() != 0),
                        reuse_detection: set(a.reuse_detection).is_some_and(|i| v[i].value() != 0),
                        allowed_scopes: Vec::<Option<String>>::from_datum(v[a.allowed_scopes], n[a.allowed_scopes])
                            .map(|s| s.into_iter().flatten().collect()),
                    }
                };
                reg.key_types.insert(name, info);
            }
        });
        scan::scan_all(cat.prefixes, &snap, |values, nulls| {
            let column = |i| scan::text(values, nulls, i);
            if let (Some(p), Some(kt), Some(env)) = (column(0), column(1), column(2)) {
                reg.prefixes.insert(p, PrefixInfo { key_type: kt, environment: env });
            }
        });
        reg.legacy = legacy::load(cat, &snap);
        reg
    }

    /// Finds a stored token by hash: this backend's cache, the shared cache, then one index scan.
    fn find(cat: &Catalog, reg: &RegistryCache, cache: &mut TokenCache<Stored>, seen: u64, hash: &TokenHash) -> Option<Rc<Stored>> {
        Self::find_or_scan(cat, reg, cache, seen, hash, |keep| scan::scan_token(cat, hash, keep))
    }

    /// Finds a stored token by id (a derived token's parent): cached like the others, under a
    /// key no token's hash can be (the hash of a domain-separated string, not of a token).
    fn find_id(cat: &Catalog, reg: &RegistryCache, cache: &mut TokenCache<Stored>, seen: u64, id: &[u8; 16]) -> Option<Rc<Stored>> {
        let key = pg_token_core::changes::id_key(id);
        Self::find_or_scan(cat, reg, cache, seen, &key, |keep| scan::scan_token_by_id(cat, id, keep))
    }

    /// `seen`: where this call read the change log. A hit answers only if its token is not
    /// being committed and nothing was published since; a row read is kept only if the same
    /// holds after the read (and no invalidation arrived during it). The shared cache is asked
    /// after this backend's, under the same rule (`shared`).
    fn find_or_scan(
        cat: &Catalog,
        reg: &RegistryCache,
        cache: &mut TokenCache<Stored>,
        seen: u64,
        key: &TokenHash,
        scan: impl FnOnce(bool) -> Option<scan::Scanned>,
    ) -> Option<Rc<Stored>> {
        if !changes::still_current(key, seen) {
            cache.remove(key); // and the lookup below counts a miss
        }
        if let Some(hit) = cache.get(key) {
            metrics::cache_hit();
            return Some(hit);
        }
        metrics::cache_miss();
        let table = shared::usable();
        if let Some(t) = table {
            if let Some(stored) = shared::get(t, cat, key, seen) {
                let mut stored = stored.within_key_type(cat, reg);
                stored.shared_key = Some((*key, cat.shared_scope));
                return Some(cache.insert(*key, stored));
            }
        }
        let before = freshness::data_generation();
        let epoch = table.map_or(0, |t| t.epoch());
        let found = scan(table.is_some())?;
        let mut stored = found.stored.within_key_type(cat, reg);
        if found.own || freshness::data_generation() != before || !changes::still_current(key, seen) {
            return Some(Rc::new(stored));
        }
        if let (Some(t), Some(row)) = (table, &found.row) {
            shared::fill(t, cat, key, epoch, seen, row);
            stored.shared_key = Some((*key, cat.shared_scope));
        }
        Some(cache.insert(*key, stored))
    }
}

/// A finder: a stored token by hash, from the cache or one index scan.
pub type Find<'a> = dyn FnMut(&TokenHash) -> Option<Rc<Stored>> + 'a;
/// A finder by id, for parents.
pub type FindId<'a> = dyn FnMut(&[u8; 16]) -> Option<Rc<Stored>> + 'a;

/// Where accepted legacy JWTs are kept (the verdict rules' `LegacyStore`).
pub type LegacyJwts<'a> = legacy::Store<'a>;

/// Runs `f` with this backend's state, refreshed.
pub fn with<R>(f: impl FnOnce(&Catalog, &RegistryCache, &mut Find<'_>, &mut FindId<'_>, &mut LegacyJwts<'_>) -> R) -> R {
    BACKEND.with(|b| {
        let mut b = b.borrow_mut();
        b.refresh();
        if b.registry.is_none() {
            let Some(cat) = b.catalog.as_ref() else { error::not_installed() };
            let loaded = Backend::load_registry(cat);
            b.registry_bytes = loaded.footprint();
            b.registry = Some(loaded);
            b.apply_budget();
        }
        let seen = b.changes_seen.unwrap_or(0);
        let Backend { catalog, registry, cache, .. } = &mut *b;
        let Some(cat) = catalog.as_ref() else { error::not_installed() };
        let Some(reg) = registry.as_ref() else { error::not_installed() };
        // Both finders share the cache; they are never called at once (the verdict rules call
        // one, then the other).
        let cache = std::cell::RefCell::new(cache);
        let mut find = |h: &TokenHash| Backend::find(cat, reg, &mut cache.borrow_mut(), seen, h);
        let mut find_id = |id: &[u8; 16]| Backend::find_id(cat, reg, &mut cache.borrow_mut(), seen, id);
        let mut jwts = legacy::Store::new(cat, &reg.legacy);
        f(cat, reg, &mut find, &mut find_id, &mut jwts)
    })
}

/// Runs `f` with this backend's catalog, refreshed first (for admin functions, which may run
/// after another session dropped and created the extension again).
fn fresh_catalog<R>(f: impl FnOnce(&Catalog) -> R) -> R {
    BACKEND.with(|b| {
        let mut b = b.borrow_mut();
        b.refresh();
        match b.catalog.as_ref() {
            Some(cat) => f(cat),
            None => error::not_installed(),
        }
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

/// Tokens of `account` that are not revoked, in the latest committed state (plus this
/// transaction's own changes) whatever the caller's isolation level: what a REPEATABLE READ
/// transaction's snapshot cannot show it.
pub fn live_tokens_of_account(account: &str) -> u64 {
    let (tokens, index, revoked_at) = fresh_catalog(|c| (c.tokens, c.account_index, c.atts.revoked_at));
    let mut live = 0;
    scan::scan_text_equal(tokens, index, account, |_, nulls| {
        if nulls[revoked_at] {
            live += 1;
        }
    });
    live
}

/// Every registered prefix in the latest committed state, whatever the caller's isolation
/// level (the registry functions check overlaps against it under their table lock).
pub fn registered_prefixes() -> Vec<String> {
    let rel = fresh_catalog(|c| c.prefixes);
    let snap = scan::LatestSnapshot::take();
    let mut all = Vec::new();
    scan::scan_all(rel, &snap, |values, nulls| {
        if let Some(p) = scan::text(values, nulls, 0) {
            all.push(p);
        }
    });
    all
}

/// Tokens carrying `prefix` that are not revoked, in the latest committed state. A
/// sequential scan: only unregister_prefix in a REPEATABLE READ transaction asks.
pub fn live_tokens_with_prefix(prefix: &str) -> u64 {
    let (rel, prefix_att, revoked_at) = fresh_catalog(|c| (c.tokens, c.atts.prefix, c.atts.revoked_at));
    let snap = scan::LatestSnapshot::take();
    let mut live = 0;
    scan::scan_all(rel, &snap, |values, nulls| {
        if nulls[revoked_at] && scan::text(values, nulls, prefix_att).as_deref() == Some(prefix) {
            live += 1;
        }
    });
    live
}
