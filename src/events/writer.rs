//! The event writer: a background worker, one per database with queued records, started on
//! demand by the first record and gone after `token.worker_idle_timeout` of quiet (so that it
//! never holds up DROP DATABASE for long). It writes the refusal table's new rows as soon as
//! they appear, their count increments at most every `queue::EVENT_DELAY`, and `last_used_at`
//! updates in batches (after `queue::TOUCH_DELAY`, when a batch is full, or when someone waits
//! in flush_events), each in its own transaction through a plan prepared once, and purges
//! events past `token.event_retention`. The server log gets one line per refusal row it
//! inserts, never one per refusal.
//!
//! A new ring in `queue` is drained here, in its own transaction per batch, so that one
//! kind of record that cannot be written never costs another.
//!
//! It must never wait long on a row lock held by someone else (last-use updates wait at most
//! 50 ms, then skip the locked rows: a missed `last_used_at` update is harmless, a stalled
//! queue is not; see `last_use`) and never see a token.

use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::PgBuiltInOids;

use pg_token_core::reason::Reason;

use pg_token_core::aggregate::Entry;
use pg_token_core::uses;

use super::queue::{self, Touch, EVENT_DELAY, TOUCH_BATCH, TOUCH_DELAY};
use super::attempt::{report_stats, write, Retry};
use super::plans::{extension_installed, prepared, still_installed, Plans};
use super::{family, last_use, reserve};
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
    // locks (a CREATE INDEX or ALTER TABLE on token.tokens, a VACUUM FULL on token.events,
    // fails one attempt, which `attempt::write` retries, instead of stalling the queue).
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

    let mut refusals: Vec<(usize, Entry)> = Vec::with_capacity(queue::BATCH);
    let mut touches: Vec<Touch> = Vec::with_capacity(TOUCH_BATCH);
    let mut requests: Vec<uses::Request> = Vec::with_capacity(uses::MAX_REQUESTS);
    let mut families: Vec<family::Request> = Vec::with_capacity(family::FAMILY_ENTRIES);
    let mut plans = Plans::default();
    let mut idle_since = Instant::now();
    // When the oldest refusal count and last-use update still unwritten were first seen.
    let mut refusals_since: Option<Instant> = None;
    let mut touches_since: Option<Instant> = None;
    let mut last_purge: Option<Instant> = None;
    let mut retry = Retry::default();
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
        // After a failed transaction, wait before the next attempt (woken early, it waits on).
        if let Some(left) = retry.wait_left() {
            if !BackgroundWorker::wait_latch(Some(at_least_1ms(left))) {
                return;
            }
            continue;
        }
        let waiting = queue::worker_counts(slot);
        // Backends waiting for use reservations come before everything else: they block a
        // validation each.
        if waiting.reservations {
            queue::worker_take_reservations(slot, &mut requests);
            let mut answers = Vec::new();
            if write(&mut plans, slot, &mut retry, |plans| answers = reserve::reserve_uses(plans, &requests)) {
                queue::worker_reserved(slot, &answers);
            }
            idle_since = Instant::now();
            continue;
        }
        // Then families revoked for a reuse: a backend waits for each, and every member must
        // be refused everywhere as soon as possible.
        if waiting.families {
            queue::worker_take_families(slot, &mut families);
            let (mut done, mut lines) = (Vec::new(), Vec::new());
            if write(&mut plans, slot, &mut retry, |plans| (done, lines) = family::revoke_families(plans, &families)) {
                queue::worker_revoked_families(slot, &done);
                if guc::LOG_EVENTS.get() {
                    lines.into_iter().for_each(error::log_server_only);
                }
            }
            idle_since = Instant::now();
            continue;
        }
        // Refusals first, in their own transaction, so a batch of last-use updates that cannot
        // be written never costs one: a new row at once, count increments once they have
        // waited EVENT_DELAY (or someone waits in flush_events).
        let mut wait = None;
        if waiting.refusals > 0 {
            let first = *refusals_since.get_or_insert_with(Instant::now);
            if waiting.new_rows || waiting.flush_refusals || first.elapsed() >= EVENT_DELAY {
                queue::worker_peek_refusals(slot, &mut refusals);
                let mut inserted = Vec::new();
                if write(&mut plans, slot, &mut retry, |plans| inserted = write_refusals(plans, slot, &mut refusals)) {
                    queue::worker_wrote_refusals(slot, &refusals, guc::event_limits().window_us);
                    log_rows(&inserted);
                    refusals_since = None;
                }
                idle_since = Instant::now();
                continue;
            }
            wait = Some(EVENT_DELAY.saturating_sub(first.elapsed()));
        } else {
            refusals_since = None;
        }
        if waiting.touches > 0 {
            let first = *touches_since.get_or_insert_with(Instant::now);
            if waiting.flush_touches || waiting.touches >= TOUCH_BATCH || first.elapsed() >= TOUCH_DELAY {
                queue::worker_peek_touches(slot, &mut touches);
                if write(&mut plans, slot, &mut retry, |plans| last_use::write(plans, &touches)) {
                    queue::worker_consumed_touches(slot, touches.len());
                    touches_since = None;
                }
                idle_since = Instant::now();
                continue;
            }
            let left = TOUCH_DELAY.saturating_sub(first.elapsed());
            wait = Some(wait.map_or(left, |w| w.min(left)));
        } else {
            touches_since = None;
        }
        if let Some(w) = wait {
            // Let more gather; woken early by a new row, a full batch or a flush request.
            if !BackgroundWorker::wait_latch(Some(at_least_1ms(w))) {
                return;
            }
            continue;
        }
        if last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
            write(&mut plans, slot, &mut retry, |_| purge_expired_events());
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
        report_stats(true); // idle: what was left unreported since the last write
        if !BackgroundWorker::wait_latch(Some(at_least_1ms(idle_limit - idle))) {
            return; // SIGTERM or postmaster death; whatever is queued waits for the next writer
        }
    }
}

/// WaitLatch takes whole milliseconds: a shorter wait would round to none and spin.
fn at_least_1ms(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

fn events_have_counts(client: &pgrx::spi::SpiClient<'_>) -> bool {
    client
        .select(
            "SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid OPERATOR(pg_catalog.=) 'token.events'::pg_catalog.regclass \
             AND attname OPERATOR(pg_catalog.=) 'count' AND NOT attisdropped",
            None,
            &[],
        )
        .map(|t| !t.is_empty())
        .unwrap_or(false)
}

fn uuid(b: &Option<[u8; 16]>) -> Option<pgrx::Uuid> {
    b.map(pgrx::Uuid::from_bytes)
}

pub(super) fn tstz(at: i64) -> Option<TimestampWithTimeZone> {
    // SAFETY: a TimestampTz is a plain i64 datum.
    unsafe { TimestampWithTimeZone::from_datum(pg_sys::Datum::from(at), false) }
}

/// One row per refusal entry, with the id given to it before (so a retry after a failed
/// transaction rewrites the same row): inserted the first time, its count and last time
/// updated afterwards. The count is the entry's total, not an increment, so writing it again
/// changes nothing.
const WRITE_REFUSALS: &str = "INSERT INTO token.events AS e (id, occurred_at, last_at, count, folded, event, reason, token_id, \
     caller_token_id, account, prefix, hint, environment, detail, client_addr, application_name, db_user, backend_pid) \
     SELECT u.id, u.first_at, u.last_at, u.n, u.folded, \
            CASE WHEN u.reason IS NULL THEN 'legacy_jwt_used' ELSE 'refused' END, u.reason, u.token_id, u.caller_token_id, u.account, \
            u.prefix, u.hint, u.environment, u.detail, u.client_addr, u.application_name, u.db_user, u.pid \
     FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]), pg_catalog.unnest($2::pg_catalog.timestamptz[]), \
          pg_catalog.unnest($3::pg_catalog.timestamptz[]), pg_catalog.unnest($4::pg_catalog.int8[]), \
          pg_catalog.unnest($5::pg_catalog.text[]), pg_catalog.unnest($6::pg_catalog.text[]), \
          pg_catalog.unnest($7::pg_catalog.uuid[]), pg_catalog.unnest($8::pg_catalog.uuid[]), \
          pg_catalog.unnest($9::pg_catalog.text[]), pg_catalog.unnest($10::pg_catalog.text[]), \
          pg_catalog.unnest($11::pg_catalog.text[]), pg_catalog.unnest($12::pg_catalog.text[]), \
          pg_catalog.unnest($13::pg_catalog.text[]), pg_catalog.unnest($14::pg_catalog.text[]), \
          pg_catalog.unnest($15::pg_catalog.text[]), pg_catalog.unnest($16::pg_catalog.text[]), \
          pg_catalog.unnest($17::pg_catalog.int4[])) \
          AS u(id, first_at, last_at, n, folded, reason, token_id, caller_token_id, account, prefix, hint, environment, \
               detail, client_addr, application_name, db_user, pid) \
     ON CONFLICT (id) DO UPDATE SET count = EXCLUDED.count, last_at = EXCLUDED.last_at";

/// The same for a database still on 0.1.0's schema (no count): a row when a key first appears,
/// its count noted in the detail; nothing afterwards.
const WRITE_REFUSALS_0_1: &str = "INSERT INTO token.events (id, occurred_at, event, reason, token_id, caller_token_id, account, \
     prefix, hint, environment, detail, client_addr, application_name, db_user, backend_pid) \
     SELECT u.id, u.first_at, 'refused', u.reason, u.token_id, u.caller_token_id, u.account, u.prefix, u.hint, \
            u.environment, u.detail, u.client_addr, u.application_name, u.db_user, u.pid \
     FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]), pg_catalog.unnest($2::pg_catalog.timestamptz[]), \
          pg_catalog.unnest($3::pg_catalog.text[]), pg_catalog.unnest($4::pg_catalog.uuid[]), \
          pg_catalog.unnest($5::pg_catalog.uuid[]), pg_catalog.unnest($6::pg_catalog.text[]), \
          pg_catalog.unnest($7::pg_catalog.text[]), pg_catalog.unnest($8::pg_catalog.text[]), \
          pg_catalog.unnest($9::pg_catalog.text[]), pg_catalog.unnest($10::pg_catalog.text[]), \
          pg_catalog.unnest($11::pg_catalog.text[]), pg_catalog.unnest($12::pg_catalog.text[]), \
          pg_catalog.unnest($13::pg_catalog.text[]), pg_catalog.unnest($14::pg_catalog.int4[])) \
          AS u(id, first_at, reason, token_id, caller_token_id, account, prefix, hint, environment, detail, \
               client_addr, application_name, db_user, pid) \
     ON CONFLICT (id) DO NOTHING";

/// Writes the refusal entries; returns those whose rows it inserted (for the log lines).
fn write_refusals(plans: &mut Plans, slot: usize, entries: &mut [(usize, Entry)]) -> Vec<Entry> {
    Spi::connect_mut(|client| {
        if entries.is_empty() || !still_installed(client, plans) {
            return Vec::new();
        }
        let new: Vec<usize> = entries.iter().filter(|(_, e)| e.row_id == 0).map(|(i, _)| *i).collect();
        if !new.is_empty() {
            let ids: Option<Vec<i64>> = error::spi_or(
                client
                    .update(
                        "SELECT pg_catalog.array_agg(pg_catalog.nextval('token.events_id_seq')) \
                         FROM pg_catalog.generate_series(1, $1)",
                        Some(1),
                        &[(new.len() as i32).into()],
                    )
                    .and_then(|t| t.first().get_one()),
                "pg_token writer could not draw event ids",
            );
            queue::worker_assign_rows(slot, entries, &ids.unwrap_or_default());
        }
        let text = |f: &dyn Fn(&Entry) -> Option<&str>| -> Vec<Option<String>> {
            entries.iter().map(|(_, e)| f(e).map(str::to_owned)).collect()
        };
        let ids: Vec<Option<i64>> = entries.iter().map(|(_, e)| Some(e.row_id)).collect();
        let first: Vec<Option<TimestampWithTimeZone>> = entries.iter().map(|(_, e)| tstz(e.first_at)).collect();
        let last: Vec<Option<TimestampWithTimeZone>> = entries.iter().map(|(_, e)| tstz(e.last_at)).collect();
        let counts: Vec<Option<i64>> = entries.iter().map(|(_, e)| Some(i64::try_from(e.count).unwrap_or(i64::MAX))).collect();
        let folded = text(&|e| e.key.folded.as_str());
        let reason = text(&|e| Reason::from_u8(e.key.reason).map(Reason::as_str));
        let token_id: Vec<Option<pgrx::Uuid>> = entries.iter().map(|(_, e)| uuid(&e.sample.token_id)).collect();
        let caller_id: Vec<Option<pgrx::Uuid>> = entries.iter().map(|(_, e)| uuid(&e.sample.caller_token_id)).collect();
        let account = text(&|e| e.sample.account.get());
        let prefix = text(&|e| e.key.prefix.get());
        let hint = text(&|e| e.key.hint.get());
        let environment = text(&|e| e.key.environment.get());
        let detail = text(&|e| e.sample.detail.get());
        let client_addr = text(&|e| e.key.client_addr.get());
        let application = text(&|e| e.key.application_name.get());
        let user = text(&|e| e.key.db_user.get());
        let pid: Vec<Option<i32>> = entries.iter().map(|(_, e)| Some(e.sample.backend_pid)).collect();
        let (int8s, times, texts, uuids, int4s) = (
            PgBuiltInOids::INT8ARRAYOID,
            PgBuiltInOids::TIMESTAMPTZARRAYOID,
            PgBuiltInOids::TEXTARRAYOID,
            PgBuiltInOids::UUIDARRAYOID,
            PgBuiltInOids::INT4ARRAYOID,
        );
        if events_have_counts(client) {
            let args = [
                ids.into(), first.into(), last.into(), counts.into(), folded.into(), reason.into(), token_id.into(),
                caller_id.into(), account.into(), prefix.into(), hint.into(), environment.into(), detail.into(),
                client_addr.into(), application.into(), user.into(), pid.into(),
            ];
            let types = [int8s, times, times, int8s, texts, texts, uuids, uuids, texts, texts, texts, texts, texts, texts,
                         texts, texts, int4s];
            if let Some(plan) = prepared(client, &mut plans.write_refusals, WRITE_REFUSALS, &types) {
                error::spi_or(client.update(plan, None, &args), "pg_token writer could not write refusal events");
            }
        } else {
            let detail: Vec<Option<String>> = entries
                .iter()
                .map(|(_, e)| Some(format!("{} (first of {} refusals counted; ALTER EXTENSION pg_token UPDATE records counts)",
                                           e.sample.detail.get().unwrap_or(""), e.count)))
                .collect();
            let args = [
                ids.into(), first.into(), reason.into(), token_id.into(), caller_id.into(), account.into(), prefix.into(),
                hint.into(), environment.into(), detail.into(), client_addr.into(), application.into(), user.into(), pid.into(),
            ];
            let types = [int8s, times, texts, uuids, uuids, texts, texts, texts, texts, texts, texts, texts, texts, int4s];
            if let Some(plan) = prepared(client, &mut plans.write_refusals_0_1, WRITE_REFUSALS_0_1, &types) {
                error::spi_or(client.update(plan, None, &args), "pg_token writer could not write refusal events");
            }
        }
        entries.iter().filter(|(i, _)| new.contains(i)).map(|(_, e)| *e).collect()
    })
}

/// One server-log line per refusal row inserted (never one per refusal).
fn log_rows(inserted: &[Entry]) {
    if !guc::LOG_EVENTS.get() {
        return;
    }
    for e in inserted {
        let event = if e.key.reason == pg_token_core::aggregate::LEGACY_USE { "legacy_jwt_used" } else { "refused" };
        let mut line = format!("pg_token: {event} count={}", e.count);
        let mut field = |k: &str, v: Option<&str>| {
            if let Some(v) = v {
                line.push_str(&format!(" {k}={v}"));
            }
        };
        field("reason", Reason::from_u8(e.key.reason).map(Reason::as_str));
        field("folded", e.key.folded.as_str());
        field("hint", e.key.hint.get());
        field("prefix", e.key.prefix.get());
        field("environment", e.key.environment.get());
        field("detail", e.sample.detail.get());
        field("client", e.key.client_addr.get());
        field("application", e.key.application_name.get());
        field("user", e.key.db_user.get());
        error::log_server_only(line);
    }
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
