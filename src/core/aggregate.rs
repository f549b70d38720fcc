//! Refusals counted, not listed: the rules that keep security events bounded whatever anyone
//! sends. Pure; the edge keeps one `Table` per database in shared memory, under its lock, and
//! the event writer turns entries into rows of `token.events`.
//!
//! Every refusal is counted into exactly one entry, so the rows' counts add up to the refusals
//! made. An entry is keyed by what an investigator filters on (reason, prefix, environment,
//! client address, database user, application name, and the 4-character hint) and lives for
//! one window (`Limits::window_us`): its first refusal makes a new row (the writer inserts it
//! at once), later ones only raise its count. Three folds keep the table and the rows bounded:
//! - hints: once a source (reason, prefix, environment, client, user, application) has made
//!   `max_hints` distinct hints in a window, its further new hints count into one row for the
//!   source, hint left out (`Folded::Hints`): a flood of distinct garbage is one row;
//! - rate: new rows are limited to `max_rows_per_s` per second (a token bucket); a refusal that
//!   would need a row beyond that counts into its reason's overflow row (`Folded::Rate`);
//! - space: when the table has no free entry, the same overflow row.
//!
//! Overflow rows (one per reason) are not limited by the rate, so the writer's work per second
//! is bounded by `max_rows_per_s` inserts plus one update per entry, and memory by `N`.

use crate::ring::FixedStr;

/// How a row's key was coarsened.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Folded {
    /// Exactly one key: every field as the refusal had it.
    No = 0,
    /// The source made too many distinct hints in the window: the hint is left out.
    Hints = 1,
    /// No row could be made (the rate limit or a full table): only the reason is kept.
    Rate = 2,
}

impl Folded {
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            Folded::No => None,
            Folded::Hints => Some("hints"),
            Folded::Rate => Some("rate"),
        }
    }
}

/// What a refusal is counted by.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Key {
    pub reason: u8,
    pub folded: Folded,
    pub prefix: FixedStr<32>,
    pub environment: FixedStr<32>,
    pub client_addr: FixedStr<64>,
    pub db_user: FixedStr<64>,
    pub application_name: FixedStr<64>,
    pub hint: FixedStr<40>,
}

impl Key {
    /// The same key with the hint left out: the source's row.
    fn source(&self) -> Key {
        Key { folded: Folded::Hints, hint: FixedStr::EMPTY, ..*self }
    }

    /// The reason's overflow row.
    fn overflow(&self) -> Key {
        Key {
            reason: self.reason,
            folded: Folded::Rate,
            prefix: FixedStr::EMPTY,
            environment: FixedStr::EMPTY,
            client_addr: FixedStr::EMPTY,
            db_user: FixedStr::EMPTY,
            application_name: FixedStr::EMPTY,
            hint: FixedStr::EMPTY,
        }
    }

    fn same(&self, other: &Key) -> bool {
        self.reason == other.reason
            && self.folded == other.folded
            && self.prefix.get() == other.prefix.get()
            && self.environment.get() == other.environment.get()
            && self.client_addr.get() == other.client_addr.get()
            && self.db_user.get() == other.db_user.get()
            && self.application_name.get() == other.application_name.get()
            && self.hint.get() == other.hint.get()
    }

    /// FNV-1a over the fields: compared before the fields themselves.
    fn hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            h ^= 0xff;
            h = h.wrapping_mul(0x0100_0000_01b3);
        };
        eat(&[self.reason, self.folded as u8]);
        for f in [self.prefix.get(), self.environment.get(), self.client_addr.get(), self.db_user.get(),
                  self.application_name.get()] {
            eat(f.unwrap_or("\u{0}").as_bytes());
        }
        eat(self.hint.get().unwrap_or("\u{0}").as_bytes());
        h | 1 // 0 means a free entry
    }
}

/// What is known about the first refusal of an entry, shown in its row.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Sample {
    pub token_id: Option<[u8; 16]>,
    pub caller_token_id: Option<[u8; 16]>,
    pub account: FixedStr<128>,
    pub detail: FixedStr<200>,
    pub backend_pid: i32,
}

/// One counted key. All-zero is a free entry.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Entry {
    /// The key's hash; 0 when the entry is free.
    hash: u64,
    /// Bumped each time the entry is reused, so the writer never marks a reused entry.
    pub generation: u64,
    pub key: Key,
    pub sample: Sample,
    pub first_at: i64,
    pub last_at: i64,
    /// Refusals counted into this entry, and how many of them the writer has written.
    pub count: u64,
    pub written: u64,
    /// The row in token.events, once inserted (0 before).
    pub row_id: i64,
    /// Distinct hints made under this entry's key, when it is a source's entry.
    distinct: u32,
    /// When its oldest refusal not yet written was counted (meaningful while count > written).
    pending_since: i64,
}

impl Entry {
    fn free(&self) -> bool {
        self.hash == 0
    }

    /// Its window has ended and everything in it is written: the entry may be reused.
    fn expired(&self, now: i64, window_us: i64) -> bool {
        now.saturating_sub(self.first_at) >= window_us && self.written == self.count
    }
}

/// The limits, read from settings by the edge.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub window_us: i64,
    pub max_rows_per_s: u32,
    pub max_hints: u32,
}

/// What counting a refusal did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    /// A new entry: the writer should insert its row now.
    NewRow,
    /// An existing row's count went up.
    Increment,
}

/// Reserved overflow entries, one per reason (index = reason).
const OVERFLOW: usize = crate::reason::Reason::SLOTS;

/// The `reason` code of a key that counts accepted legacy JWTs (event legacy_jwt_used), not
/// refusals: the last slot, which no `Reason` uses.
pub const LEGACY_USE: u8 = (crate::reason::Reason::SLOTS - 1) as u8;
const MICRO: i64 = 1_000_000;

/// `N` entries, of which the first `OVERFLOW` are the reasons' overflow rows. All-zero is an empty table.
#[repr(C)]
pub struct Table<const N: usize> {
    entries: [Entry; N],
    /// Row budget, in millionths of a row, and when it was last refilled.
    budget: i64,
    refilled_at: i64,
    /// Refusals counted, written, and counted into folded rows, since the table was reset;
    /// rows made.
    pub counted: u64,
    pub written: u64,
    pub folded: u64,
    pub rows: u64,
}

impl<const N: usize> Table<N> {
    /// Counts one refusal at `now`.
    pub fn count(&mut self, key: &Key, sample: &Sample, now: i64, limits: &Limits) -> Counted {
        self.counted += 1;
        self.refill(now, limits);
        let hash = key.hash();
        if let Some(i) = self.find(key, hash, now, limits.window_us) {
            return self.bump(i, now);
        }
        // A new hint of a source: fold once the source has made too many in this window.
        let source = key.source();
        let source_hash = source.hash();
        let source_at = self.find(&source, source_hash, now, limits.window_us);
        if let Some(s) = source_at {
            if self.entries[s].distinct >= limits.max_hints {
                self.folded += 1;
                return self.bump_or_make(s, now, limits, key);
            }
        }
        // A new row: from the budget, in a free entry; otherwise the reason's overflow row.
        if !self.take_row(limits) {
            return self.overflow(key, sample, now);
        }
        let source_at = source_at.or_else(|| self.claim(&source, source_hash, sample, now, limits.window_us, 0));
        match self.claim(key, hash, sample, now, limits.window_us, 1) {
            Some(_) => {
                if let Some(s) = source_at {
                    self.entries[s].distinct += 1;
                }
                self.rows += 1;
                Counted::NewRow
            }
            None => {
                self.give_row_back();
                self.overflow(key, sample, now)
            }
        }
    }

    fn refill(&mut self, now: i64, limits: &Limits) {
        let cap = i64::from(limits.max_rows_per_s) * MICRO;
        let elapsed = now.saturating_sub(self.refilled_at).max(0);
        if self.refilled_at == 0 {
            self.budget = cap;
        } else {
            self.budget = self.budget.saturating_add(elapsed.saturating_mul(i64::from(limits.max_rows_per_s))).min(cap);
        }
        self.refilled_at = now;
    }

    fn take_row(&mut self, limits: &Limits) -> bool {
        if limits.max_rows_per_s == 0 || self.budget < MICRO {
            return false;
        }
        self.budget -= MICRO;
        true
    }

    fn give_row_back(&mut self) {
        self.budget += MICRO;
    }

    /// A live entry with this key: one whose window has not ended, or that still has refusals
    /// to write (it keeps collecting until written, then a new one starts).
    fn find(&self, key: &Key, hash: u64, now: i64, window_us: i64) -> Option<usize> {
        self.entries[OVERFLOW..]
            .iter()
            .position(|e| e.hash == hash && e.key.same(key) && !e.expired(now, window_us))
            .map(|i| i + OVERFLOW)
    }

    /// A free (or expired) entry for `key` with `count` refusals, or None when the table is full.
    fn claim(&mut self, key: &Key, hash: u64, sample: &Sample, now: i64, window_us: i64, count: u64) -> Option<usize> {
        let i = self.entries[OVERFLOW..].iter().position(|e| e.free() || e.expired(now, window_us))? + OVERFLOW;
        let generation = self.entries[i].generation + 1;
        self.entries[i] = Entry {
            hash,
            generation,
            key: *key,
            sample: *sample,
            first_at: now,
            last_at: now,
            count,
            written: 0,
            row_id: 0,
            distinct: 0,
            pending_since: now,
        };
        Some(i)
    }

    fn bump(&mut self, i: usize, now: i64) -> Counted {
        let e = &mut self.entries[i];
        if e.count == e.written {
            e.pending_since = now;
        }
        e.count += 1;
        e.last_at = now;
        if e.count == 1 { Counted::NewRow } else { Counted::Increment }
    }

    /// A source entry that has counted nothing yet needs a row of its own (from the budget).
    fn bump_or_make(&mut self, s: usize, now: i64, limits: &Limits, key: &Key) -> Counted {
        if self.entries[s].count > 0 {
            return self.bump(s, now);
        }
        if !self.take_row(limits) {
            let sample = self.entries[s].sample;
            return self.overflow(key, &sample, now);
        }
        self.rows += 1;
        self.bump(s, now)
    }

    fn overflow(&mut self, key: &Key, sample: &Sample, now: i64) -> Counted {
        self.folded += 1;
        let i = usize::from(key.reason) % OVERFLOW;
        let e = &mut self.entries[i];
        if e.free() {
            let k = key.overflow();
            *e = Entry {
                hash: k.hash(),
                generation: e.generation + 1,
                key: k,
                sample: Sample { token_id: None, caller_token_id: None, account: FixedStr::EMPTY, detail: FixedStr::EMPTY, ..*sample },
                first_at: now,
                last_at: now,
                count: 0,
                written: 0,
                row_id: 0,
                distinct: 0,
                pending_since: now,
            };
            self.rows += 1;
        }
        self.bump(i, now)
    }

    /// Frees the overflow entries whose window has ended and that are written (their next
    /// refusal starts a new overflow row). Called by the writer after each batch.
    pub fn expire_overflow(&mut self, now: i64, window_us: i64) {
        for e in &mut self.entries[..OVERFLOW] {
            if !e.free() && e.expired(now, window_us) {
                let generation = e.generation;
                *e = Entry { hash: 0, generation, ..*e };
            }
        }
    }

    /// When the oldest refusal not yet written was counted, if any is waiting.
    pub fn oldest_pending(&self) -> Option<i64> {
        self.entries.iter().filter(|e| !e.free() && e.count > e.written).map(|e| e.pending_since).min()
    }

    /// Refusals counted but not yet written.
    pub fn pending(&self) -> u64 {
        self.counted - self.written
    }

    /// Copies up to `max` entries with something to write: (index, copy).
    pub fn to_write(&self, out: &mut Vec<(usize, Entry)>, max: usize) {
        out.clear();
        for (i, e) in self.entries.iter().enumerate() {
            if out.len() == max {
                break;
            }
            if !e.free() && e.count > e.written {
                out.push((i, *e));
            }
        }
    }

    /// Whether an entry needs its row inserted (a new key, or a source that began folding).
    pub fn has_new_rows(&self) -> bool {
        self.entries.iter().any(|e| !e.free() && e.count > 0 && e.row_id == 0)
    }

    /// Gives entry `i` (as copied) its row id before the row is written, so a retry after a
    /// failed transaction writes the same row. Ignored if the entry was reused meanwhile.
    pub fn assign_row(&mut self, i: usize, copy: &Entry, row_id: i64) {
        let e = &mut self.entries[i];
        if e.generation == copy.generation && e.hash == copy.hash && e.row_id == 0 {
            e.row_id = row_id;
        }
    }

    /// Records that the writer wrote entry `i` (as it was copied): its row and its count then.
    /// Ignored if the entry was reused meanwhile.
    pub fn mark_written(&mut self, i: usize, copy: &Entry, row_id: i64) {
        let e = &mut self.entries[i];
        if e.generation != copy.generation || e.hash != copy.hash {
            return;
        }
        self.written += copy.count - e.written;
        e.written = copy.count;
        e.row_id = row_id;
    }

    /// Starts the counts again (for a table passed to another database).
    pub fn reset(&mut self) {
        for e in self.entries.iter_mut() {
            let generation = e.generation;
            *e = Entry { hash: 0, generation, ..*e };
            e.count = 0;
            e.written = 0;
            e.row_id = 0;
            e.distinct = 0;
        }
        self.budget = 0;
        self.refilled_at = 0;
        self.counted = 0;
        self.written = 0;
        self.folded = 0;
        self.rows = 0;
    }

    /// Entries in use (not free), overflow rows included.
    pub fn in_use(&self) -> usize {
        self.entries.iter().filter(|e| !e.free()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reason::Reason;

    const SEC: i64 = 1_000_000;
    const LIMITS: Limits = Limits { window_us: 60 * SEC, max_rows_per_s: 100, max_hints: 10 };

    fn table<const N: usize>() -> Box<Table<N>> {
        let zero = Entry {
            hash: 0,
            generation: 0,
            key: Key { reason: 0, folded: Folded::No, prefix: FixedStr::EMPTY, environment: FixedStr::EMPTY,
                       client_addr: FixedStr::EMPTY, db_user: FixedStr::EMPTY, application_name: FixedStr::EMPTY,
                       hint: FixedStr::EMPTY },
            sample: Sample { token_id: None, caller_token_id: None, account: FixedStr::EMPTY, detail: FixedStr::EMPTY, backend_pid: 0 },
            first_at: 0, last_at: 0, count: 0, written: 0, row_id: 0, distinct: 0, pending_since: 0,
        };
        Box::new(Table { entries: [zero; N], budget: 0, refilled_at: 0, counted: 0, written: 0, folded: 0, rows: 0 })
    }

    fn key(reason: Reason, client: &str, hint: Option<&str>) -> Key {
        Key {
            reason: reason as u8,
            folded: Folded::No,
            prefix: FixedStr::new(Some("hk_live_")),
            environment: FixedStr::new(Some("prod")),
            client_addr: FixedStr::new(Some(client)),
            db_user: FixedStr::new(Some("app")),
            application_name: FixedStr::new(Some("api")),
            hint: FixedStr::new(hint),
        }
    }

    fn sample() -> Sample {
        Sample { token_id: None, caller_token_id: None, account: FixedStr::EMPTY, detail: FixedStr::new(Some("d")), backend_pid: 7 }
    }

    /// Writes everything, as the writer does (row ids from a counter); returns rows inserted.
    fn write_all<const N: usize>(t: &mut Table<N>, next_id: &mut i64) -> usize {
        let mut out = Vec::new();
        t.to_write(&mut out, N);
        let mut inserted = 0;
        for (i, e) in &out {
            let id = if e.row_id == 0 {
                *next_id += 1;
                inserted += 1;
                *next_id
            } else {
                e.row_id
            };
            t.mark_written(*i, e, id);
        }
        inserted
    }

    fn sum_written<const N: usize>(t: &Table<N>) -> u64 {
        t.entries.iter().map(|e| e.written).sum()
    }

    #[test]
    fn repeats_of_one_key_are_one_row_with_a_count() {
        let mut t = table::<64>();
        let k = key(Reason::BadChecksum, "1.2.3.4", Some("hk_live_AbCd"));
        assert_eq!(t.count(&k, &sample(), SEC, &LIMITS), Counted::NewRow, "the first is visible at once");
        for n in 0..999 {
            assert_eq!(t.count(&k, &sample(), SEC + n, &LIMITS), Counted::Increment);
        }
        let mut id = 0;
        assert_eq!(write_all(&mut t, &mut id), 1);
        assert_eq!((t.counted, t.written, t.rows), (1000, 1000, 1));
    }

    #[test]
    fn a_source_with_many_distinct_hints_folds_into_one_row() {
        let mut t = table::<64>();
        let mut news = 0;
        for n in 0..10_000 {
            let hint = format!("hk_live_{n:04}");
            if t.count(&key(Reason::NotFound, "6.6.6.6", Some(&hint)), &sample(), SEC + n, &LIMITS) == Counted::NewRow {
                news += 1;
            }
        }
        let mut id = 0;
        let rows = write_all(&mut t, &mut id);
        assert_eq!(rows, 11, "ten hints, then the source's folded row");
        assert_eq!(news, 11);
        assert_eq!(sum_written(&t), 10_000, "every refusal counted exactly once");
        assert!(t.entries.iter().any(|e| e.key.folded == Folded::Hints && e.count == 9_990 && e.key.hint.get().is_none()));
    }

    #[test]
    fn new_rows_are_bounded_per_second_and_the_rest_is_counted_in_overflow_rows() {
        let mut t = table::<1024>();
        let limits = Limits { max_hints: 1_000_000, ..LIMITS };
        let mut id = 0;
        let mut rows = 0;
        // 10 seconds of 5,000 distinct sources a second.
        for s in 0..10 {
            for n in 0..5_000 {
                let client = format!("10.{s}.{}.{}", n / 256, n % 256);
                t.count(&key(Reason::Malformed, &client, None), &sample(), (s + 1) * SEC + n, &limits);
            }
            rows += write_all(&mut t, &mut id);
            t.expire_overflow((s + 1) * SEC + 5_000, limits.window_us);
        }
        assert!(rows <= 100 * 11 + 1, "at most 100 a second (and the first second's burst), one overflow row: {rows}");
        assert_eq!(sum_written(&t), 50_000);
        assert_eq!(t.written, 50_000);
        assert!(t.entries[Reason::Malformed as usize % OVERFLOW].key.folded == Folded::Rate);
    }

    #[test]
    fn a_full_table_counts_into_the_overflow_row() {
        let mut t = table::<{ OVERFLOW + 8 }>(); // the overflow rows + 8 keys
        let limits = Limits { max_rows_per_s: 1_000, ..LIMITS };
        for n in 0..100 {
            t.count(&key(Reason::Revoked, &format!("c{n}"), Some("hk_live_x")), &sample(), SEC, &limits);
        }
        let mut id = 0;
        write_all(&mut t, &mut id);
        assert_eq!(t.written, 100);
        assert_eq!(t.entries[Reason::Revoked as usize % OVERFLOW].count, 100 - 4, "8 entries: 4 sources and their 4 rows");
    }

    #[test]
    fn a_key_starts_a_new_row_after_its_window_once_written() {
        let mut t = table::<64>();
        let k = key(Reason::Expired, "1.1.1.1", Some("hk_live_e"));
        t.count(&k, &sample(), SEC, &LIMITS);
        // Not yet written: the window ends, but it keeps collecting until written.
        assert_eq!(t.count(&k, &sample(), 70 * SEC, &LIMITS), Counted::Increment);
        let mut id = 0;
        write_all(&mut t, &mut id);
        assert_eq!(t.count(&k, &sample(), 71 * SEC, &LIMITS), Counted::NewRow);
    }

    #[test]
    fn marking_a_reused_entry_is_ignored() {
        let mut t = table::<{ OVERFLOW + 4 }>();
        let a = key(Reason::Expired, "a", Some("hk_live_a"));
        t.count(&a, &sample(), SEC, &LIMITS);
        let mut out = Vec::new();
        t.to_write(&mut out, 10);
        let stale = out.clone();
        for (i, e) in &out {
            t.mark_written(*i, e, 1);
        }
        // The window passes; the entries are reused by other keys; a late mark of the old
        // copy must not touch them.
        for n in 0..4 {
            t.count(&key(Reason::Expired, &format!("z{n}"), Some("hk_live_z")), &sample(), 200 * SEC, &LIMITS);
        }
        let before = t.written;
        for (i, e) in &stale {
            t.mark_written(*i, e, 99);
        }
        assert_eq!(t.written, before);
    }

    #[test]
    fn the_oldest_unwritten_refusal_is_known() {
        let mut t = table::<64>();
        assert_eq!(t.oldest_pending(), None);
        t.count(&key(Reason::Expired, "a", Some("hk_live_a")), &sample(), 5 * SEC, &LIMITS);
        t.count(&key(Reason::Expired, "a", Some("hk_live_a")), &sample(), 6 * SEC, &LIMITS);
        assert_eq!(t.oldest_pending(), Some(5 * SEC));
        let mut id = 0;
        write_all(&mut t, &mut id);
        assert_eq!(t.oldest_pending(), None);
        t.count(&key(Reason::Expired, "a", Some("hk_live_a")), &sample(), 7 * SEC, &LIMITS);
        assert_eq!(t.oldest_pending(), Some(7 * SEC), "pending again from the first increment after the write");
    }

    #[test]
    fn a_zero_rate_puts_everything_in_overflow_rows() {
        let mut t = table::<64>();
        let limits = Limits { max_rows_per_s: 0, ..LIMITS };
        for n in 0..50 {
            t.count(&key(Reason::NotFound, &format!("c{n}"), Some("h")), &sample(), SEC, &limits);
        }
        assert_eq!(t.entries[Reason::NotFound as usize % OVERFLOW].count, 50);
    }
}
