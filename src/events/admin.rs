//! The SQL functions over the event machinery: `flush_events` (wait for the writer),
//! `worker_status` (the queues and writers), `purge_events` (delete old events).

use pgrx::datum::Interval;
use pgrx::prelude::*;

use super::{queue, writer};
use crate::error::{invalid, require_writable, spi, Error, Kind};
use crate::guc;

/// Deletes events older than `older_than` (default: token.event_retention) and records that it
/// did (an `events_purged` event naming who and how many). Purging events younger than
/// `token.min_event_retention` needs a superuser: a token_admin cannot erase the recent history
/// of the tokens it issued. Returns how many were deleted.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn purge_events(older_than: default!(Option<Interval>, "NULL")) -> i64 {
    require_writable("purge_events");
    let keep = match older_than {
        Some(i) if i.is_negative() => invalid("older_than must not be negative"),
        Some(i) => i,
        None => match guc::EVENT_RETENTION_S.get() {
            0 => invalid("token.event_retention is 0 (keep forever); pass older_than"),
            s => Interval::from_seconds(f64::from(s)),
        },
    };
    let minimum = guc::MIN_EVENT_RETENTION_S.get();
    // SAFETY: reads the role that called us (SECURITY DEFINER changes only the current user).
    let caller_is_superuser = unsafe { pgrx::pg_sys::superuser_arg(pgrx::pg_sys::GetOuterUserId()) };
    Spi::connect_mut(|client| {
        // Real timestamps: is the cutoff more recent than the minimum retention allows?
        let below: Option<bool> = spi(client
            .select(
                "SELECT (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) $1) OPERATOR(pg_catalog.>) \
                        (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) \
                         pg_catalog.make_interval(secs => $2::pg_catalog.float8))",
                Some(1),
                &[keep.into(), minimum.into()],
            )
            .and_then(|t| t.first().get_one()));
        let below = below.unwrap_or(true);
        if below && !caller_is_superuser {
            Error::new(
                Kind::InsufficientPrivilege,
                format!("purging events younger than token.min_event_retention ({minimum} s) needs a superuser"),
            )
            .hint("Pass a longer older_than, or ask a superuser.")
            .raise();
        }
        let n: Option<i64> = spi(client
            .update(
                "WITH d AS (DELETE FROM token.events WHERE occurred_at OPERATOR(pg_catalog.<) \
                            (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) $1) RETURNING 1) \
                 SELECT pg_catalog.count(*) FROM d",
                Some(1),
                &[keep.into()],
            )
            .and_then(|t| t.first().get_one()));
        let n = n.unwrap_or(0);
        spi(super::lifecycle(
            client,
            super::Lifecycle {
                event: "events_purged",
                token_id: None,
                account: None,
                prefix: None,
                hint: None,
                environment: None,
                detail: Some(format!(
                    "deleted={n} older_than={keep}{}",
                    if below { " below token.min_event_retention" } else { "" }
                )),
            },
        ));
        n
    })
}

/// Waits until every event and last_used_at update queued so far in this database has been
/// written by the background writer. Returns false on timeout.
#[pg_extern(volatile, parallel_unsafe)]
fn flush_events(timeout: default!(Option<Interval>, "'10 seconds'")) -> bool {
    super::require_preload();
    let timeout = timeout.unwrap_or(Interval::from_seconds(10.0));
    let limit = std::time::Duration::from_micros(u64::try_from(timeout.as_micros()).unwrap_or(0));
    // SAFETY: MyDatabaseId is set in a connected backend.
    let db = unsafe { pg_sys::MyDatabaseId };
    let Some(target) = queue::head(db) else { return true };
    let start = std::time::Instant::now();
    loop {
        if queue::written_up_to(db, target) {
            return true;
        }
        if let Some(slot) = queue::nudge(db) {
            writer::start(slot, db);
        }
        if start.elapsed() >= limit {
            return false;
        }
        // SAFETY: the standard wait on our own latch, with interrupts checked after.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                10,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pg_sys::check_for_interrupts!();
    }
}

/// The event writers: one row per database slot in use. Refusals counted, written into rows,
/// pending, counted into folded rows (hint left out, or beyond the row rate), and dropped (a
/// batch that could not be written three times running); refusal rows made and table entries
/// in use; and last-use updates queued, written and dropped since the slot was claimed.
/// `refusals` always equals the sum of written, pending and dropped.
#[pg_extern(name = "worker_status", volatile, parallel_unsafe)]
fn worker_status_v2() -> TableIterator<
    'static,
    (
        name!(database, Option<String>),
        name!(worker_pid, Option<i32>),
        name!(refusals, i64),
        name!(refusals_written, i64),
        name!(refusals_pending, i64),
        name!(refusals_folded, i64),
        name!(refusals_dropped, i64),
        name!(event_rows, i64),
        name!(event_keys, i64),
        name!(touches_queued, i64),
        name!(touches_written, i64),
        name!(touches_dropped, i64),
    ),
> {
    let rows: Vec<_> = queue::status()
        .into_iter()
        .map(|s| {
            // SAFETY: a syscache lookup; NULL when the database is gone.
            let name = unsafe {
                let p = pg_sys::get_database_name(s.database);
                (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
            };
            let n = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
            let (r, t) = (s.refusals, s.touches);
            let pending = r.counted.saturating_sub(r.written + r.dropped);
            (name, s.worker_pid, n(r.counted), n(r.written), n(pending), n(r.folded), n(r.dropped), n(r.rows), n(r.keys),
             n(t.queued), n(t.written), n(t.dropped))
        })
        .collect();
    TableIterator::new(rows)
}

/// 0.1.0's `worker_status` (its SQL calls this symbol until ALTER EXTENSION pg_token UPDATE):
/// the same counts in 0.1.0's eight columns, refusals as records queued, written and dropped.
#[pg_extern(sql = false)]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(database, Option<String>),
        name!(worker_pid, Option<i32>),
        name!(events_queued, i64),
        name!(events_written, i64),
        name!(events_dropped, i64),
        name!(touches_queued, i64),
        name!(touches_written, i64),
        name!(touches_dropped, i64),
    ),
> {
    let rows: Vec<_> = worker_status_v2()
        .map(|(db, pid, _, written, pending, _, dropped, _, _, tq, tw, td)| (db, pid, pending, written, dropped, tq, tw, td))
        .collect();
    TableIterator::new(rows)
}
