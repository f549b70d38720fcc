//! The per-backend validation cache: stored-token states keyed by token hash, bounded by a
//! byte budget, evicted by CLOCK (an approximation of LRU that costs one flag write per hit).
//!
//! This module only stores; it never decides freshness. The edge (`store::freshness`) clears it when
//! Postgres delivers an invalidation for a token, key-type or prefix table, and deadlines are
//! checked against the clock on every hit by `verdict`. Only tokens that exist are cached, so
//! guessing cannot fill it. Pure: no Postgres.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

use crate::changes::fingerprint;
use crate::hash::TokenHash;

/// Heap bytes an entry holds, for the budget: the sum of `heap_chunk` over its allocations.
pub trait Footprint {
    fn footprint(&self) -> usize;
}

/// What an allocation of `n` bytes really takes from the heap: glibc malloc adds an 8-byte
/// header, rounds to 16 and hands out at least 32. Counting requested bytes instead
/// undercounts small allocations by half or more.
pub fn heap_chunk(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    ((n + 8 + 15) & !15).max(32)
}

/// Keys are SHA-256 outputs, already uniform: the index is keyed by the first 8 bytes (the
/// fingerprint `changes` names tokens by), so no hashing work is done on the hot path and an
/// entry can be dropped by fingerprint. The slot keeps the whole hash, compared on lookup.
type Key = TokenHash;

#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

struct Slot<V> {
    key: Key,
    value: Rc<V>,
    referenced: Cell<bool>,
    bytes: usize,
}

/// Bookkeeping per entry beyond the value itself: its slot (56 bytes, in a vector that may be
/// up to twice as long as needed) and its map bucket (40 bytes at a load of at most 7/8).
pub const OVERHEAD: usize = 2 * 56 + 48;

pub struct TokenCache<V> {
    index: HashMap<u64, usize, BuildHasherDefault<PassThrough>>,
    slots: Vec<Slot<V>>,
    hand: usize,
    bytes: usize,
    budget: usize,
    /// Lookups that found an entry, and that did not, since the cache was made.
    hits: u64,
    misses: u64,
}

impl<V: Footprint> TokenCache<V> {
    pub fn new(budget: usize) -> Self {
        TokenCache { index: HashMap::default(), slots: Vec::new(), hand: 0, bytes: 0, budget, hits: 0, misses: 0 }
    }

    pub fn get(&mut self, key: &TokenHash) -> Option<Rc<V>> {
        let slot = match self.index.get(&fingerprint(key)) {
            Some(&i) if self.slots[i].key == *key => &self.slots[i],
            _ => {
                self.misses += 1;
                return None;
            }
        };
        self.hits += 1;
        slot.referenced.set(true);
        Some(Rc::clone(&slot.value))
    }

    pub fn hits(&self) -> u64 {
        self.hits
    }

    pub fn misses(&self) -> u64 {
        self.misses
    }

    /// Inserts or replaces, and hands the value back shared. An entry larger than the whole
    /// budget is handed back without being cached.
    pub fn insert(&mut self, key: TokenHash, value: V) -> Rc<V> {
        let bytes = value.footprint() + OVERHEAD;
        self.remove(&key);
        if bytes > self.budget {
            return Rc::new(value);
        }
        while self.bytes + bytes > self.budget && !self.slots.is_empty() {
            self.evict_one();
        }
        let value = Rc::new(value);
        self.index.insert(fingerprint(&key), self.slots.len());
        self.slots.push(Slot { key, value: Rc::clone(&value), referenced: Cell::new(false), bytes });
        self.bytes += bytes;
        value
    }

    /// Removes the entry of this key (and one that shares its fingerprint, if any).
    pub fn remove(&mut self, key: &TokenHash) {
        self.forget(fingerprint(key));
    }

    /// Removes the entry whose key has this fingerprint, if any.
    pub fn forget(&mut self, fingerprint: u64) {
        if let Some(i) = self.index.remove(&fingerprint) {
            self.remove_slot(i);
        }
    }

    fn remove_slot(&mut self, i: usize) {
        let slot = self.slots.swap_remove(i);
        self.bytes -= slot.bytes;
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(fingerprint(&moved.key), i);
        }
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
    }

    /// CLOCK: sweep from the hand, giving referenced entries a second chance.
    fn evict_one(&mut self) {
        loop {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let slot = &self.slots[self.hand];
            if slot.referenced.replace(false) {
                self.hand += 1;
                continue;
            }
            let fp = fingerprint(&slot.key);
            self.index.remove(&fp);
            self.remove_slot(self.hand);
            return;
        }
    }

    pub fn clear(&mut self) {
        self.index.clear();
        self.slots.clear();
        self.hand = 0;
        self.bytes = 0;
    }

    /// Changes the budget, evicting at once if the cache is now over it.
    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        while self.bytes > self.budget && !self.slots.is_empty() {
            self.evict_one();
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn budget(&self) -> usize {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Blob(usize);
    impl Footprint for Blob {
        fn footprint(&self) -> usize {
            self.0
        }
    }

    fn key(i: u32) -> TokenHash {
        crate::hash::token_hash(&i.to_string())
    }

    #[test]
    fn stays_within_its_budget() {
        let mut c = TokenCache::new(100 * (100 + OVERHEAD));
        for i in 0..1000 {
            c.insert(key(i), Blob(100));
            assert!(c.bytes() <= c.budget());
        }
        assert_eq!(c.len(), 100);
    }

    #[test]
    fn recently_used_entries_survive_eviction() {
        let mut c = TokenCache::new(10 * (10 + OVERHEAD));
        for i in 0..10 {
            c.insert(key(i), Blob(10));
        }
        // Touch entry 3 and then overflow by one: the hand passes 3 (second chance).
        assert!(c.get(&key(3)).is_some());
        c.insert(key(100), Blob(10));
        assert!(c.get(&key(3)).is_some());
        assert!(c.get(&key(0)).is_none(), "the first unreferenced entry goes");
        assert_eq!(c.len(), 10);
    }

    #[test]
    fn replace_remove_clear_and_shrink() {
        let mut c = TokenCache::new(10_000);
        c.insert(key(1), Blob(10));
        c.insert(key(1), Blob(20));
        assert_eq!(c.len(), 1);
        assert_eq!(c.bytes(), 20 + OVERHEAD);
        c.insert(key(2), Blob(10));
        c.remove(&key(1));
        assert!(c.get(&key(1)).is_none());
        assert!(c.get(&key(2)).is_some(), "the moved slot is still indexed");
        c.set_budget(0);
        assert!(c.is_empty());
        c.set_budget(10_000);
        c.insert(key(3), Blob(10));
        c.clear();
        assert!(c.is_empty() && c.bytes() == 0);
    }

    #[test]
    fn heap_chunks_are_rounded_like_malloc() {
        assert_eq!(heap_chunk(0), 0);
        assert_eq!(heap_chunk(1), 32);
        assert_eq!(heap_chunk(24), 32);
        assert_eq!(heap_chunk(25), 48);
        assert_eq!(heap_chunk(200), 208);
    }

    #[test]
    fn lookups_are_counted_as_hits_and_misses() {
        let mut c = TokenCache::new(10_000);
        assert!(c.get(&key(1)).is_none());
        c.insert(key(1), Blob(10));
        assert!(c.get(&key(1)).is_some());
        assert!(c.get(&key(1)).is_some());
        assert!(c.get(&key(2)).is_none());
        assert_eq!((c.hits(), c.misses()), (2, 2));
        c.clear();
        assert_eq!((c.hits(), c.misses()), (2, 2), "clearing keeps the counts");
    }

    #[test]
    fn an_entry_larger_than_the_budget_is_not_cached() {
        let mut c = TokenCache::new(100);
        let handed_back = c.insert(key(1), Blob(1000));
        assert_eq!(handed_back.0, 1000);
        assert!(c.is_empty());
        assert!(c.get(&key(1)).is_none());
    }

    #[test]
    fn entries_are_dropped_by_fingerprint_and_a_shared_fingerprint_is_not_a_hit() {
        let mut c = TokenCache::new(10_000);
        c.insert(key(1), Blob(10));
        c.insert(key(2), Blob(10));
        c.forget(fingerprint(&key(1)));
        assert!(c.get(&key(1)).is_none());
        assert!(c.get(&key(2)).is_some(), "only that token goes");
        // Another hash with the same first 8 bytes: a miss, and inserting it replaces the other.
        let mut twin = key(2);
        twin[31] ^= 1;
        assert!(c.get(&twin).is_none());
        c.insert(twin, Blob(10));
        assert!(c.get(&key(2)).is_none() && c.get(&twin).is_some());
        assert_eq!(c.len(), 1);
    }
}
