//! The event writer's last-use updates: one batch of queued uses, coalesced (one per token,
//! `touches::coalesce`), written in one statement.
//!
//! The writer must never wait long on a row lock someone else holds (a stalled queue drops
//! uses; an administrator's transaction left open could hold a row for hours), yet locking each
//! row before updating it (`SELECT … FOR NO KEY UPDATE SKIP LOCKED`) costs a WAL record and a
//! tuple write per row, a quarter of what a last-use update writes. So the batch is first
//! updated directly, in a subtransaction that waits at most `LOCK_WAIT` for any row lock; if
//! one is held longer, the subtransaction is rolled back and the batch is written again,
//! skipping the locked rows (their use is recorded at their next use after the interval).
//! Other errors are not caught here: the writer's transaction fails and is retried
//! (`attempt::write`).
//!
//! `LOCK_WAIT` bounds each lock wait (a batch that meets several briefly held rows may wait
//! several times). It is far below the default `deadlock_timeout` (1 s): an administrator's
//! transaction that waits on a row the writer updated in this batch, while the writer waits on
//! one it holds, is nearly always freed by the writer's timeout before its own deadlock check
//! runs. A deadlock the writer's check finds first (a `deadlock_timeout` set below 50 ms) gives
//! way the same as a timeout.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::{PgBuiltInOids, PgTryBuilder};

use pg_token_core::touches;

use super::plans::{prepared, still_installed, Plans};
use super::queue::Touch;
use crate::error;

/// The longest the direct update waits for one lock before the batch skips locked rows.
const LOCK_WAIT: &str = "50ms";

/// One row per token, applied unless the row's last_used_at is within the interval before
/// it, so last_used_at moves at most once per interval per token however many backends queued
/// it, and never backwards. The batch is sorted by token id, so the probes walk the primary
/// key in order. A row another transaction changed and committed meanwhile is re-read and the
/// condition checked again on its new version (read committed).
const APPLY: &str = "UPDATE token.tokens t SET last_used_at = u.at \
     FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.uuid[]), pg_catalog.unnest($2::pg_catalog.timestamptz[]), \
                     pg_catalog.unnest($3::pg_catalog.int4[])) AS u(id, at, secs) \
     WHERE t.id OPERATOR(pg_catalog.=) u.id \
       AND (t.last_used_at IS NULL \
            OR t.last_used_at OPERATOR(pg_catalog.<=) \
               (u.at OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => u.secs::pg_catalog.float8)))";

/// The same, for a batch that met a row lock held past `LOCK_WAIT`: SKIP LOCKED never waits.
/// The rows are locked where the scan found them and updated there (by ctid: no second index
/// probe). A row another transaction changed after this statement's snapshot was taken is
/// locked in its new version, which the update cannot see: that use is skipped too.
const APPLY_SKIPPING_LOCKED: &str = "WITH due AS ( \
         SELECT t.ctid AS tid, u.at \
           FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.uuid[]), pg_catalog.unnest($2::pg_catalog.timestamptz[]), \
                           pg_catalog.unnest($3::pg_catalog.int4[])) AS u(id, at, secs) \
           JOIN token.tokens t ON t.id OPERATOR(pg_catalog.=) u.id \
          WHERE t.last_used_at IS NULL \
             OR t.last_used_at OPERATOR(pg_catalog.<=) \
                (u.at OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => u.secs::pg_catalog.float8)) \
            FOR NO KEY UPDATE OF t SKIP LOCKED) \
     UPDATE token.tokens t SET last_used_at = due.at FROM due WHERE t.ctid OPERATOR(pg_catalog.=) due.tid";

const TYPES: [PgBuiltInOids; 3] =
    [PgBuiltInOids::UUIDARRAYOID, PgBuiltInOids::TIMESTAMPTZARRAYOID, PgBuiltInOids::INT4ARRAYOID];

/// Writes one batch of queued uses (in the writer's transaction, which `attempt::write` runs).
pub(super) fn write(plans: &mut Plans, queued: &[Touch]) {
    Spi::connect_mut(|client| {
        if queued.is_empty() || !still_installed(client, plans) {
            return;
        }
        let mut batch: Vec<touches::Use> = queued.iter().map(|t| (t.token_id, t.at, t.interval_s)).collect();
        touches::coalesce(&mut batch);
        let ids: Vec<Option<pgrx::Uuid>> = batch.iter().map(|u| Some(pgrx::Uuid::from_bytes(u.0))).collect();
        let at: Vec<Option<TimestampWithTimeZone>> = batch.iter().map(|u| super::writer::tstz(u.1)).collect();
        let secs: Vec<Option<i32>> = batch.iter().map(|u| Some(u.2)).collect();
        let args = [ids.into(), at.into(), secs.into()];
        let Some(direct) = prepared(client, &mut plans.apply_touches, APPLY, &TYPES) else { return };
        let Err(why) = within_lock_wait(|| {
            error::spi_or(
                client.update("SELECT pg_catalog.set_config('lock_timeout', $1, true)", None, &[LOCK_WAIT.into()]),
                "pg_token writer could not bound its lock wait",
            );
            error::spi_or(client.update(direct, None, &args), "pg_token writer could not update last_used_at");
        }) else {
            return;
        };
        error::log_server_only(format!(
            "pg_token writer: a lock wait of its last-use updates gave way ({why}); the batch is written again, skipping locked rows"
        ));
        if let Some(plan) = prepared(client, &mut plans.apply_touches_skipping_locked, APPLY_SKIPPING_LOCKED, &TYPES) {
            error::spi_or(client.update(plan, None, &args), "pg_token writer could not update last_used_at");
        }
    });
}

/// Runs `f` in a subtransaction: Ok if it completed (kept), Err with the error's message if it
/// was rolled back because a lock wait ran out or ended in a deadlock (`error::is_lock_wait`).
/// Any other error rolls the subtransaction back and goes on up to the writer's transaction. A
/// `set_config(…, true)` made in `f` ends with the subtransaction when it is rolled back.
fn within_lock_wait(f: impl FnOnce()) -> Result<(), String> {
    // SAFETY: the writer is inside its transaction (attempt::write); this is the documented way
    // to run code in an internal subtransaction (as PL/Python and PL/Perl do): begin, and on
    // both ways out release or roll back that subtransaction and restore the memory context and
    // resource owner the caller had. pgrx has already copied and flushed a caught error.
    unsafe {
        let (context, owner) = (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner);
        let end = move |kept: bool| {
            if kept {
                pg_sys::ReleaseCurrentSubTransaction();
            } else {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
            }
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
        };
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
        let outcome = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
            f();
            Ok(())
        }))
        .catch_others(|e: CaughtError| {
            if error::is_lock_wait(&e) {
                return Err(error::caught(e).message);
            }
            end(false);
            e.rethrow()
        })
        .execute();
        end(outcome.is_ok());
        outcome
    }
}
