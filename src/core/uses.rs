//! Usage caps: a token may be accepted a fixed number of times (optionally refilled). The count
//! must be exact across every backend, spent even when the caller's transaction rolls back, and
//! never exceeded, also across a crash.
//!
//! So a use is never counted in the caller's transaction. The event writer reserves uses in
//! blocks, committing `uses_remaining - block` in its own transaction, and hands the block to
//! shared memory, where backends spend it one use at a time under a lock. A crash loses what was
//! reserved and not spent (it was already subtracted in the table), never grants extra. This
//! module is that shared table of blocks: which token has how many reserved uses, which tokens
//! wait for a reservation, and what the writer answered. The edge holds it under the queue
//! lock, asks the writer, and waits. Pure: no Postgres.
//!
//! The next block is requested when a quarter of the current one is left, so that a busy token
//! rarely waits for the writer; a backend waits only when its token has none left. A token that
//! refills asks only once its block is spent, so a refill (which resets the count) never meets
//! unspent uses of the period before.

/// The largest block reserved at once: at most this many uses are lost per token by a crash
/// (and only a token with over 16,000 left reserves this many: a sixteenth of what is left).
pub const MAX_BLOCK: i64 = 1024;
/// How many requests the writer takes per transaction.
pub const MAX_REQUESTS: usize = 64;
/// Entries looked at from a token's home position.
pub const PROBE: usize = 64;

/// How many uses to reserve when `remaining` are left in the table: a sixteenth, between 1 and
/// `MAX_BLOCK`, so a nearly spent cap is reserved one use at a time and a crash loses at most a
/// sixteenth of what was left.
pub fn block_size(remaining: i64) -> i64 {
    (remaining / 16).clamp(1, MAX_BLOCK)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
enum State {
    #[default]
    Idle = 0,
    /// A backend asked for a block; the writer has not taken the request yet.
    Requested = 1,
    /// The writer is reserving.
    Reserving = 2,
}

/// One token's reserved uses. All-zero is a free entry.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Entry {
    token_id: [u8; 16],
    /// The cap's version the uses were reserved under.
    version: i64,
    /// Reserved and not yet spent.
    available: i64,
    /// Left in the table after the last reservation (-1: not known yet).
    remaining: i64,
    /// When the cap next refills (0: never), once exhausted.
    refill_at: i64,
    exhausted: bool,
    state: State,
    want: i64,
    /// Last time a backend spent or asked: the least recently used idle entry is reused first.
    last_at: i64,
}

impl Entry {
    fn free(&self) -> bool {
        self.token_id == [0; 16]
    }
}

/// What a backend does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// One use spent; this many are left across the server (reserved here plus in the table).
    /// `asked`: the next block was requested now (wake the writer).
    Spent { remaining: i64, asked: bool },
    /// No use left (until `refill_at`, when not 0).
    Exhausted { refill_at: i64 },
    /// A block was requested (by this call: wake the writer) or is being reserved: wait and ask
    /// again.
    Requested,
    Waiting,
    /// The cap changed since this backend read the token: read it again.
    Stale,
    /// Every entry is waiting for a reservation: refuse rather than count anywhere else.
    Full,
}

/// A request the writer takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub slot: usize,
    pub token_id: [u8; 16],
    pub version: i64,
    pub want: i64,
}

/// What the writer reserved: None when the token (at that version) has no cap any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    pub granted: i64,
    pub remaining: i64,
    /// When the cap refills next (0: never).
    pub refill_at: i64,
}

/// `N` entries. All-zero is an empty table.
#[repr(C)]
pub struct Table<const N: usize> {
    entries: [Entry; N],
    /// Requests made (by backends) and completed (by the writer).
    pub requested: u64,
    pub completed: u64,
    /// Reserved uses dropped unspent when their entry was reused for another token.
    pub evicted_uses: u64,
}

fn home(token_id: &[u8; 16], n: usize) -> usize {
    let mut x = [0u8; 8];
    x.copy_from_slice(&token_id[..8]);
    (u64::from_le_bytes(x).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 13) as usize % n
}

impl<const N: usize> Table<N> {
    /// The positions a token may occupy: `PROBE` entries from its home.
    fn window(token_id: &[u8; 16]) -> impl Iterator<Item = usize> {
        let h = home(token_id, N);
        (0..PROBE.min(N)).map(move |k| (h + k) % N)
    }

    fn find(&self, token_id: &[u8; 16]) -> Option<usize> {
        Self::window(token_id).find(|&i| self.entries[i].token_id == *token_id)
    }

    /// A free entry in the token's window, else its least recently used idle one (whose
    /// unspent uses are lost, counted in `evicted_uses`).
    fn claim(&mut self, token_id: &[u8; 16], version: i64) -> Option<usize> {
        let i = match Self::window(token_id).find(|&i| self.entries[i].free()) {
            Some(i) => i,
            None => {
                let i = Self::window(token_id)
                    .filter(|&i| self.entries[i].state == State::Idle)
                    .min_by_key(|&i| (self.entries[i].available > 0, self.entries[i].last_at))?;
                self.evicted_uses += self.entries[i].available.max(0) as u64;
                i
            }
        };
        self.entries[i] = Entry { token_id: *token_id, version, remaining: -1, ..Entry::default() };
        Some(i)
    }

    /// Spends one use of `token_id` under cap `version`, or says what to do instead.
    /// `table_remaining` is what the backend read from the row (sizes the first block);
    /// `refills`: the cap refills (no block is asked for ahead).
    pub fn spend(&mut self, token_id: &[u8; 16], version: i64, table_remaining: i64, refills: bool, now: i64) -> Step {
        let i = match self.find(token_id) {
            Some(i) => i,
            None => match self.claim(token_id, version) {
                Some(i) => i,
                None => return Step::Full,
            },
        };
        let e = &mut self.entries[i];
        e.last_at = now;
        if version < e.version {
            return Step::Stale;
        }
        if version > e.version {
            // The cap was changed: what was reserved under the old one is not spent under it.
            self.evicted_uses += e.available.max(0) as u64;
            *e = Entry { token_id: *token_id, version, remaining: -1, last_at: now, state: e.state, ..Entry::default() };
        }
        if e.available > 0 {
            e.available -= 1;
            let left = e.available + e.remaining.max(0);
            // Ask for the next block while a quarter of this one is left, so a busy token
            // rarely waits; not when the table has none, nor for a refilling cap.
            let asked = !refills && e.state == State::Idle && e.remaining > 0 && e.available * 4 < e.want.max(1);
            if asked {
                e.want = block_size(e.remaining);
                e.state = State::Requested;
                self.requested += 1;
            }
            return Step::Spent { remaining: left, asked };
        }
        if e.exhausted && (e.refill_at == 0 || now < e.refill_at) {
            return Step::Exhausted { refill_at: e.refill_at };
        }
        match e.state {
            State::Idle => {
                let basis = if e.remaining >= 0 { e.remaining } else { table_remaining };
                e.want = block_size(basis);
                e.state = State::Requested;
                self.requested += 1;
                Step::Requested
            }
            State::Requested | State::Reserving => Step::Waiting,
        }
    }

    /// Whether any request waits for the writer.
    pub fn has_requests(&self) -> bool {
        self.entries.iter().any(|e| e.state == State::Requested)
    }

    /// The writer takes up to `MAX_REQUESTS` requests.
    pub fn take_requests(&mut self, out: &mut Vec<Request>) {
        out.clear();
        for (slot, e) in self.entries.iter_mut().enumerate() {
            if out.len() == MAX_REQUESTS {
                break;
            }
            if e.state == State::Requested {
                e.state = State::Reserving;
                out.push(Request { slot, token_id: e.token_id, version: e.version, want: e.want });
            }
        }
    }

    /// The writer's answer to a request (None: no cap at that version any more). An answer for
    /// an entry that was reused, or reset by a newer cap, is dropped (its uses stay subtracted:
    /// lost, never granted).
    pub fn complete(&mut self, req: &Request, answer: Option<Reserved>) {
        self.completed += 1;
        let Some(e) = self.entries.get_mut(req.slot) else { return };
        if e.token_id != req.token_id || e.state != State::Reserving {
            return;
        }
        e.state = State::Idle;
        if e.version != req.version {
            return;
        }
        match answer {
            Some(r) => {
                e.available += r.granted;
                e.remaining = r.remaining;
                e.exhausted = r.granted == 0 && e.available == 0;
                e.refill_at = if r.granted == 0 { r.refill_at } else { 0 };
            }
            None => {
                // Read again: the backend's copy of the row is older than the table's.
                e.version = e.version.saturating_add(1);
                e.available = 0;
            }
        }
    }

    /// The writer failed (its transaction errored): requests in progress go back to waiting,
    /// to be taken again.
    pub fn retry_in_progress(&mut self) {
        for e in self.entries.iter_mut().filter(|e| e.state == State::Reserving) {
            e.state = State::Requested;
        }
    }

    /// Forgets everything reserved (the slot goes to another database).
    pub fn reset(&mut self) {
        for e in self.entries.iter_mut() {
            *e = Entry::default();
        }
        self.requested = 0;
        self.completed = 0;
        self.evicted_uses = 0;
    }

    /// Uses reserved and not spent for `token_id`, and whether a reservation for it is in
    /// flight (the table may already hold its subtraction): an administrator's exact count reads
    /// this, the table, and this again, and trusts the sum only when nothing was in flight and
    /// no reservation completed in between (`completed`).
    pub fn reserved(&self, token_id: &[u8; 16]) -> (i64, bool) {
        self.find(token_id)
            .map_or((0, false), |i| (self.entries[i].available.max(0), self.entries[i].state == State::Reserving))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table<const N: usize>() -> Box<Table<N>> {
        Box::new(Table { entries: [Entry::default(); N], requested: 0, completed: 0, evicted_uses: 0 })
    }

    const T: [u8; 16] = [7; 16];

    /// Plays the writer: reserves from `stock` (the table's column) for every request.
    fn serve<const N: usize>(t: &mut Table<N>, stock: &mut i64) {
        let mut reqs = Vec::new();
        t.take_requests(&mut reqs);
        for r in reqs {
            let granted = r.want.min(*stock);
            *stock -= granted;
            t.complete(&r, Some(Reserved { granted, remaining: *stock, refill_at: 0 }));
        }
    }

    #[test]
    fn blocks_grow_with_what_is_left_and_shrink_at_the_end() {
        assert_eq!(block_size(1), 1);
        assert_eq!(block_size(15), 1);
        assert_eq!(block_size(160), 10);
        assert_eq!(block_size(1_000_000), MAX_BLOCK);
        assert_eq!(block_size(1000), 62);
        assert_eq!(block_size(0), 1);
    }

    #[test]
    fn exactly_the_cap_is_spent_across_interleaved_backends() {
        let mut t = table::<16>();
        let mut stock = 1000;
        let mut spent = 0;
        let mut now = 0;
        // Eight "backends" take turns; the writer runs between turns.
        'outer: loop {
            for _ in 0..8 {
                now += 1;
                match t.spend(&T, 0, 1000, false, now) {
                    Step::Spent { .. } => spent += 1,
                    Step::Exhausted { .. } => break 'outer,
                    Step::Requested | Step::Waiting => {}
                    other => panic!("{other:?}"),
                }
            }
            serve(&mut t, &mut stock);
        }
        assert_eq!(spent, 1000);
        assert_eq!(stock, 0);
    }

    #[test]
    fn remaining_counts_reserved_and_table_uses() {
        let mut t = table::<4>();
        let mut stock = 100;
        assert_eq!(t.spend(&T, 0, 100, false, 1), Step::Requested);
        assert_eq!(t.spend(&T, 0, 100, false, 1), Step::Waiting, "one request per token at a time");
        serve(&mut t, &mut stock);
        assert_eq!(stock, 94, "a sixteenth of 100 reserved");
        assert_eq!(t.spend(&T, 0, 100, false, 2), Step::Spent { remaining: 99, asked: false });
        assert_eq!(t.reserved(&T), (5, false));
    }

    #[test]
    fn the_next_block_is_asked_for_ahead_unless_the_cap_refills() {
        let mut t = table::<4>();
        let mut stock = 10_000;
        t.spend(&T, 0, 10_000, false, 1);
        serve(&mut t, &mut stock);
        let block = block_size(10_000);
        let asked: Vec<bool> = (0..block).map(|n| match t.spend(&T, 0, 10_000, false, 2 + n) {
            Step::Spent { asked, .. } => asked,
            other => panic!("{other:?}"),
        }).collect();
        assert_eq!(asked.iter().filter(|a| **a).count(), 1, "asked once, with a quarter of the block left");
        let at = asked.iter().position(|a| *a).unwrap_or(0) as i64;
        assert!((block * 3 / 4 - 1..=block * 3 / 4 + 1).contains(&at), "when a quarter was left: {at}");
        serve(&mut t, &mut stock);
        assert!(matches!(t.spend(&T, 0, 10_000, false, 10_000), Step::Spent { .. }), "no wait: the next block came ahead");
        let mut r = table::<4>();
        let mut stock = 10_000;
        r.spend(&T, 0, 10_000, true, 1);
        serve(&mut r, &mut stock);
        assert!((0..block).all(|n| matches!(r.spend(&T, 0, 10_000, true, 2 + n), Step::Spent { asked: false, .. })));
    }

    #[test]
    fn an_exhausted_cap_waits_for_its_refill() {
        let mut t = table::<4>();
        assert_eq!(t.spend(&T, 0, 0, true, 1), Step::Requested);
        let mut reqs = Vec::new();
        t.take_requests(&mut reqs);
        t.complete(&reqs[0], Some(Reserved { granted: 0, remaining: 0, refill_at: 100 }));
        assert_eq!(t.spend(&T, 0, 0, true, 50), Step::Exhausted { refill_at: 100 });
        assert_eq!(t.spend(&T, 0, 0, true, 100), Step::Requested, "due: ask the writer, which refills");
    }

    #[test]
    fn a_new_cap_version_drops_the_old_reservation() {
        let mut t = table::<4>();
        let mut stock = 64;
        t.spend(&T, 0, 64, false, 1);
        serve(&mut t, &mut stock);
        assert!(matches!(t.spend(&T, 0, 64, false, 2), Step::Spent { .. }));
        assert_eq!(t.spend(&T, 1, 10, false, 3), Step::Requested, "the admin set a new cap");
        assert_eq!(t.evicted_uses, 3, "a block of 4, one spent");
        assert_eq!(t.spend(&T, 0, 64, false, 4), Step::Stale, "a backend with the old row reads it again");
        // The writer's answer for the old version is dropped if one was in flight.
        let old = Request { slot: 0, token_id: T, version: 0, want: 4 };
        t.complete(&old, Some(Reserved { granted: 4, remaining: 0, refill_at: 0 }));
        assert_eq!(t.reserved(&T), (0, false));
    }

    #[test]
    fn a_token_without_a_cap_at_that_version_is_read_again() {
        let mut t = table::<4>();
        t.spend(&T, 3, 5, false, 1);
        let mut reqs = Vec::new();
        t.take_requests(&mut reqs);
        t.complete(&reqs[0], None);
        assert_eq!(t.spend(&T, 3, 5, false, 2), Step::Stale);
    }

    #[test]
    fn entries_are_reused_least_recently_used_first_and_losses_counted() {
        let mut t = table::<2>();
        let mut stock = 1000;
        for (n, id) in [[1u8; 16], [2u8; 16]].iter().enumerate() {
            t.spend(id, 0, 1000, false, n as i64);
            serve(&mut t, &mut stock);
            t.spend(id, 0, 1000, false, 10 + n as i64);
        }
        assert_eq!(t.spend(&[3u8; 16], 0, 10, false, 20), Step::Requested);
        assert_eq!(t.evicted_uses, 61, "token 1's block of 62, one spent");
        // With every entry waiting on the writer, nothing is free.
        t.spend(&[4u8; 16], 0, 10, false, 21);
        assert_eq!(t.spend(&[5u8; 16], 0, 10, false, 22), Step::Full);
    }

    #[test]
    fn a_failed_writer_leaves_requests_to_retry() {
        let mut t = table::<4>();
        t.spend(&T, 0, 10, false, 1);
        let mut reqs = Vec::new();
        t.take_requests(&mut reqs);
        assert!(!t.has_requests());
        t.retry_in_progress();
        assert!(t.has_requests());
    }
}
