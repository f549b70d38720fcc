//! Judging tokens: `validate_token` (raises on refusal), `check_token` (returns the verdict as
//! a row), and the utilities around them (`hash_token`, `reasons`, `cache_stats`). Adapters
//! only: the rules are `pg_token_core::verdict::decide`, fed through `store`; refusals are
//! recorded through `events`, last-use updates queued there too, and the row handed back.
//! Refusals raise SQLSTATE 28000 (through `error`) with the reason word in the message; the
//! token never appears in anything they produce.
//!
//! `validate_token`, `check_token` and `authenticate` (in `session`) are plain V1 C functions
//! declared in `sql/validation.sql` rather than `#[pg_extern]`s, for two reasons. Their token
//! arguments are read as the bytes that arrived, so hostile input in any database encoding is
//! judged (`malformed`) instead of failing a UTF-8 conversion. And an accepted token's row is
//! returned as the prebuilt datum its cache entry holds: the hit path makes two calls into
//! Postgres (process invalidations, palloc the result) and builds no tuple.
//!
//! A new check on a presented token belongs in the core's `verdict` (with its `Reason`); a new
//! input to it is loaded by `store`. Keep this file a thin adapter.

use std::rc::Rc;

use pg_token_core::clock::{self, Micros};
use pg_token_core::format::MAX_TOKEN_BYTES;
use pg_token_core::reason::Reason;
use pg_token_core::verdict::{self, Context, Refusal, Request};
use pgrx::prelude::*;

use crate::datum::{form_composite, palloc_copy};
use crate::error;
use crate::events;
use crate::guc;
use crate::logscrub;
use crate::metrics;
use crate::store::{self, Stored};
use crate::v1;

pgrx::extension_sql_file!("../sql/validation.sql", name = "validation", requires = ["bootstrap"]);

/// Judges a request; records the refusal (never raises for it). Raises only for faults that
/// are not about the token (pg_token not installed or not preloaded).
pub fn judge(req: Request<'_>) -> Result<Rc<Stored>, Refusal> {
    events::require_preload();
    logscrub::scrub_activity();
    let now = clock::now();
    let result = guc::with_environment(|environment| {
        store::with(|_, registry, find| verdict::decide(req, Context { environment, now }, registry, find))
    });
    match result {
        Ok(accepted) => {
            metrics::accepted();
            touch(&accepted.token, now);
            if let Some(caller) = &accepted.caller {
                touch(caller, now);
            }
            Ok(accepted.token)
        }
        Err(refusal) => {
            metrics::refused(refusal.reason);
            events::refused(&refusal);
            Err(refusal)
        }
    }
}

/// Judges and raises on refusal.
pub fn judge_or_raise(req: Request<'_>) -> Rc<Stored> {
    match judge(req) {
        Ok(token) => token,
        Err(refusal) => error::refuse(&refusal),
    }
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

/// The `(token, caller_token, required_scope)` arguments of validate_token, check_token and
/// authenticate.
///
/// # Safety
/// `fcinfo` is the live call of one of those functions.
pub unsafe fn request<'a>(fcinfo: pg_sys::FunctionCallInfo) -> Request<'a> {
    // SAFETY: all three arguments are text.
    unsafe {
        Request {
            token: v1::text_arg(fcinfo, 0),
            caller: v1::text_arg(fcinfo, 1),
            // Text in a UTF8 database is UTF-8 (pg_token is only installed in one); anything
            // else could name no scope a token carries, and "" is no valid scope.
            required_scope: v1::text_arg(fcinfo, 2).map(|b| std::str::from_utf8(b).unwrap_or("")),
        }
    }
}

v1::v1_function_info!(pg_finfo_pg_token_validate_token);
/// `token.validate_token(token, caller_token, required_scope) -> token.identity`: the identity,
/// or SQLSTATE 28000 naming the reason.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pg_token_validate_token(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: called by Postgres as declared in sql/validation.sql.
    let req = unsafe { request(fcinfo) };
    judge_or_raise(req).identity_datum()
}

v1::v1_function_info!(pg_finfo_pg_token_check_token);
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
            let reason = refusal.reason.as_str().into_datum().unwrap_or(pg_sys::Datum::from(0));
            let head = [(pg_sys::Datum::from(false), false), (reason, false)];
            let rest = std::iter::repeat_n((pg_sys::Datum::from(0), true), 9);
            palloc_copy(form_composite(cat.verdict_desc, head.into_iter().chain(rest)).as_bytes())
        }
    })
}

/// SHA-256 of a token: what token.tokens stores. Inputs over 256 bytes are refused.
#[pg_extern(immutable, strict, parallel_safe)]
fn hash_token(token: &str) -> Vec<u8> {
    if token.len() > MAX_TOKEN_BYTES {
        error::Error::new(error::Kind::InvalidValue, "token is longer than 256 bytes")
            .hint("Tokens are at most 256 bytes; the value was not hashed.")
            .raise();
    }
    pg_token_core::hash::token_hash(token).to_vec()
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
    events::require_preload();
    let s = store::cache_stats();
    let n = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
    TableIterator::once((n(s.entries), n(s.bytes), n(s.budget), n(s.hits), n(s.misses)))
}
