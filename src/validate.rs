//! The SQL entry points that judge tokens: `validate_token` (raises on refusal),
//! `check_token` (returns the verdict as a row) and `hash_token`. Adapters only: they call
//! `verdict::decide` through `store`, record refusals through `events`, queue `last_used_at`
//! updates, and turn the result into a row. Refusals raise SQLSTATE 28000 with the reason
//! word in the message; the token never appears in anything they produce.

use std::rc::Rc;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode, PgTupleDesc};

use crate::events;
use crate::format::MAX_TOKEN_BYTES;
use crate::guc;
use crate::queue;
use crate::reason::Reason;
use crate::store::{self, Stored};
use crate::verdict::{self, Context, Refusal, Request};

/// An accepted token and the descriptor to build its identity row with.
pub struct Judged {
    pub token: Rc<Stored>,
    pub identity_desc: pg_sys::TupleDesc,
}

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

/// Judges a request; records the refusal (never raises for it). Raises only for faults that
/// are not about the token (pg_token not installed or not preloaded).
pub fn judge(req: Request<'_>) -> (Result<Rc<Stored>, Refusal>, pg_sys::TupleDesc, pg_sys::TupleDesc) {
    require_preload();
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let (result, identity_desc, verdict_desc) = guc::with_environment(|environment| {
        store::with(|cat, registry, find| {
            let ctx = Context { environment, now };
            (verdict::decide(req, ctx, registry, find), cat.identity_desc, cat.verdict_desc)
        })
    });
    let result = match result {
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
    };
    (result, identity_desc, verdict_desc)
}

/// Judges and raises on refusal.
pub fn judge_or_raise(req: Request<'_>) -> Judged {
    match judge(req) {
        (Ok(token), identity_desc, _) => Judged { token, identity_desc },
        (Err(refusal), ..) => raise(&refusal),
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

/// Queues a last_used_at update when this backend has not seen one within the interval.
fn touch(stored: &Stored, now: i64) {
    let interval = guc::LAST_USED_INTERVAL.get();
    if interval < 0 {
        return;
    }
    let due = stored.last_used_at.get().is_none_or(|t| now - t >= i64::from(interval) * 1_000_000);
    if due {
        stored.last_used_at.set(Some(now));
        events::touched(stored.state.id, now);
    }
}

/// The values of a `token.identity` row, in column order.
pub fn identity_values(s: &Stored) -> [Option<pg_sys::Datum>; 9] {
    let st = &s.state;
    let ts = |t: Option<i64>| t.map(pg_sys::Datum::from);
    [
        Some(store::uuid_datum(&st.id)),
        Some(store::text_datum(&st.account)),
        Some(store::text_datum(&st.key_type)),
        Some(store::text_datum(&st.environment)),
        (!s.scopes_raw.is_empty()).then(|| store::varlena_datum(&s.scopes_raw)),
        s.name.as_deref().map(store::text_datum),
        ts(st.expires_at),
        ts(st.revoke_after),
        (!s.metadata_raw.is_empty()).then(|| store::varlena_datum(&s.metadata_raw)),
    ]
}

pub fn row<I: IntoIterator<Item = Option<pg_sys::Datum>>>(desc: pg_sys::TupleDesc, values: I) -> pgrx::composite_type!('static, "identity") {
    // SAFETY: `desc` is the catalog's copy of the row type (TopMemoryContext, not refcounted)
    // and `values` match its columns in order and type.
    let tuple = unsafe { PgHeapTuple::from_datums(PgTupleDesc::from_pg_unchecked(desc), values) };
    match tuple {
        Ok(t) => t,
        Err(e) => {
            ereport!(ERROR, PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("pg_token could not build a result row: {e}"));
        }
    }
}

/// Validates a token and returns its identity, or raises SQLSTATE 28000 naming the reason.
#[pg_extern(volatile, parallel_unsafe)]
fn validate_token(
    token: Option<&str>,
    caller_token: default!(Option<&str>, "NULL"),
    required_scope: default!(Option<&str>, "NULL"),
) -> pgrx::composite_type!('static, "identity") {
    let judged = judge_or_raise(Request { token, caller: caller_token, required_scope });
    row(judged.identity_desc, identity_values(&judged.token))
}

/// The same verdict as validate_token, as a row: (valid, reason, identity columns...).
/// Never raises for a refused token; the identity columns are NULL unless valid.
#[pg_extern(volatile, parallel_unsafe)]
fn check_token(
    token: Option<&str>,
    caller_token: default!(Option<&str>, "NULL"),
    required_scope: default!(Option<&str>, "NULL"),
) -> pgrx::composite_type!('static, "verdict") {
    let (result, _, verdict_desc) = judge(Request { token, caller: caller_token, required_scope });
    match result {
        Ok(stored) => {
            let head = [Some(true.into_datum().unwrap_or(pg_sys::Datum::from(0))), None];
            row(verdict_desc, head.into_iter().chain(identity_values(&stored)))
        }
        Err(refusal) => {
            let head = [Some(false.into_datum().unwrap_or(pg_sys::Datum::from(0))), Some(store::text_datum(refusal.reason.as_str()))];
            row(verdict_desc, head.into_iter().chain(std::iter::repeat_n(None, 9)))
        }
    }
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

/// This backend's validation cache: entries, bytes used, and the byte budget.
#[pg_extern(volatile, parallel_restricted)]
fn cache_stats() -> TableIterator<'static, (name!(entries, i64), name!(bytes, i64), name!(budget, i64))> {
    require_preload();
    let (entries, bytes, budget) = store::cache_stats();
    let n = |x: usize| i64::try_from(x).unwrap_or(i64::MAX);
    TableIterator::once((n(entries), n(bytes), n(budget)))
}
