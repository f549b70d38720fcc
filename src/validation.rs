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

use std::net::IpAddr;
use std::rc::Rc;

use pg_token_core::clock::{self, Micros};
use pg_token_core::format::{self, MAX_TOKEN_BYTES};
use pg_token_core::ratelimit::Admission;
use pg_token_core::reason::Reason;
use pg_token_core::verdict::{self, Context, Refusal, Registry, Request, Subject};
use pgrx::prelude::*;

use crate::datum::{form_composite, palloc_copy};
use crate::quota::{self, Applied, PerCall};
use crate::error;
use crate::events;
use crate::guc;
use crate::logscrub;
use crate::metrics;
use crate::store::{self, Stored};
use crate::tarpit;
use crate::v1;

pgrx::extension_sql_file!("../sql/validation.sql", name = "validation", requires = ["bootstrap"]);

/// Where the client is: the connection's own address, or one a trusted gateway stated.
#[derive(Clone, Copy)]
pub enum Origin {
    Connection,
    Stated(IpAddr),
}

/// What a validation is for: a request (counts against rate limits and usage caps) or an
/// administrative act by the holder (rotate_own_token, derive_own_token: counts nothing).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Request,
    Manage,
}

/// An accepted token and what this call counted for it.
pub struct Judged {
    pub token: Rc<Stored>,
    pub per_call: PerCall,
}

impl Judged {
    /// The identity row of this call: the cached one, or (for a token with limits or a cap)
    /// the cached one with this call's figures.
    pub fn identity_datum(&self) -> pg_sys::Datum {
        if self.per_call.is_empty() {
            return self.token.identity_datum();
        }
        store::catalog(|cat| self.token.identity_with(cat, &per_call_columns(&self.per_call)))
    }
}

/// A refusal, and the rate state when it was refused for its rate (for check_token's row).
pub struct Rejection {
    pub refusal: Refusal,
    pub rate: Option<Admission>,
}

impl From<Refusal> for Rejection {
    fn from(refusal: Refusal) -> Rejection {
        Rejection { refusal, rate: None }
    }
}

/// The per-call identity columns (uses_remaining, rate_limit, rate_remaining, rate_reset_at).
fn per_call_columns(p: &PerCall) -> [Option<pg_sys::Datum>; 4] {
    let rate = p.rate;
    [
        p.uses_remaining.map(pg_sys::Datum::from),
        rate.map(|r| pg_sys::Datum::from(i32::try_from(r.limit).unwrap_or(i32::MAX))),
        rate.map(|r| pg_sys::Datum::from(i32::try_from(r.remaining).unwrap_or(i32::MAX))),
        rate.map(|r| pg_sys::Datum::from(r.reset_at)),
    ]
}

/// Judges a request from this connection; records the refusal (never raises for it).
pub fn judge(req: Request<'_>) -> Result<Judged, Rejection> {
    judge_with(req, Origin::Connection, Purpose::Request, |_| None)
}

/// Judges a request. `check` may refuse an accepted token before anything is counted for it
/// (authenticate's session check). Raises only for faults that are not about the token
/// (pg_token not installed or not preloaded).
pub fn judge_with(
    req: Request<'_>,
    origin: Origin,
    purpose: Purpose,
    check: impl Fn(&Stored) -> Option<(Reason, String)>,
) -> Result<Judged, Rejection> {
    events::require_preload();
    logscrub::scrub_activity();
    let client = match origin {
        Origin::Connection => connection_address(),
        Origin::Stated(ip) => Some(ip),
    };
    // A token whose cap an administrator changed while we read it is judged again (twice at
    // most; a third change in that window is refused as stale).
    for _ in 0..3 {
        let now = clock::now();
        let result = guc::with_environment(|environment| {
            store::with(|_, registry, find, find_id, jwts| {
                let ctx = Context { environment, now, client, jwt_leeway_s: i64::from(guc::JWT_LEEWAY_S.get()) };
                verdict::decide(req, ctx, registry, find, find_id, jwts).map(|accepted| {
                    let s = &accepted.token.state;
                    let key_type = registry.key_type(&s.key_type);
                    let limits = s.effective_rate_limits(key_type).to_vec();
                    let detects = |k: Option<&verdict::KeyTypeInfo>| k.is_some_and(|k| k.reuse_detection);
                    let caller_detects = accepted.caller.as_ref().is_some_and(|c| detects(registry.key_type(&c.state.key_type)));
                    let watched = (detects(key_type), caller_detects);
                    (accepted, limits, watched)
                })
            })
        });
        let (accepted, limits, watched) = match result {
            Ok(a) => a,
            Err(refusal) => return Err(refused(refusal, None)),
        };
        // A family marked revoked on this server whose write is not committed (or not yet seen
        // here): refused as the committed revocation will be.
        if let Some(detail) = family_in_flight(&accepted.token, watched.0) {
            return Err(refused(limit_refusal(&accepted.token, Reason::FamilyRevoked, detail, req), None));
        }
        if let Some(caller) = accepted.caller.as_ref().filter(|c| family_in_flight(c, watched.1).is_some()) {
            let detail = "caller token refused (family_revoked): its token family is revoked".to_owned();
            let mut r = limit_refusal(&accepted.token, Reason::CallerInvalid, detail, req);
            r.subject = Subject::default();
            r.caller = Some(Subject { token_id: Some(caller.state.id), ..Subject::default() });
            return Err(refused(r, None));
        }
        let hint = || req.token.and_then(|t| format::split(t).ok()).map_or_else(String::new, |p| p.hint());
        if let Some((reason, detail)) = check(&accepted.token) {
            return Err(refused(limit_refusal(&accepted.token, reason, detail, req), None));
        }
        let per_call = if purpose == Purpose::Manage {
            PerCall::default()
        } else {
            match quota::apply(&accepted.token.state, &limits, hint, now) {
                Applied::Accepted(p) => p,
                Applied::Stale => continue,
                Applied::Refused(l) => {
                    return Err(refused(limit_refusal(&accepted.token, l.reason, l.detail, req), l.rate));
                }
            }
        };
        metrics::accepted();
        if let Some(lg) = accepted.token.state.legacy.as_deref() {
            legacy_accepted(&accepted.token.state, lg);
        } else {
            touch(&accepted.token, now);
        }
        if let Some(caller) = accepted.caller.as_ref().filter(|c| c.state.legacy.is_none()) {
            touch(caller, now);
        }
        return Ok(Judged { token: accepted.token, per_call });
    }
    Err(refused(
        Refusal::new(Reason::UsageExceeded, "the token's usage cap kept changing while it was judged".into(), Subject::default(), guc::environment()),
        None,
    ))
}

/// An accepted legacy JWT: counted in token.events (event legacy_jwt_used, per issuer, client
/// and window: the deprecation counts) and, unless token.legacy_notice is off, a NOTICE (or WARNING).
fn legacy_accepted(state: &verdict::TokenState, lg: &pg_token_core::legacy::LegacyState) {
    events::legacy_used(state, lg);
    let level = guc::LEGACY_NOTICE.get();
    if level != guc::LegacyNotice::Off {
        let cutoff = clock::iso_utc(lg.cutoff_at);
        let text = pg_token_core::legacy::deprecation(&lg.issuer, &cutoff, lg.message.as_deref());
        if level == guc::LegacyNotice::Warning {
            pgrx::warning!("pg_token: {text}");
        } else {
            pgrx::notice!("pg_token: {text}");
        }
    }
}

/// Why a token whose verdict rules accepted it belongs to a family marked revoked here.
fn family_in_flight(token: &Stored, watched: bool) -> Option<String> {
    let family = token.state.family_id.filter(|_| watched)?;
    events::family_marked(&family).then(|| "its token family was revoked because a rotated-away token was reused".to_owned())
}

/// Records a refusal (metrics, events) and hands it back, once the tarpit has held it as long
/// as this backend's refusal rate asks (`token.max_refusal_rate`). A refusal that detected a
/// reuse revokes the family first (waiting for the writer to commit it).
fn refused(refusal: Refusal, rate: Option<Admission>) -> Rejection {
    revoke_reused_family(&refusal, true);
    metrics::refused(refusal.reason);
    events::refused(&refusal);
    tarpit::hold_refusal();
    Rejection { refusal, rate }
}

/// Revokes the family of a reused token this refusal detected, if any (see `events::revoke_family`).
pub fn revoke_reused_family(refusal: &Refusal, wait: bool) {
    let Some(reuse) = refusal.reuse else { return };
    let subject = if refusal.subject.token_id == Some(reuse.token_id) {
        &refusal.subject
    } else {
        refusal.caller.as_ref().unwrap_or(&refusal.subject)
    };
    events::revoke_family(&reuse, subject, wait);
}

/// Records a refusal made outside `judge` (rotation's reuse check) and raises it. The family
/// write is not waited for: the caller holds a row lock it needs, released by this very error;
/// for the same reason the tarpit does not hold it.
pub fn refuse_reuse(refusal: Refusal) -> ! {
    revoke_reused_family(&refusal, false);
    metrics::refused(refusal.reason);
    events::refused(&refusal);
    error::refuse(&refusal)
}

/// A refusal of a token the verdict rules accepted (its session, rate or cap).
pub fn limit_refusal(token: &Stored, reason: Reason, detail: String, req: Request<'_>) -> Refusal {
    let parsed = req.token.and_then(|t| format::split(t).ok());
    let s = &token.state;
    let subject = Subject {
        prefix: parsed.as_ref().map(|p| p.prefix.to_owned()),
        hint: parsed.as_ref().map(|p| p.hint()),
        token_id: Some(s.id),
        account: Some(s.account.clone()),
        key_type: Some(s.key_type.clone()),
        environment: Some(s.environment.clone()),
    };
    Refusal::new(reason, detail, subject, guc::environment())
}

/// Judges and raises on refusal.
pub fn judge_or_raise(req: Request<'_>) -> Judged {
    match judge(req) {
        Ok(judged) => judged,
        Err(r) => error::refuse(&r.refusal),
    }
}

/// The connection's client address; None for a Unix-domain socket (and processes without a
/// client). It never changes for a backend, so it is read once (inet_client_addr's text, parsed).
fn connection_address() -> Option<IpAddr> {
    thread_local! {
        static ADDRESS: std::cell::OnceCell<Option<IpAddr>> = const { std::cell::OnceCell::new() };
    }
    ADDRESS.with(|a| {
        *a.get_or_init(|| {
            // SAFETY: inet_client_addr reads MyProcPort and returns NULL without a TCP client.
            let text = unsafe { pgrx::direct_function_call::<pgrx::Inet>(pg_sys::inet_client_addr, &[]) };
            text.and_then(|i| i.0.split('/').next().and_then(|a| a.parse().ok()))
        })
    })
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
        store::shared::touched(stored, now);
    }
}

/// The `(token, caller_token, required_scope)` arguments of validate_token, check_token and
/// authenticate, from argument `first` on (1 for the `_from` functions).
///
/// # Safety
/// `fcinfo` is the live call of one of those functions.
pub unsafe fn request<'a>(fcinfo: pg_sys::FunctionCallInfo, first: usize) -> Request<'a> {
    // SAFETY: the three arguments from `first` on are text.
    unsafe {
        Request {
            token: v1::text_arg(fcinfo, first),
            caller: v1::text_arg(fcinfo, first + 1),
            // Text in a UTF8 database is UTF-8 (pg_token is only installed in one); anything
            // else could name no scope a token carries, and "" is no valid scope.
            required_scope: v1::text_arg(fcinfo, first + 2).map(|b| std::str::from_utf8(b).unwrap_or("")),
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
    let req = unsafe { request(fcinfo, 0) };
    judge_or_raise(req).identity_datum()
}

v1::v1_function_info!(pg_finfo_pg_token_validate_token_from);
/// `token.validate_token_from(client_addr, token, caller_token, required_scope)`: the same, with
/// the client address a gateway states (token_gateway only, by grant).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pg_token_validate_token_from(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: called by Postgres as declared in sql/validation.sql.
    let (origin, req) = unsafe { (stated_origin(fcinfo), request(fcinfo, 1)) };
    match judge_with(req, origin, Purpose::Request, |_| None) {
        Ok(judged) => judged.identity_datum(),
        Err(r) => error::refuse(&r.refusal),
    }
}

v1::v1_function_info!(pg_finfo_pg_token_check_token);
/// `token.check_token(token, caller_token, required_scope) -> token.verdict`: the same
/// decision as a row `(valid, reason, identity columns...)`; never raises for a refusal.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pg_token_check_token(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: called by Postgres as declared in sql/validation.sql.
    let req = unsafe { request(fcinfo, 0) };
    verdict_row(judge(req))
}

v1::v1_function_info!(pg_finfo_pg_token_check_token_from);
/// `token.check_token_from(client_addr, token, ...)`: check_token with a stated client address.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pg_token_check_token_from(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: called by Postgres as declared in sql/validation.sql.
    let (origin, req) = unsafe { (stated_origin(fcinfo), request(fcinfo, 1)) };
    verdict_row(judge_with(req, origin, Purpose::Request, |_| None))
}

/// check_token's row: (true, NULL, identity) or (false, reason, NULLs but the rate state of a
/// token refused for its rate). The reason is the one the caller is told.
fn verdict_row(result: Result<Judged, Rejection>) -> pg_sys::Datum {
    // The catalog judge() just refreshed: nothing has run since that could change it.
    store::catalog(|cat| match result {
        Ok(judged) if judged.per_call.is_empty() => judged.token.verdict_datum(cat),
        Ok(judged) => judged.token.verdict_with(cat, &per_call_columns(&judged.per_call)),
        Err(r) => {
            let reason = r.refusal.shown_reason().as_str().into_datum().unwrap_or(pg_sys::Datum::from(0));
            let natts = unsafe { (*cat.verdict_desc).natts } as usize;
            let mut cols = vec![(pg_sys::Datum::from(0), true); natts];
            cols[0] = (pg_sys::Datum::from(false), false);
            cols[1] = (reason, false);
            if let (Some(rate), Some(at)) = (r.rate, cat.verdict_per_call) {
                let per_call = per_call_columns(&PerCall { uses_remaining: None, rate: Some(rate) });
                for (i, v) in at.iter().zip(per_call) {
                    if let Some(v) = v {
                        cols[*i] = (v, false);
                    }
                }
            }
            palloc_copy(form_composite(cat.verdict_desc, cols).as_bytes())
        }
    })
}

/// The client address a gateway stated (argument 0, inet); NULL means the connection's own.
///
/// # Safety
/// `fcinfo` is the live call of a `_from` function, whose argument 0 is inet.
pub unsafe fn stated_origin(fcinfo: pg_sys::FunctionCallInfo) -> Origin {
    const PGSQL_AF_INET: u8 = 2;
    const PGSQL_AF_INET6: u8 = 3;
    // SAFETY: per the contract; an inet datum is a varlena inet struct (family, bits, address).
    let bytes = unsafe { v1::text_arg(fcinfo, 0) };
    match bytes {
        Some([PGSQL_AF_INET, _, a @ ..]) if a.len() >= 4 => Origin::Stated(IpAddr::from([a[0], a[1], a[2], a[3]])),
        Some([PGSQL_AF_INET6, _, a @ ..]) if a.len() >= 16 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&a[..16]);
            Origin::Stated(IpAddr::from(o))
        }
        _ => Origin::Connection,
    }
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

/// The validation cache all backends share: the entries it can hold, its bytes, and since
/// server start the misses of backends' own caches it answered and the rows added to it.
#[pg_extern(volatile, parallel_restricted)]
fn shared_cache_stats() -> TableIterator<
    'static,
    (name!(capacity, i64), name!(bytes, i64), name!(enabled, bool), name!(hits_total, i64), name!(fills_total, i64)),
> {
    events::require_preload();
    let (hits, fills) = crate::metrics::shared_totals();
    let n = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
    let capacity = store::shared::capacity() as u64;
    let bytes = if capacity == 0 { 0 } else { crate::guc::shared_cache_bytes() as u64 };
    TableIterator::once((n(capacity), n(bytes), store::shared::usable().is_some(), n(hits), n(fills)))
}
