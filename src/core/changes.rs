//! Which cached tokens other sessions changed: a log, meant for shared memory, of the tokens
//! whose committed changes every backend must drop from its cache, and a small table of the
//! changes being committed right now.
//!
//! A changing transaction claims its tokens as *in flight* before it commits, publishes them
//! to the log once its commit is visible, then releases the claim. A backend that holds a
//! token in its cache trusts the entry only if the token is not in flight and nothing was
//! published since it last read the log; otherwise it reads the table. So there is no moment
//! at which a commit is visible to new snapshots while a cache may still answer from before it
//! (Postgres' own invalidation messages are sent after the commit is visible).
//!
//! A token is named by its fingerprint: the first 8 bytes of its SHA-256 hash (a collision
//! only drops a second entry). `EVERYTHING` stands for all of them (a registry change, a
//! truncation, a transaction that changed many tokens). The log is a ring addressed by a
//! sequence number: a reader that fell more than `LOG` entries behind drops everything.
//!
//! Everything here is atomics in a `#[repr(C)]` struct that is valid all-zero (empty log,
//! nothing in flight), so the edge can place it in zeroed shared memory. Pure: no Postgres.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use crate::hash::TokenHash;

/// Entries the log keeps: a reader up to this many publications behind drops only what changed.
pub const LOG: usize = 4096;
/// Tokens that can be in flight by name at once; more, and every cached token counts as in flight.
pub const IN_FLIGHT: usize = 64;
/// A transaction that changes more tokens than this publishes `EVERYTHING` instead.
pub const MAX_NAMED: usize = 256;
/// A transaction claims at most this many in-flight slots by name.
const MAX_CLAIMED: usize = 8;
/// The fingerprint that stands for every token.
pub const EVERYTHING: u64 = 0;

/// A token's fingerprint: the first 8 bytes of its hash (uniform already).
pub fn fingerprint(hash: &TokenHash) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(first)
}

/// Whether a transaction's fingerprints are published as `EVERYTHING`: more than `MAX_NAMED`
/// of them, or `EVERYTHING` among them.
pub fn stands_for_everything(fingerprints: &[u64]) -> bool {
    fingerprints.len() > MAX_NAMED || fingerprints.contains(&EVERYTHING)
}

/// The cache key under which a token is kept when it is looked up by id (as a derived token's
/// parent): the hash of a domain-separated string, which no token's hash can be.
pub fn id_key(id: &[u8; 16]) -> TokenHash {
    let mut key = Vec::with_capacity(40);
    key.extend_from_slice(b"pg_token parent id:");
    key.extend_from_slice(id);
    crate::hash::token_hash(&key)
}

/// The log and the in-flight table. All-zero is valid and empty.
#[repr(C)]
pub struct ChangeLog {
    /// Held by a publisher while it appends (a spin lock: appending is a few stores).
    publishing: AtomicU32,
    /// Transactions holding a claim (slots or `everything`): zero on the hit path's fast path.
    claims: AtomicU32,
    /// Claims that stand for every token.
    everything: AtomicU32,
    _pad: u32,
    /// Entries published so far; entry `i` lives in `log[i % LOG]`.
    published: AtomicU64,
    /// Fingerprints in flight; 0 is a free slot.
    in_flight: [AtomicU64; IN_FLIGHT],
    log: [AtomicU64; LOG],
}

/// What a transaction holds between its claim and its release.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Claim {
    slots: Vec<usize>,
    everything: bool,
}

/// What a reader learns from the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Since {
    /// Nothing new.
    Nothing,
    /// These entries were handed to the callback; read on from here.
    Read(u64),
    /// The reader fell behind (or saw `EVERYTHING`): drop everything, read on from here.
    Everything(u64),
}

impl ChangeLog {
    /// Marks `fingerprints` as being committed (before the commit becomes visible). More than
    /// a few, or `EVERYTHING`, or no free slot: every token counts as in flight.
    pub fn claim(&self, fingerprints: &[u64]) -> Claim {
        self.claims.fetch_add(1, Ordering::SeqCst);
        let mut claim = Claim::default();
        let by_name = fingerprints.len() <= MAX_CLAIMED && !fingerprints.contains(&EVERYTHING);
        if by_name {
            for &fp in fingerprints {
                match self.free_slot(fp) {
                    Some(i) => claim.slots.push(i),
                    None => {
                        claim.everything = true;
                        break;
                    }
                }
            }
        } else {
            claim.everything = true;
        }
        if claim.everything {
            self.everything.fetch_add(1, Ordering::SeqCst);
        }
        claim
    }

    fn free_slot(&self, fp: u64) -> Option<usize> {
        self.in_flight.iter().position(|s| s.compare_exchange(0, fp, Ordering::SeqCst, Ordering::SeqCst).is_ok())
    }

    /// Gives a claim up (after its fingerprints were published, or the transaction aborted).
    pub fn release(&self, claim: Claim) {
        for i in claim.slots {
            if let Some(s) = self.in_flight.get(i) {
                s.store(0, Ordering::SeqCst);
            }
        }
        if claim.everything {
            self.everything.fetch_sub(1, Ordering::SeqCst);
        }
        self.claims.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether a change of this token may be committing right now.
    pub fn in_flight(&self, fp: u64) -> bool {
        if self.claims.load(Ordering::SeqCst) == 0 {
            return false;
        }
        if self.everything.load(Ordering::SeqCst) > 0 {
            return true;
        }
        // 0 marks a free slot: a token whose fingerprint is 0 counts as in flight with any claim.
        fp == EVERYTHING || self.in_flight.iter().any(|s| s.load(Ordering::SeqCst) == fp)
    }

    /// Entries published so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::SeqCst)
    }

    /// Appends `fingerprints` (after the commit is visible, before the claim is released).
    pub fn publish(&self, fingerprints: &[u64]) {
        let everything = [EVERYTHING];
        let entries = if stands_for_everything(fingerprints) {
            &everything[..]
        } else {
            fingerprints
        };
        if entries.is_empty() {
            return;
        }
        self.lock();
        let mut p = self.published.load(Ordering::Relaxed);
        for &fp in entries {
            // Whoever reads the entry this store overwrites must also see `published` at p or
            // beyond, and so know it was overwritten (paired with the fence in `since`).
            fence(Ordering::Release);
            self.log[(p % LOG as u64) as usize].store(fp, Ordering::Relaxed);
            p += 1;
            self.published.store(p, Ordering::SeqCst);
        }
        self.publishing.store(0, Ordering::Release);
    }

    fn lock(&self) {
        let mut spins = 0u32;
        while self.publishing.compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
            crate::shared::back_off(&mut spins);
        }
    }

    /// Hands every fingerprint published after `seen` to `each`, in order. `EVERYTHING` among
    /// them, or a log that moved on by `LOG` or more entries, gives `Since::Everything`.
    pub fn since(&self, seen: u64, mut each: impl FnMut(u64)) -> Since {
        let now = self.published();
        if now == seen {
            return Since::Nothing;
        }
        if now < seen || now - seen >= LOG as u64 {
            return Since::Everything(now);
        }
        let mut everything = false;
        for i in seen..now {
            let fp = self.log[(i % LOG as u64) as usize].load(Ordering::Relaxed);
            everything |= fp == EVERYTHING;
            if !everything {
                each(fp);
            }
        }
        fence(Ordering::Acquire);
        let later = self.published();
        if everything || later - seen >= LOG as u64 {
            return Since::Everything(now);
        }
        Since::Read(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn zeroed() -> Box<ChangeLog> {
        // An all-zero ChangeLog, as shared memory starts: built field by field (no unsafe here).
        Box::new(ChangeLog {
            publishing: AtomicU32::new(0),
            claims: AtomicU32::new(0),
            everything: AtomicU32::new(0),
            _pad: 0,
            published: AtomicU64::new(0),
            in_flight: std::array::from_fn(|_| AtomicU64::new(0)),
            log: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }

    fn read(log: &ChangeLog, seen: u64) -> (Since, Vec<u64>) {
        let mut got = Vec::new();
        let s = log.since(seen, |fp| got.push(fp));
        (s, got)
    }

    #[test]
    fn a_reader_sees_what_was_published_since_it_last_looked() {
        let log = zeroed();
        assert_eq!(read(&log, 0), (Since::Nothing, vec![]));
        log.publish(&[11, 12]);
        assert_eq!(read(&log, 0), (Since::Read(2), vec![11, 12]));
        log.publish(&[13]);
        assert_eq!(read(&log, 2), (Since::Read(3), vec![13]));
        assert_eq!(read(&log, 3), (Since::Nothing, vec![]));
    }

    #[test]
    fn falling_behind_or_a_big_change_means_everything() {
        let log = zeroed();
        log.publish(&[5]);
        for i in 0..LOG as u64 {
            log.publish(&[100 + i]);
        }
        assert_eq!(read(&log, 0).0, Since::Everything(LOG as u64 + 1));
        assert_eq!(read(&log, 2).0, Since::Read(LOG as u64 + 1), "a reader LOG-1 behind reads on");
        let many: Vec<u64> = (1..=MAX_NAMED as u64 + 1).collect();
        let before = log.published();
        log.publish(&many);
        assert_eq!(log.published(), before + 1, "one entry stands for them all");
        assert_eq!(read(&log, before).0, Since::Everything(before + 1));
        log.publish(&[7, EVERYTHING]);
        assert_eq!(read(&log, before + 1).0, Since::Everything(before + 2));
    }

    #[test]
    fn claims_mark_tokens_in_flight_until_released() {
        let log = zeroed();
        assert!(!log.in_flight(42));
        let c = log.claim(&[42, 43]);
        assert!(log.in_flight(42) && log.in_flight(43));
        assert!(!log.in_flight(44));
        let all = log.claim(&[EVERYTHING]);
        assert!(log.in_flight(44));
        log.release(all);
        assert!(!log.in_flight(44) && log.in_flight(43));
        log.release(c);
        assert!(!log.in_flight(42) && !log.in_flight(43));
        let many: Vec<u64> = (1..=MAX_CLAIMED as u64 + 1).collect();
        let c = log.claim(&many);
        assert!(log.in_flight(999_999), "too many to name: everything is in flight");
        log.release(c);
        assert!(!log.in_flight(999_999));
    }

    #[test]
    fn a_full_in_flight_table_falls_back_to_everything() {
        let log = zeroed();
        let held: Vec<Claim> = (0..IN_FLIGHT as u64).map(|i| log.claim(&[1000 + i])).collect();
        assert!(!log.in_flight(5));
        let over = log.claim(&[5]);
        assert!(log.in_flight(5) && log.in_flight(6));
        log.release(over);
        assert!(!log.in_flight(6));
        for c in held {
            log.release(c);
        }
        assert!(!log.in_flight(1000));
    }

    #[test]
    fn fingerprint_zero_is_in_flight_as_everything_would_be() {
        let log = zeroed();
        let c = log.claim(&[EVERYTHING]);
        assert!(log.in_flight(EVERYTHING));
        log.release(c);
        assert!(!log.in_flight(EVERYTHING));
    }

    #[test]
    fn id_keys_and_fingerprints() {
        let a = id_key(&[1; 16]);
        assert_ne!(a, id_key(&[2; 16]));
        assert_ne!(a, crate::hash::token_hash("pg_token parent id:"), "the id is part of the key");
        assert_eq!(fingerprint(&a).to_le_bytes(), a[..8]);
    }

    /// Writers publish numbered fingerprints while readers follow: a reader that is not told
    /// to drop everything sees every entry exactly once and in order.
    #[test]
    fn concurrent_readers_never_miss_an_entry() {
        let log: Arc<ChangeLog> = Arc::from(zeroed());
        let start = Arc::new(std::sync::Barrier::new(5));
        let writers: Vec<_> = (0..3u64)
            .map(|w| {
                let (log, start) = (Arc::clone(&log), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    for i in 0..10_000u64 {
                        // (writer, sequence) packed, never 0
                        log.publish(&[(w + 1) << 32 | (i + 1)]);
                        if i % 64 == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (log, start) = (Arc::clone(&log), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    let (mut seen, mut last) = (0u64, [None::<u64>; 4]);
                    let mut checked = 0u64;
                    while seen < 30_000 {
                        let mut got = Vec::new();
                        match log.since(seen, |fp| got.push(fp)) {
                            Since::Nothing => std::hint::spin_loop(),
                            Since::Read(now) => {
                                assert_eq!(got.len() as u64, now - seen);
                                for fp in got {
                                    let (w, i) = ((fp >> 32) as usize, fp & 0xffff_ffff);
                                    if let Some(l) = last[w] {
                                        assert_eq!(i, l + 1, "writer {w}: an entry skipped or repeated");
                                    }
                                    last[w] = Some(i);
                                    checked += 1;
                                }
                                seen = now;
                            }
                            Since::Everything(now) => {
                                // What came before `now` may be gone: start following afresh.
                                last = [None; 4];
                                seen = now;
                            }
                        }
                    }
                    checked
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let checked: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert!(checked > 0, "the readers checked entries");
        assert_eq!(log.published(), 30_000);
    }
}
