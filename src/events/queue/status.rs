//! What the queue reports: per-slot counts for `worker_status()` and this database's writer
//! figures for `metrics()`. Read under the queue lock, never changed here.

use pg_token_core::clock;
use pg_token_core::ring::Ring;
use pgrx::pg_sys;

use super::{locked, slot_for, WorkerState};

/// Counts of one ring: queued now, written and dropped since the slot was claimed.
#[derive(Clone, Copy)]
pub struct RingStatus {
    pub queued: u64,
    pub written: u64,
    pub dropped: u64,
}

/// Counts of a database's refusals since the slot was claimed.
#[derive(Clone, Copy)]
pub struct RefusalStatus {
    /// Refusals counted, written (into rows), counted into folded rows, and dropped (a batch
    /// that could not be written three times running).
    pub counted: u64,
    pub written: u64,
    pub folded: u64,
    pub dropped: u64,
    /// Rows made, and the table entries in use now.
    pub rows: u64,
    pub keys: u64,
}

pub struct SlotStatus {
    pub database: pg_sys::Oid,
    pub worker_pid: Option<i32>,
    pub refusals: RefusalStatus,
    pub touches: RingStatus,
}

pub fn status() -> Vec<SlotStatus> {
    fn ring<T: Copy, const N: usize>(r: &Ring<T, N>) -> RingStatus {
        RingStatus { queued: r.len() as u64, written: r.tail(), dropped: r.dropped() }
    }
    locked(|shared| {
        shared
            .slots
            .iter()
            .filter(|s| s.dboid != pg_sys::InvalidOid)
            .map(|s| SlotStatus {
                database: s.dboid,
                worker_pid: (s.state == WorkerState::Running).then_some(s.worker_pid),
                refusals: RefusalStatus {
                    counted: s.refusals.counted,
                    written: s.refusals.written,
                    folded: s.refusals.folded,
                    dropped: s.refusals_dropped,
                    rows: s.refusals.rows,
                    keys: s.refusals.in_use() as u64,
                },
                touches: ring(&s.touches),
            })
            .collect()
    })
    .unwrap_or_default()
}

/// What a scraper reads about this database's event writer (`token.metrics`).
pub struct WriterMetrics {
    pub refusals_pending: u64,
    pub refusals_dropped: u64,
    pub rows: u64,
    pub touches_queued: u64,
    pub touches_dropped: u64,
    pub writer_running: bool,
    /// How long the oldest record still unwritten (refusal or last-use update) has waited.
    pub lag_us: i64,
}

pub fn writer_metrics() -> WriterMetrics {
    // SAFETY: MyDatabaseId is set in a connected backend.
    let db = unsafe { pg_sys::MyDatabaseId };
    let now = clock::now();
    locked(|shared| {
        slot_for(shared, db, false).map(|i| {
            let s = &shared.slots[i];
            let oldest = [s.refusals.oldest_pending(), s.touches.oldest().map(|t| t.at)].into_iter().flatten().min();
            WriterMetrics {
                refusals_pending: s.refusals_pending(),
                refusals_dropped: s.refusals_dropped,
                rows: s.refusals.rows,
                touches_queued: s.touches.len() as u64,
                touches_dropped: s.touches.dropped(),
                writer_running: s.state == WorkerState::Running,
                lag_us: oldest.map_or(0, |t| now.saturating_sub(t).max(0)),
            }
        })
    })
    .flatten()
    .unwrap_or(WriterMetrics {
        refusals_pending: 0,
        refusals_dropped: 0,
        rows: 0,
        touches_queued: 0,
        touches_dropped: 0,
        writer_running: false,
        lag_us: 0,
    })
}

