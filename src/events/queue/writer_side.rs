//! The writer's side of the queue: attaching to a slot, taking batches, recording what was
//! committed or failed, and leaving. Split from `queue` (same lock, same layout) to keep each
//! file readable; every function here runs under `locked` and never raises.

use std::ptr;

use pg_token_core::aggregate::Entry;
use pg_token_core::clock;
use pg_token_core::uses::{Request, Reserved};
use pgrx::pg_sys;

use super::{locked, Phase, Slot, Touch, WorkerState, BATCH, EVENT_KEYS, TOUCH_BATCH};


/// Called by the writer once connected: takes ownership of the slot, unless another writer
/// already has it (one registered later, when this one seemed lost). Returns its database and
/// whether batches were discarded because earlier writers kept failing on them.
pub fn worker_attach(slot: usize) -> Option<(pg_sys::Oid, bool)> {
    locked(|shared| {
        let s = shared.slots.get_mut(slot)?;
        if s.state != WorkerState::Starting {
            return None;
        }
        s.state = WorkerState::Running;
        // SAFETY: MyProcPid and MyLatch are this process's own, valid for its lifetime.
        unsafe {
            s.worker_pid = pg_sys::MyProcPid;
            s.latch = pg_sys::MyLatch;
        }
        s.phase = Phase::Idle;
        let mut discarded = false;
        if s.event_failures >= 3 {
            discard_refusals(s);
            discarded = true;
        }
        if s.touch_failures >= 3 {
            s.touches.discard(TOUCH_BATCH);
            s.touch_failures = 0;
            discarded = true;
        }
        Some((s.dboid, discarded))
    })
    .flatten()
}

/// Something in the pending refusals cannot be written: gives up on them, counted as dropped.
fn discard_refusals(s: &mut Slot) {
    let mut out = Vec::new();
    s.refusals.to_write(&mut out, EVENT_KEYS);
    for (i, e) in &out {
        s.refusals_dropped += e.count - e.written;
        s.refusals.mark_written(*i, e, e.row_id);
    }
    s.refusals.written -= out.iter().map(|(_, e)| e.count - e.written).sum::<u64>();
    s.event_failures = 0;
}

/// The writer's transaction for the batch it took last failed and was rolled back. Only an
/// error in the batch itself (`in_batch`: bad data, a bug) counts against it: after three
/// running the batch is discarded, counted as dropped, and true is returned. Anything else
/// (a lock timeout, a cancel, a serialization failure or deadlock, no memory) leaves the
/// batch queued, uncounted, to be written again. Reservations and family revocations in
/// flight are asked again either way (never granted twice: none was committed).
pub fn worker_failed(slot: usize, in_batch: bool) -> bool {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        let mut discarded = false;
        match s.phase {
            Phase::Events if in_batch => {
                s.event_failures += 1;
                if s.event_failures >= 3 {
                    discard_refusals(s);
                    discarded = true;
                }
            }
            Phase::Touches if in_batch => {
                s.touch_failures += 1;
                if s.touch_failures >= 3 {
                    s.touches.discard(TOUCH_BATCH);
                    s.touch_failures = 0;
                    discarded = true;
                }
            }
            Phase::Events | Phase::Touches | Phase::Uses | Phase::Idle => {}
        }
        s.uses.retry_in_progress();
        s.families.retry_in_progress(in_batch);
        s.phase = Phase::Idle;
        discarded
    })
    .unwrap_or(false)
}

pub fn worker_database(slot: usize) -> Option<pg_sys::Oid> {
    locked(|shared| shared.slots.get(slot).map(|s| s.dboid)).flatten()
}

/// What waits for the writer.
pub struct Waiting {
    /// A refusal key needs its row (write it now).
    pub new_rows: bool,
    /// Refusals counted but not written.
    pub refusals: u64,
    /// Someone waits in flush_events for the refusals.
    pub flush_refusals: bool,
    pub touches: usize,
    pub flush_touches: bool,
    /// Backends wait for use reservations.
    pub reservations: bool,
    /// Backends wait for token families to be revoked.
    pub families: bool,
}

pub fn worker_counts(slot: usize) -> Waiting {
    locked(|shared| {
        let s = &shared.slots[slot];
        Waiting {
            new_rows: s.refusals.has_new_rows(),
            refusals: s.refusals_pending(),
            flush_refusals: s.refusals.written + s.refusals_dropped < s.flush_refusals_until,
            touches: s.touches.len(),
            flush_touches: s.touches.tail() < s.flush_touches_until,
            reservations: s.uses.has_requests(),
            families: s.families.has_requests(),
        }
    })
    .unwrap_or(Waiting {
        new_rows: false,
        refusals: 0,
        flush_refusals: false,
        touches: 0,
        flush_touches: false,
        reservations: false,
        families: false,
    })
}

/// Copies the refusal entries with something to write, and records that the writer is now
/// writing refusals.
pub fn worker_peek_refusals(slot: usize, out: &mut Vec<(usize, Entry)>) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        s.refusals.to_write(out, BATCH);
        s.phase = Phase::Events;
    });
}

/// Gives the entries that have no row yet their row ids (drawn from token.events_id_seq in the
/// writer's transaction), before the rows are written: if the transaction fails, the next
/// attempt writes the same ids again, so a row is never made twice. Updates `out` too.
pub fn worker_assign_rows(slot: usize, out: &mut [(usize, Entry)], ids: &[i64]) {
    locked(|shared| {
        let table = &mut shared.slots[slot].refusals;
        let mut ids = ids.iter();
        for (i, e) in out.iter_mut().filter(|(_, e)| e.row_id == 0) {
            if let Some(&id) = ids.next() {
                e.row_id = id;
                table.assign_row(*i, e, id);
            }
        }
    });
}

/// Records that the refusal entries in `written` (as copied) are committed, and frees the
/// overflow rows whose window has ended.
pub fn worker_wrote_refusals(slot: usize, written: &[(usize, Entry)], window_us: i64) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        for (i, e) in written {
            s.refusals.mark_written(*i, e, e.row_id);
        }
        s.refusals.expire_overflow(clock::now(), window_us);
        s.event_failures = 0;
        s.phase = Phase::Idle;
    });
}

/// The same for up to `TOUCH_BATCH` last-use updates.
pub fn worker_peek_touches(slot: usize, out: &mut Vec<Touch>) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        s.touches.peek(out, TOUCH_BATCH);
        s.phase = Phase::Touches;
    });
}

/// Consumes the last-use updates the writer just committed (those it peeked last).
pub fn worker_consumed_touches(slot: usize, n: usize) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        s.touches.consume(n);
        s.touch_failures = 0;
        s.phase = Phase::Idle;
    });
}

/// The writer takes the reservation requests waiting.
pub fn worker_take_reservations(slot: usize, out: &mut Vec<Request>) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        s.uses.take_requests(out);
        s.phase = Phase::Uses;
    });
}

/// The writer committed these reservations (None: no cap at that version).
pub fn worker_reserved(slot: usize, answers: &[(Request, Option<Reserved>)]) {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        for (r, a) in answers {
            s.uses.complete(r, *a);
        }
        s.phase = Phase::Idle;
    });
}

/// Leaves the slot if nothing is queued; returns false (stay) if records arrived meanwhile.
pub fn worker_try_detach(slot: usize) -> bool {
    locked(|shared| {
        let s = &mut shared.slots[slot];
        if !s.is_empty() {
            return false;
        }
        s.state = WorkerState::Stopped;
        s.latch = ptr::null_mut();
        true
    })
    .unwrap_or(true)
}

/// The writer is exiting (normally or not, attached or not): release the slot so that the
/// next record starts a new writer. Only one writer is ever starting per slot, so a slot still
/// `Starting` is ours.
pub fn worker_exited(slot: usize, abnormal: bool) {
    locked(|shared| {
        if let Some(s) = shared.slots.get_mut(slot) {
            // SAFETY: reading our own pid.
            let mine = s.worker_pid == unsafe { pg_sys::MyProcPid } && s.state == WorkerState::Running;
            if mine || s.state == WorkerState::Starting {
                s.state = WorkerState::Stopped;
                s.latch = ptr::null_mut();
                if abnormal {
                    match s.phase {
                        Phase::Events => s.event_failures += 1,
                        Phase::Touches => s.touch_failures += 1,
                        Phase::Uses | Phase::Idle => {}
                    }
                }
                // Reservations in progress were not committed (or were, and are lost: never
                // granted twice): the next writer takes the requests again.
                s.uses.retry_in_progress();
                s.families.retry_in_progress(abnormal);
                s.phase = Phase::Idle;
            }
        }
    });
}
