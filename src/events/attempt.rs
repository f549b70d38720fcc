//! One transaction of the event writer, and what follows when it fails: the error is caught
//! and the transaction rolled back in the writer (which lives on), the batch stays queued and
//! is tried again after a pause, and only an error in the batch itself counts against it.
//! Never lets an error end the writer: a writer that exits on a lock timeout or a cancel
//! leaves its records waiting for the next record to start another, and used to lose them
//! after three.

use std::time::{Duration, Instant};

use pgrx::bgworkers::BackgroundWorker;
use pgrx::{pg_sys, PgTryBuilder};

use super::plans::Plans;
use super::queue;
use crate::error;

/// When the writer may try again after failed transactions: 100 ms after the first, doubling
/// up to 5 s while they keep failing; reset by a success.
#[derive(Default)]
pub(super) struct Retry {
    failures: u32,
    at: Option<Instant>,
}

impl Retry {
    pub(super) fn wait_left(&self) -> Option<Duration> {
        self.at.and_then(|t| t.checked_duration_since(Instant::now())).filter(|d| !d.is_zero())
    }

    fn failed(&mut self) {
        let backoff = Duration::from_millis(100).saturating_mul(1 << self.failures.min(6)).min(Duration::from_secs(5));
        self.failures = self.failures.saturating_add(1);
        self.at = Some(Instant::now() + backoff);
    }

    fn succeeded(&mut self) {
        *self = Retry::default();
    }
}

/// Runs `f` in its own transaction; returns whether it committed. An error is caught here and
/// the transaction rolled back, the process lives on: what `f` was writing stays queued and is
/// tried again after a pause (`Retry`). Only an error in the batch itself counts against it
/// (`queue::worker_failed`, which gives up on it after three); a lock or statement timeout, a
/// cancel (pg_cancel_backend), a serialization failure or a deadlock never does. The prepared
/// plans are forgotten after an error, so one left half-made is never used again.
pub(super) fn write(plans: &mut Plans, slot: usize, retry: &mut Retry, f: impl FnOnce(&mut Plans)) -> bool {
    let failed = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| f(plans)));
        None
    }))
    .catch_others(|e| Some(error::caught(e)))
    .execute();
    let Some(caught) = failed else {
        retry.succeeded();
        report_stats(false);
        return true;
    };
    // SAFETY: the error was caught inside the transaction BackgroundWorker::transaction
    // started; rolling it back (locks, snapshots, SPI, memory) is what PostgresMain does after
    // an error, and leaves this process idle and outside any transaction.
    unsafe { pg_sys::AbortCurrentTransaction() };
    *plans = Plans::default();
    let discarded = queue::worker_failed(slot, !caught.transient);
    retry.failed();
    let outcome = if caught.transient {
        "will retry"
    } else if discarded {
        "failed three times: discarded and counted as dropped (worker_status)"
    } else {
        "counted against the batch, will retry"
    };
    error::log_server_only(format!(
        "pg_token writer: a write failed (SQLSTATE {}: {}); {outcome}",
        caught.sqlstate, caught.message
    ));
    false
}

/// Sends this process's table and WAL statistics to the cumulative statistics system (at most
/// once a second unless `force`), as a backend does between statements: a writer kept busy by
/// steady traffic never exits, and without this its updates would never reach
/// pg_stat_user_tables, so autovacuum would never hear of the dead rows they leave.
pub(super) fn report_stats(force: bool) {
    // SAFETY: called between transactions, in a process connected to a database.
    unsafe {
        pg_sys::pgstat_report_stat(force);
    }
}
