//! The SQL entry points that judge tokens: `validate_token` (raises on refusal),
//! `check_token` (returns the verdict as a row) and `hash_token`. Adapters only: they call
//! `verdict::decide` through `store`, record refusals through `events`, queue `last_used_at`
//! updates, and hand back the row. Refusals raise SQLSTATE 28000 with the reason word in the
//! message; the token never appears in anything they produce.
//!
//! `validate_token`, `check_token` and `authenticate` are plain V1 C functions declared in
//! `sql/validation.sql` rather than `#[pg_extern]`s, for two reasons. Their token arguments are
//! read as the bytes that arrived, so hostile input in any database encoding is judged
//! (`malformed`) instead of failing a UTF-8 conversion. And an accepted token's row is returned
//! as the prebuilt datum its cache entry holds: the hit path makes two calls into Postgres
//! (process invalidations, palloc the result) and builds no tuple.

use std::rc::Rc;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode};

use crate::events;
use crate::format::MAX_TOKEN_BYTES;
use crate::guc;
use crate::queue;
use crate::reason::Reason;
use crate::store::{self, Stored};
use crate::verdict::{self, Context, Micros, Refusal, Request};

pgrx::extension_sql_file!("../sql/validation.sql", name = "validation", requires = ["bootstrap"]);

/// Declares the Postgres V1 calling convention for a hand-written C function.
macro_rules! v1_function_info {
    ($finfo:ident) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn $finfo() -> &'static ::pgrx::pg_sys::Pg_finfo_record {
            static V1: ::pgrx::pg_sys::Pg_finfo_record = ::pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}
pub(crate) use v1_function_info;

pub fn require_preload() {
    if !queue::available() {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_token must be loaded via shared_preload_libraries",
            "Add pg_token to shared_preload_libraries in postgresql.conf and restart the server."
        );
    }
}

/// Microseconds since 2000-01-01 UTC: what `GetCurrentTimestamp()` returns, from the same
/// clock (CLOCK_REALTIME), read without a guarded call into Postgres.
pub fn now() -> Micros {
    const UNIX_TO_POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX) - UNIX_TO_POSTGRES_EPOCH_US,
        Err(_) => i64::MIN, // a clock before 1970: every deadline is in the future
    }
}

/// Judges a request; records the refusal (never raises for it). Raises only for faults that
/// are not about the token (pg_token not installed or not preloaded).
pub fn judge(req: Request<'_>) -> Result<Rc<Stored>, Refusal> {
    require_preload();
    let now = now();
    let result = guc::with_environment(|environment| {
        store::with(|_, registry, find| verdict::decide(req, Context { environment, now }, registry, find))
    });
    match result {
        Ok(accepted) => {
            touch(&accepted.token, now);
            if let Some(caller) = &accepted.caller {
                touch(caller, now);
            }
            Ok(accepted.token)
        }
        Err(refusal) => {
            events::refused(&refusal);
            Err(refusal)
        }
    }
}

/// Judges and raises on refusal.
pub fn judge_or_raise(req: Request<'_>) -> Rc<Stored> {
    match judge(req) {
        Ok(token) => token,
        Err(refusal) => raise(&refusal),
    }
}

pub fn raise(refusal: &Refusal) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
        refusal.message(),
        "pg_token",
    )
    .set_detail(refusal.detail.clone())
    .report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Queues a last_used_at update when this backend has not seen one within the interval. The
/// writer applies it only if the row's own last_used_at is that old too, so the interval
/// holds per token across all backends.
fn touch(stored: &Stored, now: Micros) {
    let interval = guc::LAST_USED_INTERVAL.get();
    if interval < 0 {
        return;
    }
    let interval_us = i64::from(interval) * 1_000_000;
    let due = stored.last_used_at.get().is_none_or(|t| now.saturating_sub(t) >= interval_us);
    if due {
        stored.last_used_at.set(Some(now));
        events::touched(stored.state.id, now, interval);
    }
}

/// Argument `i` of a V1 call as the bytes that arrived, or `None` for SQL NULL. Compressed or
/// out-of-line values (only a table column can hand us one) are detoasted first.
///
/// # Safety
/// `fcinfo` is the live call's, and argument `i`, if present, is of a varlena type.
pub unsafe fn text_arg<'a>(fcinfo: pg_sys::FunctionCallInfo, i: usize) -> Option<&'a [u8]> {
    // SAFETY: per the contract; the bytes live in the call's memory context, which outlives
    // the call that borrows them.
    unsafe {
        let fc = &*fcinfo;
        if i >= usize::try_from(fc.nargs).unwrap_or(0) {
            return None;
        }
        let arg = *fc.args.as_ptr().add(i);
        if arg.isnull {
            return None;
        }
        let mut p = arg.value.cast_mut_ptr::<pg_sys::varlena>();
        if pgrx::varlena::varatt_is_1b_e(p) || pgrx::varlena::varatt_is_4b_c(p) {
            p = pg_sys::pg_detoast_datum_packed(p);
        }
        Some(pgrx::varlena::varlena_to_byte_slice(p))
    }
}

/// The `(token, caller_token, required_scope)` arguments of validate_token, check_token and
/// authenticate.
///
/// # Safety
/// `fcinfo` is the live call of one of those functions.
pub unsafe fn request<'a>(fcinfo: pg_sys::FunctionCallInfo) -> Request<'a> {
    // SAFETY: all three arguments are text.
    unsafe {
        Request {
            token: text_arg(fcinfo, 0),
            caller: text_arg(fcinfo, 1),
            // Text in a UTF8 database is UTF-8 (pg_token is only installed in one); anything
            // else could name no scope a token carries, and "" is no valid scope.
            required_scope: text_arg(fcinfo, 2).map(|b| std::str::from_utf8(b).unwrap_or("")),
        }
    }
}

v1_function_info!(pg_finfo_pg_token_validate_token);
/// `token.validate_token(token, caller_token, required_scope) -> token.identity`: the identity,
/// or SQLSTATE 28000 naming the reason.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pg_token_validate_token(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: called by Postgres as declared in sql/validation.sql.
    let req = unsafe { request(fcinfo) };
    judge_or_raise(req).identity_datum()
}

v1_function_info!(pg_finfo_pg_token_check_token);
/// `token.check_token(token, caller_token, required_scope) -> token.verdict`: the same
/// decision as a row `(valid, reason, identity columns...)`; never raises for a refusal.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pg_token_check_token(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: called by Postgres as declared in sql/validation.sql.
    let req = unsafe { request(fcinfo) };
    let result = judge(req);
    // The catalog judge() just refreshed: nothing has run since that could change it.
    store::catalog(|cat| match result {
        Ok(stored) => stored.verdict_datum(cat),
        Err(refusal) => {
            let reason = store::text_datum(refusal.reason.as_str());
            let head = [(pg_sys::Datum::from(false), false), (reason, false)];
            let rest = std::iter::repeat_n((pg_sys::Datum::from(0), true), 9);
            store::palloc_copy(store::form_composite(cat.verdict_desc, head.into_iter().chain(rest)).as_bytes())
        }
    })
}

/// SHA-256 of a token: what token.tokens stores. Inputs over 256 bytes are refused.
#[pg_extern(immutable, strict, parallel_safe)]
fn hash_token(token: &str) -> Vec<u8> {
    if token.len() > MAX_TOKEN_BYTES {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "token is longer than 256 bytes",
            "Tokens are at most 256 bytes; the value was not hashed."
        );
    }
    crate::hash::token_hash(token).to_vec()
}

/// Every refusal reason with a one-line explanation.
#[pg_extern(immutable, parallel_safe)]
fn reasons() -> TableIterator<'static, (name!(reason, &'static str), name!(explanation, &'static str))> {
    TableIterator::new(Reason::ALL.iter().map(|r| (r.as_str(), r.explain())))
}

/// This backend's validation cache: entries, bytes used, the byte budget, and the hits and
/// misses counted since the backend started.
#[pg_extern(volatile, parallel_restricted)]
fn cache_stats() -> TableIterator<
    'static,
    (name!(entries, i64), name!(bytes, i64), name!(budget, i64), name!(hits, i64), name!(misses, i64)),
> {
    require_preload();
    let s = store::cache_stats();
    let n = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
    TableIterator::once((n(s.entries), n(s.bytes), n(s.budget), n(s.hits), n(s.misses)))
}
