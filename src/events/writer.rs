//! The event writer: a background worker, one per database with queued records, started on
//! demand by the first record and gone after `token.worker_idle_timeout` of quiet (so that it
//! never holds up DROP DATABASE for long). It writes refusal events as soon as they arrive and
//! `last_used_at` updates in batches (after `queue::TOUCH_DELAY`, when a batch is full, or when
//! someone waits in flush_events), each in its own transaction through a plan prepared once,
//! and purges events past `token.event_retention`.
//!
//! A new ring in `queue` is drained here, in its own transaction per batch, so that one
//! kind of record that cannot be written never costs another.
//!
//! It must never wait on a row lock held by someone else (it skips locked rows: a missed
//! `last_used_at` update is harmless, a stalled queue is not) and never see a token.

use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{PgBuiltInOids, PgOid};

use pg_token_core::reason::Reason;

use super::queue::{self, Record, Touch, TOUCH_BATCH, TOUCH_DELAY};
use crate::error::{self, Error, Kind};
use crate::guc;

const PURGE_EVERY: Duration = Duration::from_secs(600);

// SAFETY (all statics below): a worker process is single-threaded; these are process-local.
static mut SLOT: usize = usize::MAX;
static mut DETACHED: bool = false;
static mut LAST_START_WARNING: Option<Instant> = None;

/// Registers a writer for `slot`. On failure the records stay queued for the next attempt.
pub fn start(slot: usize, db: pg_sys::Oid) {
    let started = BackgroundWorkerBuilder::new(&format!("pg_token writer for database {}", db.to_u32()))
        .set_type("pg_token writer")
        .set_library("pg_token")
        .set_function("pg_token_worker_main")
        .set_argument(Some(pg_sys::Datum::from(slot)))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .load_dynamic();
    if started.is_err() {
        queue::start_failed(slot);
        // SAFETY: process-local state, single-threaded backend.
        let due = unsafe { LAST_START_WARNING.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) };
        if due {
            unsafe { LAST_START_WARNING = Some(Instant::now()) };
            Error::new(Kind::ConfigurationLimit, "pg_token could not start its event writer")
                .hint("Events stay queued in shared memory; raise max_worker_processes if this persists.")
                .warn();
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(code: std::ffi::c_int, _arg: pg_sys::Datum) {
    // SAFETY: runs once in this process at exit; our code never errors while holding the
    // queue lock, but release everything first so the slot update cannot self-deadlock.
    unsafe {
        pg_sys::LWLockReleaseAll();
        if !DETACHED && SLOT != usize::MAX {
            queue::worker_exited(SLOT, code != 0);
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_token_worker_main(arg: pg_sys::Datum) {
    let slot = arg.value();
    // SAFETY: process-local statics; the callback is registered before anything can fail.
    unsafe {
        SLOT = slot;
        pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0));
    }
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let Some(db) = queue::worker_database(slot) else { return };
    // Connect even when the database refuses connections (ALTER DATABASE ... ALLOW_CONNECTIONS
    // false): a database owner must not be able to stop the audit trail that way. pgrx's
    // connect_worker_to_spi_by_oid passes no flags, hence the direct call.
    // SAFETY: called once, from a registered background worker, before any transaction.
    unsafe {
        pg_sys::BackgroundWorkerInitializeConnectionByOid(db, pg_sys::InvalidOid, pg_sys::BGWORKER_BYPASS_ALLOWCONN);
    }
    // The writer's own session settings, whatever the cluster's defaults: read committed (so
    // a row updated and committed by an admin mid-batch is skipped or re-read, never a
    // serialization failure), writable, no statement timeout, and a bounded wait for table
    // locks (a CREATE INDEX or ALTER TABLE on token.tokens fails one batch instead of
    // stalling the queue behind it).
    for (name, value) in [
        (c"default_transaction_read_only", c"off"),
        (c"default_transaction_isolation", c"read committed"),
        (c"statement_timeout", c"0"),
        (c"lock_timeout", c"10s"),
        (c"application_name", c"pg_token writer"),
    ] {
        // SAFETY: plain GUC assignments for this process's own transactions.
        unsafe {
            pg_sys::SetConfigOption(name.as_ptr(), value.as_ptr(), pg_sys::GucContext::PGC_SUSET, pg_sys::GucSource::PGC_S_OVERRIDE);
        }
    }
    let Some((_, discarded)) = queue::worker_attach(slot) else { return };
    if discarded {
        Error::new(Kind::DataException, "pg_token discarded a batch of queued records after three failed attempts to write it")
            .hint("worker_status() counts them as dropped; refusals are still in the server log.")
            .warn();
    }

    let mut events: Vec<Record> = Vec::with_capacity(queue::BATCH);
    let mut touches: Vec<Touch> = Vec::with_capacity(TOUCH_BATCH);
    let mut plans = Plans::default();
    let mut idle_since = Instant::now();
    // When the oldest last-use update still queued was first seen.
    let mut touches_since: Option<Instant> = None;
    let mut last_purge: Option<Instant> = None;
    loop {
        // Checked on every turn, not only while waiting: under a steady stream of work the
        // writer may never wait.
        if BackgroundWorker::sigterm_received() {
            return; // whatever is queued waits for the next writer
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a worker to reload its configuration.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let (queued_events, queued_touches, flush) = queue::worker_counts(slot);
        // Refusal events first and at once, each batch in its own transaction, so a batch of
        // last-use updates that cannot be written never costs an event.
        if queued_events > 0 {
            queue::worker_peek_events(slot, &mut events);
            write(&mut plans, |plans| write_events(plans, &events));
            queue::worker_consumed(slot, events.len());
            idle_since = Instant::now();
            continue;
        }
        if queued_touches > 0 {
            let first = *touches_since.get_or_insert_with(Instant::now);
            if flush || queued_touches >= TOUCH_BATCH || first.elapsed() >= TOUCH_DELAY {
                queue::worker_peek_touches(slot, &mut touches);
                write(&mut plans, |plans| write_touches(plans, &touches));
                queue::worker_consumed(slot, touches.len());
                touches_since = None;
                idle_since = Instant::now();
                continue;
            }
            // Let more gather; woken early by events, a full batch or a flush request.
            if !BackgroundWorker::wait_latch(Some(at_least_1ms(TOUCH_DELAY.saturating_sub(first.elapsed())))) {
                return;
            }
            continue;
        }
        touches_since = None;
        if last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
            BackgroundWorker::transaction(purge_expired_events);
            last_purge = Some(Instant::now());
        }
        let idle_limit = Duration::from_millis(u64::try_from(guc::WORKER_IDLE_TIMEOUT_MS.get()).unwrap_or(2000));
        let idle = idle_since.elapsed();
        if idle >= idle_limit {
            if queue::worker_try_detach(slot) {
                // SAFETY: process-local; tells on_exit that the slot is no longer ours.
                unsafe { DETACHED = true };
                return;
            }
            continue;
        }
        if !BackgroundWorker::wait_latch(Some(at_least_1ms(idle_limit - idle))) {
            return; // SIGTERM or postmaster death; whatever is queued waits for the next writer
        }
    }
}

/// WaitLatch takes whole milliseconds: a shorter wait would round to none and spin.
fn at_least_1ms(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

/// Runs `f` in its own transaction. An error ends this process (the next record starts a new
/// writer, and the slot charges the failure to the ring being written), so plans left
/// half-made by one are never seen again.
fn write(plans: &mut Plans, f: impl FnOnce(&mut Plans)) {
    BackgroundWorker::transaction(std::panic::AssertUnwindSafe(move || f(plans)));
}

fn extension_installed(client: &pgrx::spi::SpiClient<'_>) -> bool {
    client
        .select("SELECT 1 FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pg_token'", None, &[])
        .map(|t| !t.is_empty())
        .unwrap_or(false)
}

fn uuid(b: &Option<[u8; 16]>) -> Option<pgrx::Uuid> {
    b.map(pgrx::Uuid::from_bytes)
}

fn tstz(at: i64) -> Option<TimestampWithTimeZone> {
    // SAFETY: a TimestampTz is a plain i64 datum.
    unsafe { TimestampWithTimeZone::from_datum(pg_sys::Datum::from(at), false) }
}

/// The writer's two statements, prepared on first use and kept for the life of the process.
#[derive(Default)]
struct Plans {
    insert_events: Option<OwnedPreparedStatement>,
    apply_touches: Option<OwnedPreparedStatement>,
}

const INSERT_EVENTS: &str = "INSERT INTO token.events (occurred_at, event, reason, token_id, caller_token_id, account, prefix, \
     hint, environment, detail, client_addr, application_name, db_user, backend_pid) \
     SELECT u.at, 'refused', u.reason, u.token_id, u.caller_token_id, u.account, u.prefix, u.hint, \
            u.environment, u.detail, u.client_addr, u.application_name, u.db_user, u.pid \
     FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.timestamptz[]), pg_catalog.unnest($2::pg_catalog.text[]), \
          pg_catalog.unnest($3::pg_catalog.uuid[]), pg_catalog.unnest($4::pg_catalog.uuid[]), \
          pg_catalog.unnest($5::pg_catalog.text[]), pg_catalog.unnest($6::pg_catalog.text[]), \
          pg_catalog.unnest($7::pg_catalog.text[]), pg_catalog.unnest($8::pg_catalog.text[]), \
          pg_catalog.unnest($9::pg_catalog.text[]), pg_catalog.unnest($10::pg_catalog.text[]), \
          pg_catalog.unnest($11::pg_catalog.text[]), pg_catalog.unnest($12::pg_catalog.text[]), \
          pg_catalog.unnest($13::pg_catalog.int4[])) \
          AS u(at, reason, token_id, caller_token_id, account, prefix, hint, environment, detail, \
               client_addr, application_name, db_user, pid)";

/// One row per token: the latest use, applied unless the row's last_used_at is within the
/// interval before it (the smallest interval any of the validating sessions asked for). So
/// last_used_at moves at most once per interval per token, however many backends queued it,
/// and never backwards. SKIP LOCKED: never wait on (or deadlock with) an admin transaction
/// holding a row; that token's update is simply skipped.
const APPLY_TOUCHES: &str = "WITH v AS ( \
         SELECT u.id, pg_catalog.max(u.at) AS at, pg_catalog.min(u.secs) AS secs \
           FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.uuid[]), pg_catalog.unnest($2::pg_catalog.timestamptz[]), \
                           pg_catalog.unnest($3::pg_catalog.int4[])) AS u(id, at, secs) \
          GROUP BY u.id), \
     due AS ( \
         SELECT t.id, v.at FROM token.tokens t JOIN v ON t.id OPERATOR(pg_catalog.=) v.id \
          WHERE t.last_used_at IS NULL \
             OR t.last_used_at OPERATOR(pg_catalog.<=) \
                (v.at OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => v.secs::pg_catalog.float8)) \
            FOR NO KEY UPDATE OF t SKIP LOCKED) \
     UPDATE token.tokens t SET last_used_at = due.at FROM due WHERE t.id OPERATOR(pg_catalog.=) due.id";

fn prepared<'p>(
    client: &pgrx::spi::SpiClient<'_>,
    plan: &'p mut Option<OwnedPreparedStatement>,
    sql: &str,
    args: &[PgBuiltInOids],
) -> Option<&'p OwnedPreparedStatement> {
    if plan.is_none() {
        let args: Vec<PgOid> = args.iter().map(|&o| PgOid::BuiltIn(o)).collect();
        match client.prepare_mut(sql, &args) {
            Ok(p) => *plan = Some(p.keep()),
            Err(e) => error::spi_or(Err(e), "pg_token writer could not prepare a statement"),
        }
    }
    plan.as_ref()
}

/// Whether the extension is still there to write into; if not (dropped meanwhile), the
/// records are consumed unwritten and the plans, which name its tables, are forgotten.
fn still_installed(client: &pgrx::spi::SpiClient<'_>, plans: &mut Plans) -> bool {
    if extension_installed(client) {
        return true;
    }
    *plans = Plans::default();
    false
}

fn write_events(plans: &mut Plans, events: &[Record]) {
    Spi::connect_mut(|client| {
        if events.is_empty() || !still_installed(client, plans) {
            return;
        }
        let col = |f: &dyn Fn(&Record) -> Option<String>| -> Vec<Option<String>> { events.iter().map(f).collect() };
        let at: Vec<Option<TimestampWithTimeZone>> = events.iter().map(|r| tstz(r.at)).collect();
        let reason = col(&|r| Reason::from_u8(r.reason).map(|x| x.as_str().to_owned()));
        let token_id: Vec<Option<pgrx::Uuid>> = events.iter().map(|r| uuid(&r.token_id)).collect();
        let caller_id: Vec<Option<pgrx::Uuid>> = events.iter().map(|r| uuid(&r.caller_token_id)).collect();
        let pid: Vec<Option<i32>> = events.iter().map(|r| Some(r.backend_pid)).collect();
        let args = [
            at.into(),
            reason.into(),
            token_id.into(),
            caller_id.into(),
            col(&|r| r.account.get().map(str::to_owned)).into(),
            col(&|r| r.prefix.get().map(str::to_owned)).into(),
            col(&|r| r.hint.get().map(str::to_owned)).into(),
            col(&|r| r.environment.get().map(str::to_owned)).into(),
            col(&|r| r.detail.get().map(str::to_owned)).into(),
            col(&|r| r.client_addr.get().map(str::to_owned)).into(),
            col(&|r| r.application_name.get().map(str::to_owned)).into(),
            col(&|r| r.db_user.get().map(str::to_owned)).into(),
            pid.into(),
        ];
        let (times, texts, uuids, ints) = (
            PgBuiltInOids::TIMESTAMPTZARRAYOID,
            PgBuiltInOids::TEXTARRAYOID,
            PgBuiltInOids::UUIDARRAYOID,
            PgBuiltInOids::INT4ARRAYOID,
        );
        let types = [times, texts, uuids, uuids, texts, texts, texts, texts, texts, texts, texts, texts, ints];
        if let Some(plan) = prepared(client, &mut plans.insert_events, INSERT_EVENTS, &types) {
            error::spi_or(client.update(plan, None, &args), "pg_token writer could not insert events");
        }
    });
}

fn write_touches(plans: &mut Plans, touches: &[Touch]) {
    Spi::connect_mut(|client| {
        if touches.is_empty() || !still_installed(client, plans) {
            return;
        }
        let ids: Vec<Option<pgrx::Uuid>> = touches.iter().map(|t| Some(pgrx::Uuid::from_bytes(t.token_id))).collect();
        let at: Vec<Option<TimestampWithTimeZone>> = touches.iter().map(|t| tstz(t.at)).collect();
        let secs: Vec<Option<i32>> = touches.iter().map(|t| Some(t.interval_s)).collect();
        let args = [ids.into(), at.into(), secs.into()];
        let types = [PgBuiltInOids::UUIDARRAYOID, PgBuiltInOids::TIMESTAMPTZARRAYOID, PgBuiltInOids::INT4ARRAYOID];
        if let Some(plan) = prepared(client, &mut plans.apply_touches, APPLY_TOUCHES, &types) {
            error::spi_or(client.update(plan, None, &args), "pg_token writer could not update last_used_at");
        }
    });
}

fn purge_expired_events() {
    let keep = guc::EVENT_RETENTION_S.get();
    if keep <= 0 {
        return;
    }
    let keep = keep.max(guc::MIN_EVENT_RETENTION_S.get());
    Spi::connect_mut(|client| {
        if !extension_installed(client) {
            return;
        }
        let result = client.update(
            "DELETE FROM token.events WHERE occurred_at OPERATOR(pg_catalog.<) \
             (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => $1))",
            None,
            &[f64::from(keep).into()],
        );
        error::spi_or(result, "pg_token writer could not purge events");
    });
}
