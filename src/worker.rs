//! The event writer: a background worker, one per database with queued records, started on
//! demand by the first record and gone after `token.worker_idle_timeout` of quiet (so that it
//! never holds up DROP DATABASE for long). It writes refusal events and `last_used_at`
//! updates in its own transactions, and purges events past `token.event_retention`.
//!
//! It must never wait on a row lock held by someone else (it skips locked rows: a missed
//! `last_used_at` update is harmless, a stalled queue is not) and never see a token.

use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode};

use crate::guc;
use crate::queue::{self, Kind, Record, BATCH};
use crate::reason::Reason;

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
            ereport!(
                PgLogLevel::WARNING,
                PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                "pg_token could not start its event writer",
                "Events stay queued in shared memory; raise max_worker_processes if this persists."
            );
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
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), None);
    // SAFETY: plain GUC assignments for this process's own transactions.
    unsafe {
        pg_sys::SetConfigOption(
            c"default_transaction_read_only".as_ptr(),
            c"off".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
        pg_sys::SetConfigOption(
            c"application_name".as_ptr(),
            c"pg_token writer".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
    }
    let Some((_, discarded)) = queue::worker_attach(slot) else { return };
    if discarded {
        ereport!(
            PgLogLevel::WARNING,
            PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
            "pg_token discarded a batch of queued events after three failed attempts to write it"
        );
    }

    let mut batch: Vec<Record> = Vec::with_capacity(BATCH);
    let mut idle_since = Instant::now();
    let mut last_purge: Option<Instant> = None;
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a worker to reload its configuration.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        queue::worker_peek(slot, &mut batch);
        if !batch.is_empty() {
            BackgroundWorker::transaction(|| write_batch(&batch));
            queue::worker_consumed(slot, batch.len());
            idle_since = Instant::now();
            continue;
        }
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
        if !BackgroundWorker::wait_latch(Some(idle_limit - idle)) {
            return; // SIGTERM or postmaster death; whatever is queued waits for the next writer
        }
    }
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

fn write_batch(batch: &[Record]) {
    Spi::connect_mut(|client| {
        if !extension_installed(client) {
            return; // dropped meanwhile: nothing to write into, the records are consumed
        }
        let events: Vec<&Record> = batch.iter().filter(|r| r.kind == Kind::Refused).collect();
        let touches: Vec<&Record> = batch.iter().filter(|r| r.kind == Kind::Touch).collect();
        if !events.is_empty() {
            let col = |f: &dyn Fn(&Record) -> Option<String>| -> Vec<Option<String>> { events.iter().map(|r| f(r)).collect() };
            let at: Vec<Option<TimestampWithTimeZone>> = events.iter().map(|r| tstz(r.at)).collect();
            let reason = col(&|r| Reason::from_u8(r.reason).map(|x| x.as_str().to_owned()));
            let token_id: Vec<Option<pgrx::Uuid>> = events.iter().map(|r| uuid(&r.token_id)).collect();
            let caller_id: Vec<Option<pgrx::Uuid>> = events.iter().map(|r| uuid(&r.caller_token_id)).collect();
            let pid: Vec<Option<i32>> = events.iter().map(|r| Some(r.backend_pid)).collect();
            let result = client.update(
                "INSERT INTO token.events (occurred_at, event, reason, token_id, caller_token_id, account, prefix, \
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
                           client_addr, application_name, db_user, pid)",
                None,
                &[
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
                ],
            );
            if let Err(e) = result {
                error!("pg_token writer could not insert events: {e}");
            }
        }
        if !touches.is_empty() {
            let ids: Vec<Option<pgrx::Uuid>> = touches.iter().map(|r| uuid(&r.token_id)).collect();
            let at: Vec<Option<TimestampWithTimeZone>> = touches.iter().map(|r| tstz(r.at)).collect();
            // SKIP LOCKED: never wait on (or deadlock with) an admin transaction holding a row.
            let result = client.update(
                "WITH v AS (SELECT u.id, pg_catalog.max(u.at) AS at \
                            FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.uuid[]), \
                                            pg_catalog.unnest($2::pg_catalog.timestamptz[])) AS u(id, at) \
                            GROUP BY u.id), \
                      due AS (SELECT t.id, v.at FROM token.tokens t JOIN v ON t.id OPERATOR(pg_catalog.=) v.id \
                              WHERE t.last_used_at IS NULL OR t.last_used_at OPERATOR(pg_catalog.<) v.at \
                              FOR NO KEY UPDATE OF t SKIP LOCKED) \
                 UPDATE token.tokens t SET last_used_at = due.at FROM due WHERE t.id OPERATOR(pg_catalog.=) due.id",
                None,
                &[ids.into(), at.into()],
            );
            if let Err(e) = result {
                error!("pg_token writer could not update last_used_at: {e}");
            }
        }
    });
}

fn purge_expired_events() {
    let keep = guc::EVENT_RETENTION_S.get();
    if keep <= 0 {
        return;
    }
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
        if let Err(e) = result {
            error!("pg_token writer could not purge events: {e}");
        }
    });
}
