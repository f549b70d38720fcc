//! The verdict rules. Given a presented token (and optionally a caller token and a required
//! scope), the registry of prefixes and key types, a way to find a stored token by hash, the
//! database's environment and the time, decide: accept, or refuse with one `Reason`.
//!
//! Everything that touches Postgres is passed in (the registry, the finder, the clock), so the
//! rules are tested here without a database. The order of the checks is part of the security
//! model: nothing about the presented token is looked up before a caller token is accepted,
//! and the prefix (so the environment) decides before any lookup by hash.
//!
//! This module must never see a token outside the call, log, or build a message containing
//! more than a prefix and a 4-character hint.

use std::net::IpAddr;

use crate::format::{self, FormatError, ParsedToken};
use crate::hash::{token_hash, TokenHash};
use crate::jwt;
use crate::legacy::{self, LegacyState};
use crate::network::{self, Network};
use crate::ratelimit::RateLimit;
use crate::reason::{self, Reason};

pub use crate::clock::Micros;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixInfo {
    pub key_type: String,
    pub environment: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyTypeInfo {
    /// Key types whose tokens a token of this type may validate as a caller.
    pub can_validate: Vec<String>,
    /// Networks its tokens may be used from, unless a token lists its own (None: anywhere).
    pub networks: Option<Vec<Network>>,
    /// Rate limits of each of its tokens, unless a token has its own.
    pub rate_limits: Vec<RateLimit>,
    /// A caller of another account is told `not_found` instead of `cross_account`.
    pub conceal_cross_account: bool,
    /// A token rotated away and presented after its grace window revokes its whole rotation
    /// family (`family_revoked`).
    pub reuse_detection: bool,
    /// The scopes its tokens may carry (None: any). Issuing and updating enforce it on tokens;
    /// a legacy JWT counted as this type carries only the scopes of its claim listed here.
    pub allowed_scopes: Option<Vec<String>>,
}

impl KeyTypeInfo {
    /// Whether this key type allows every one of `scopes`.
    pub fn allows_all(&self, scopes: &[String]) -> bool {
        self.allowed_scopes.as_ref().is_none_or(|allowed| scopes.iter().all(|s| allowed.contains(s)))
    }

    /// `scopes` without those this key type does not allow, in their order.
    pub fn allowed(&self, scopes: &[String]) -> Vec<String> {
        match &self.allowed_scopes {
            None => scopes.to_vec(),
            Some(allowed) => scopes.iter().filter(|s| allowed.contains(s)).cloned().collect(),
        }
    }
}

/// How deep a chain of parent tokens is followed before it is refused (the settings bound what
/// derive_token makes far below this; this only bounds the work of a corrupted chain).
pub const MAX_ANCESTRY: usize = 32;

/// A token's usage cap, as its row holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uses {
    /// Bumped by every administrative change of the cap, so reservations made under an older
    /// cap are not spent under a new one.
    pub version: i64,
    /// Uses not yet reserved when the row was read.
    pub remaining: i64,
    /// The cap refills (refill_uses is set).
    pub refills: bool,
}

pub trait Registry {
    fn prefix(&self, prefix: &str) -> Option<&PrefixInfo>;
    fn key_type(&self, name: &str) -> Option<&KeyTypeInfo>;
    /// The legacy JWT issuers (none: every JWT is refused as unknown_issuer).
    fn legacy_issuers(&self) -> &[legacy::Issuer] {
        &[]
    }
    fn legacy_revocations(&self) -> Option<&legacy::Revocations> {
        None
    }
}

/// Where the edge keeps accepted legacy JWTs: `cached` finds one verified before (by the JWT's
/// hash), `accepted` makes the edge's entry for a JWT that just verified.
pub trait LegacyStore<T> {
    fn cached(&mut self, token: &[u8]) -> Option<T>;
    fn accepted(&mut self, token: &[u8], verified: &legacy::Verified<'_>, state: TokenState) -> T;
}

/// No legacy JWTs: for callers that judge only pg_token's own tokens.
pub struct NoLegacy;

impl<T> LegacyStore<T> for NoLegacy {
    fn cached(&mut self, _: &[u8]) -> Option<T> {
        None
    }
    fn accepted(&mut self, _: &[u8], _: &legacy::Verified<'_>, _: TokenState) -> T {
        unreachable!("NoLegacy is only used with a registry without legacy issuers")
    }
}

/// What decides a stored token's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenState {
    pub id: [u8; 16],
    pub account: String,
    pub key_type: String,
    pub environment: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<Micros>,
    pub revoke_after: Option<Micros>,
    pub revoked_at: Option<Micros>,
    pub disabled_at: Option<Micros>,
    /// The token derive_token made this one from.
    pub parent_id: Option<[u8; 16]>,
    /// The token's own networks and rate limits (None: its key type's).
    pub networks: Option<Vec<Network>>,
    pub rate_limits: Option<Vec<RateLimit>>,
    pub uses: Option<Uses>,
    /// Set for a legacy JWT (its issuer, jti, iat, the issuer's cut-off and message).
    pub legacy: Option<Box<LegacyState>>,
    /// The rotation family: the id of the first token of the lineage (None on 0.1.0's schema).
    pub family_id: Option<[u8; 16]>,
    /// When the family was revoked because one of its rotated-away tokens was reused.
    pub family_revoked_at: Option<Micros>,
}

impl TokenState {
    /// A live token's state with nothing set but what every token has.
    pub fn new(id: [u8; 16], account: &str, key_type: &str, environment: &str) -> TokenState {
        TokenState {
            id,
            account: account.into(),
            key_type: key_type.into(),
            environment: environment.into(),
            scopes: Vec::new(),
            expires_at: None,
            revoke_after: None,
            revoked_at: None,
            disabled_at: None,
            parent_id: None,
            networks: None,
            rate_limits: None,
            uses: None,
            legacy: None,
            family_id: None,
            family_revoked_at: None,
        }
    }

    /// The rate limits that apply: the token's own, else its key type's.
    pub fn effective_rate_limits<'a>(&'a self, key_type: Option<&'a KeyTypeInfo>) -> &'a [RateLimit] {
        match (&self.rate_limits, key_type) {
            (Some(own), _) => own,
            (None, Some(kt)) => &kt.rate_limits,
            (None, None) => &[],
        }
    }
}

/// What a finder hands back: anything that holds a stored token's state (the edge's cache
/// entry, shared through an `Rc`).
pub trait Stateful {
    fn state(&self) -> &TokenState;
}

impl Stateful for TokenState {
    fn state(&self) -> &TokenState {
        self
    }
}

impl<T: Stateful + ?Sized> Stateful for std::rc::Rc<T> {
    fn state(&self) -> &TokenState {
        (**self).state()
    }
}

/// What is presented. Tokens are bytes as they arrived (any encoding, any content): judging
/// them is this module's job, so nothing upstream converts or rejects them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request<'a> {
    pub token: Option<&'a [u8]>,
    pub caller: Option<&'a [u8]>,
    pub required_scope: Option<&'a str>,
}

#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// `token.environment`; `None` when unset, which refuses every token.
    pub environment: Option<&'a str>,
    pub now: Micros,
    /// The client's address; None for a Unix-domain socket (see `network`).
    pub client: Option<IpAddr>,
    /// Seconds of clock skew allowed on a JWT's exp and nbf (`token.jwt_leeway`).
    pub jwt_leeway_s: i64,
}

#[derive(Debug)]
pub struct Accepted<T> {
    pub token: T,
    pub caller: Option<T>,
}

/// What is known about a refused token, for the event record. Never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subject {
    pub prefix: Option<String>,
    /// Prefix plus the first four body characters.
    pub hint: Option<String>,
    pub token_id: Option<[u8; 16]>,
    pub account: Option<String>,
    pub key_type: Option<String>,
    pub environment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The truth, for events, logs and metrics.
    pub reason: Reason,
    pub detail: String,
    pub subject: Subject,
    /// The caller token, when one was given and got far enough to be known.
    pub caller: Option<Subject>,
    pub database_environment: Option<String>,
    /// What the caller is told instead, when the key type conceals the truth
    /// (`conceal_cross_account`): a reason and a detail.
    pub shown: Option<(Reason, String)>,
    /// A reuse this refusal detected: the edge must revoke the family (and record it).
    pub reuse: Option<Reuse>,
}

/// A rotated-away token presented after its grace window, under a key type with reuse
/// detection: its whole family is to be revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reuse {
    pub family_id: [u8; 16],
    /// The token that was presented again.
    pub token_id: [u8; 16],
}

impl Refusal {
    pub fn new(reason: Reason, detail: String, subject: Subject, database_environment: Option<String>) -> Refusal {
        Refusal { reason, detail, subject, caller: None, database_environment, shown: None, reuse: None }
    }

    /// The reason the caller is told.
    pub fn shown_reason(&self) -> Reason {
        self.shown.as_ref().map_or(self.reason, |s| s.0)
    }

    /// The detail the caller is told.
    pub fn shown_detail(&self) -> &str {
        self.shown.as_ref().map_or(&self.detail, |s| &s.1)
    }

    /// The message the caller is told.
    pub fn message(&self) -> String {
        reason::message(
            self.shown_reason(),
            self.subject.environment.as_deref(),
            self.database_environment.as_deref(),
        )
    }

    pub fn hint(&self) -> Option<&'static str> {
        reason::hint(self.reason, self.database_environment.as_deref())
    }
}

/// The longest scope name quoted back in a detail.
const MAX_QUOTED_SCOPE: usize = 64;

struct Failure {
    reason: Reason,
    detail: String,
    reuse: Option<Reuse>,
}

/// A refusal inside `resolve`, with what was known about the token when it was refused.
type Refused = (Failure, Subject);

fn fail<T>(reason: Reason, detail: String, subject: Subject) -> Result<T, Refused> {
    Err((Failure { reason, detail, reuse: None }, subject))
}

/// What an event may record about a token, from what the checks had learnt so far. Built only
/// when a refusal needs it, so an accepted token costs no allocation here.
fn subject_of(parsed: Option<&ParsedToken<'_>>, info: Option<&PrefixInfo>, state: Option<&TokenState>) -> Subject {
    Subject {
        prefix: parsed.map(|p| p.prefix.to_owned()),
        hint: parsed.map(ParsedToken::hint),
        token_id: state.map(|s| s.id),
        account: state.map(|s| s.account.clone()),
        key_type: state.map(|s| &s.key_type).or(info.map(|i| &i.key_type)).cloned(),
        environment: state.map(|s| &s.environment).or(info.map(|i| &i.environment)).cloned(),
    }
}

/// Runs the checks for one token up to and including its stored state. `before_lookup` runs
/// once the prefix (so the key type) is known and may refuse (the caller-permission rule uses
/// it).
#[allow(clippy::too_many_arguments)]
fn resolve<'t, T, R, F, G, L>(
    token: Option<&'t [u8]>,
    ctx: &Context<'_>,
    registry: &R,
    find: &mut F,
    find_id: &mut G,
    legacy: &mut L,
    before_lookup: impl FnOnce(&str) -> Result<(), Failure>,
) -> Result<(T, ParsedToken<'t>), Refused>
where
    T: Stateful,
    R: Registry,
    F: FnMut(&TokenHash) -> Option<T>,
    G: FnMut(&[u8; 16]) -> Option<T>,
    L: LegacyStore<T>,
{
    let Some(token) = token else {
        return fail(Reason::Malformed, "the token is NULL".into(), Subject::default());
    };
    if jwt::looks_like_jwt(token) {
        return resolve_legacy(token, ctx, registry, legacy, before_lookup);
    }
    let parsed = match format::split(token) {
        Ok(p) => p,
        Err(e) => return fail(Reason::Malformed, e.describe().into(), Subject::default()),
    };
    if !parsed.checksum_matches() {
        let detail = format!("token {}: {}", parsed.hint(), FormatError::BadChecksum.describe());
        return fail(Reason::BadChecksum, detail, subject_of(Some(&parsed), None, None));
    }
    let Some(info) = registry.prefix(parsed.prefix) else {
        let detail = format!("prefix \"{}\" is not registered", parsed.prefix);
        return fail(Reason::UnknownPrefix, detail, subject_of(Some(&parsed), None, None));
    };
    if let Err(f) = before_lookup(&info.key_type) {
        return Err((f, subject_of(Some(&parsed), Some(info), None)));
    }
    if ctx.environment != Some(info.environment.as_str()) {
        let detail = format!(
            "token {} has prefix \"{}\", registered for environment \"{}\"",
            parsed.hint(),
            parsed.prefix,
            info.environment
        );
        return fail(Reason::EnvironmentMismatch, detail, subject_of(Some(&parsed), Some(info), None));
    }
    let Some(found) = find(&token_hash(token)) else {
        let detail = format!("no token matches {}", parsed.hint());
        return fail(Reason::NotFound, detail, subject_of(Some(&parsed), Some(info), None));
    };
    let state = found.state();
    if state.key_type != info.key_type {
        // Only a token issued under an earlier registration of the prefix (for another key
        // type) can get here; unregistering revokes a prefix's tokens, so this is a backstop.
        let detail = format!("token {} was issued as key type \"{}\", not the prefix's \"{}\"", parsed.hint(), state.key_type, info.key_type);
        return fail(Reason::Revoked, detail, subject_of(Some(&parsed), Some(info), Some(state)));
    }
    if ctx.environment != Some(state.environment.as_str()) {
        let detail = format!("token {} belongs to environment \"{}\"", parsed.hint(), state.environment);
        return fail(Reason::EnvironmentMismatch, detail, subject_of(Some(&parsed), Some(info), Some(state)));
    }
    if let Some(reuse) = reused(state, registry, ctx.now) {
        let detail = format!("token {} was rotated away and presented again after its grace window: its token family is revoked", parsed.hint());
        let failure = Failure { reason: Reason::FamilyRevoked, detail, reuse: Some(reuse) };
        return Err((failure, subject_of(Some(&parsed), Some(info), Some(state))));
    }
    if let Err((reason, what)) = status(state, ctx.now) {
        let detail = format!("token {} {what}", parsed.hint());
        return fail(reason, detail, subject_of(Some(&parsed), Some(info), Some(state)));
    }
    if let Err(what) = ancestry(state, ctx.now, find_id) {
        let detail = format!("token {}: {what}", parsed.hint());
        return fail(Reason::ParentInvalid, detail, subject_of(Some(&parsed), Some(info), Some(state)));
    }
    let networks = state.networks.as_ref().or_else(|| registry.key_type(&state.key_type).and_then(|k| k.networks.as_ref()));
    if let Some(networks) = networks {
        if !network::allows(networks, ctx.client) {
            let detail = format!("token {} may not be used from {}", parsed.hint(), network::describe(ctx.client));
            return fail(Reason::NetworkNotAllowed, detail, subject_of(Some(&parsed), Some(info), Some(state)));
        }
    }
    Ok((found, parsed))
}

/// What a JWT shows in messages and events: "jwt:" and the last four characters of its
/// signature (as a token's hint shows four of its body). Never more of it.
fn legacy_parsed(token: &[u8]) -> ParsedToken<'_> {
    let tail = token.len().saturating_sub(4);
    let body = std::str::from_utf8(&token[tail..]).unwrap_or("");
    ParsedToken { prefix: "jwt:", body, checksum: "" }
}

/// `resolve` for a JWT: verified against the legacy issuers (or found verified before), then
/// the rules every token meets (caller permission, environment, revocation, expiry) and the
/// issuer's cut-off.
fn resolve_legacy<'t, T, R, L>(
    token: &'t [u8],
    ctx: &Context<'_>,
    registry: &R,
    legacy: &mut L,
    before_lookup: impl FnOnce(&str) -> Result<(), Failure>,
) -> Result<(T, ParsedToken<'t>), Refused>
where
    T: Stateful,
    R: Registry,
    L: LegacyStore<T>,
{
    let parsed = legacy_parsed(token);
    let hint_of = |jti: Option<&str>| jti.map_or_else(|| parsed.hint(), legacy::jti_hint);
    let with_issuer = |issuer: Option<&str>, key_type: Option<&str>, environment: Option<&str>, jti: Option<&str>| Subject {
        prefix: Some(issuer.unwrap_or("jwt").to_owned()),
        hint: Some(hint_of(jti)),
        key_type: key_type.map(str::to_owned),
        environment: environment.map(str::to_owned),
        ..Subject::default()
    };
    let found = match legacy.cached(token) {
        Some(t) => t,
        None => match legacy::verify(token, registry.legacy_issuers(), ctx.now, ctx.jwt_leeway_s) {
            Ok(v) => {
                let i = v.issuer;
                let id = legacy::legacy_id(&i.name, v.claims.jti.as_deref(), token);
                let mut state = TokenState::new(id, &v.claims.account, &i.key_type, &i.environment);
                // The issuer's JWTs count as its key type's tokens: no scope that type forbids
                // (an unknown key type allows none; the registry's foreign key makes it moot).
                state.scopes = registry.key_type(&i.key_type).map(|k| k.allowed(&v.claims.scopes)).unwrap_or_default();
                state.expires_at = Some(crate::clock::from_unix_s(v.claims.exp));
                state.legacy = Some(Box::new(LegacyState {
                    issuer: i.name.clone(),
                    jti: v.claims.jti.clone(),
                    issued_at: v.claims.iat.map(crate::clock::from_unix_s),
                    cutoff_at: i.cutoff_at,
                    message: i.message.clone(),
                }));
                legacy.accepted(token, &v, state)
            }
            Err(r) => {
                let i = r.issuer;
                let subject = with_issuer(
                    i.map(|i| i.name.as_str()),
                    i.map(|i| i.key_type.as_str()),
                    i.map(|i| i.environment.as_str()),
                    r.jti.as_deref(),
                );
                return fail(r.reason, r.detail, subject);
            }
        },
    };
    let state = found.state();
    let Some(lg) = state.legacy.as_deref() else {
        return fail(Reason::Malformed, "the JWT's cache entry is not a JWT's".into(), with_issuer(None, None, None, None));
    };
    let subject = || {
        let mut s = subject_of(Some(&parsed), None, Some(state));
        s.prefix = Some(lg.issuer.clone());
        s.hint = Some(hint_of(lg.jti.as_deref()));
        s
    };
    if let Err(f) = before_lookup(&state.key_type) {
        return Err((f, subject()));
    }
    if ctx.environment != Some(state.environment.as_str()) {
        let detail = format!("JWT {} of legacy issuer \"{}\" counts for environment \"{}\"", parsed.hint(), lg.issuer, state.environment);
        return fail(Reason::EnvironmentMismatch, detail, subject());
    }
    if ctx.now >= lg.cutoff_at {
        let mut detail = format!("legacy issuer \"{}\" is retired: its JWTs are no longer accepted", lg.issuer);
        if let Some(m) = &lg.message {
            detail.push_str(": ");
            detail.push_str(m);
        }
        return fail(Reason::LegacyTokenRetired, detail, subject());
    }
    if let Some(what) = registry.legacy_revocations().and_then(|r| r.check(&state.account, lg)) {
        return fail(Reason::Revoked, format!("JWT {} {what}", parsed.hint()), subject());
    }
    let leeway = ctx.jwt_leeway_s.max(0).saturating_mul(1_000_000);
    if state.expires_at.is_some_and(|t| ctx.now >= t.saturating_add(leeway)) {
        return fail(Reason::Expired, format!("JWT {} has expired", parsed.hint()), subject());
    }
    let networks = registry.key_type(&state.key_type).and_then(|k| k.networks.as_ref());
    if let Some(networks) = networks {
        if !network::allows(networks, ctx.client) {
            let detail = format!("JWT {} may not be used from {}", parsed.hint(), network::describe(ctx.client));
            return fail(Reason::NetworkNotAllowed, detail, subject());
        }
    }
    Ok((found, parsed))
}

/// Follows a derived token's parents: every one must exist and pass `status` now (revoking,
/// disabling or expiring a parent refuses its descendants at their next call).
fn ancestry<T: Stateful>(state: &TokenState, now: Micros, find_id: &mut impl FnMut(&[u8; 16]) -> Option<T>) -> Result<(), String> {
    let mut next = state.parent_id;
    let mut depth = 0;
    while let Some(id) = next {
        depth += 1;
        if depth > MAX_ANCESTRY {
            return Err(format!("its chain of parent tokens is deeper than {MAX_ANCESTRY}"));
        }
        let Some(parent) = find_id(&id) else {
            return Err("its parent token no longer exists".into());
        };
        let ps = parent.state();
        if let Err((_, what)) = status(ps, now) {
            let whose = if depth == 1 { "its parent token" } else { "an ancestor token" };
            return Err(format!("{whose} {what}"));
        }
        next = ps.parent_id;
    }
    Ok(())
}

/// Whether presenting this token now is a reuse: it was rotated away (`revoke_after` set by
/// rotation), its grace window is over, its key type detects reuse, and neither it nor its family
/// was revoked already (an explicit revocation is final on its own and detects nothing).
pub fn reused<R: Registry>(state: &TokenState, registry: &R, now: Micros) -> Option<Reuse> {
    let family_id = state.family_id?;
    let detects = registry.key_type(&state.key_type).is_some_and(|k| k.reuse_detection);
    let past_grace = state.revoke_after.is_some_and(|t| t <= now);
    (detects && past_grace && state.revoked_at.is_none() && state.family_revoked_at.is_none())
        .then_some(Reuse { family_id, token_id: state.id })
}

/// Revocation and expiry against the clock. Checked on every call, cached or not.
pub fn status(state: &TokenState, now: Micros) -> Result<(), (Reason, &'static str)> {
    if state.family_revoked_at.is_some() {
        return Err((Reason::FamilyRevoked, "belongs to a token family revoked because one of its rotated-away tokens was reused"));
    }
    if state.revoked_at.is_some() {
        return Err((Reason::Revoked, "was revoked"));
    }
    if state.revoke_after.is_some_and(|t| t <= now) {
        return Err((Reason::Revoked, "was rotated and its grace period has ended"));
    }
    if state.expires_at.is_some_and(|t| t <= now) {
        return Err((Reason::Expired, "has expired"));
    }
    if state.disabled_at.is_some() {
        return Err((Reason::Disabled, "is disabled"));
    }
    Ok(())
}

/// Decides a request. See the module comment for the order of checks.
pub fn decide<T, R, F, G, L>(
    req: Request<'_>,
    ctx: Context<'_>,
    registry: &R,
    mut find: F,
    mut find_id: G,
    legacy: &mut L,
) -> Result<Accepted<T>, Refusal>
where
    T: Stateful,
    R: Registry,
    F: FnMut(&TokenHash) -> Option<T>,
    G: FnMut(&[u8; 16]) -> Option<T>,
    L: LegacyStore<T>,
{
    let refusal = |failure: Failure, subject: Subject, caller: Option<Subject>| Refusal {
        reason: failure.reason,
        detail: failure.detail,
        subject,
        caller,
        database_environment: ctx.environment.map(str::to_owned),
        shown: None,
        reuse: failure.reuse,
    };

    let caller = match req.caller {
        None => None,
        Some(c) => match resolve(Some(c), &ctx, registry, &mut find, &mut find_id, legacy, |_| Ok(())) {
            Ok(found) => Some(found),
            Err((inner, s)) => {
                let failure = Failure {
                    reason: Reason::CallerInvalid,
                    detail: format!("caller token refused ({}): {}", inner.reason, inner.detail),
                    reuse: inner.reuse,
                };
                return Err(refusal(failure, Subject::default(), Some(s)));
            }
        },
    };
    let caller_state = caller.as_ref().map(|(c, _)| c.state());
    let caller_subject = || caller.as_ref().map(|(c, p)| subject_of(Some(p), None, Some(c.state())));

    let permission = |key_type: &str| -> Result<(), Failure> {
        let Some(cs) = caller_state else { return Ok(()) };
        let allowed = registry
            .key_type(&cs.key_type)
            .is_some_and(|kt| kt.can_validate.iter().any(|k| k == key_type));
        if allowed {
            Ok(())
        } else {
            Err(Failure {
                reason: Reason::CallerNotPermitted,
                detail: format!("key type \"{}\" may not validate key type \"{key_type}\"", cs.key_type),
                reuse: None,
            })
        }
    };
    let (found, parsed) = match resolve(req.token, &ctx, registry, &mut find, &mut find_id, legacy, permission) {
        Ok(found) => found,
        Err((f, subject)) => return Err(refusal(f, subject, caller_subject())),
    };

    let state = found.state();
    let refused_here = |reason: Reason, detail: String| {
        let f = Failure { reason, detail, reuse: None };
        Err(refusal(f, subject_of(Some(&parsed), None, Some(state)), caller_subject()))
    };
    if let Some(cs) = caller_state {
        if cs.account != state.account {
            let detail = format!("the caller token and token {} belong to different accounts", parsed.hint());
            let conceal = registry.key_type(&state.key_type).is_some_and(|k| k.conceal_cross_account);
            if conceal {
                // The caller learns what a token that does not exist would tell it; the event
                // and the server log keep the truth.
                let shown = (Reason::NotFound, format!("no token matches {}", parsed.hint()));
                let f = Failure { reason: Reason::CrossAccount, detail, reuse: None };
                let mut r = refusal(f, subject_of(Some(&parsed), None, Some(state)), caller_subject());
                r.shown = Some(shown);
                return Err(r);
            }
            return refused_here(Reason::CrossAccount, detail);
        }
    }
    if let Some(scope) = req.required_scope {
        if !state.scopes.iter().any(|s| s == scope) {
            let quoted: String = scope.chars().take(MAX_QUOTED_SCOPE).collect();
            return refused_here(Reason::InsufficientScope, format!("token {} lacks scope \"{quoted}\"", parsed.hint()));
        }
    }
    let caller = caller.map(|(c, _)| c);
    Ok(Accepted { token: found, caller })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Reg {
        prefixes: HashMap<String, PrefixInfo>,
        key_types: HashMap<String, KeyTypeInfo>,
    }

    impl Registry for Reg {
        fn prefix(&self, p: &str) -> Option<&PrefixInfo> {
            self.prefixes.get(p)
        }
        fn key_type(&self, n: &str) -> Option<&KeyTypeInfo> {
            self.key_types.get(n)
        }
    }

    #[derive(Debug, Clone)]
    struct Row(TokenState);
    impl Stateful for Row {
        fn state(&self) -> &TokenState {
            &self.0
        }
    }

    struct World {
        reg: Reg,
        rows: HashMap<TokenHash, TokenState>,
        lookups: usize,
    }

    const NOW: Micros = 1_000_000_000;

    impl World {
        fn new() -> World {
            let mut reg = Reg::default();
            for (p, kt, env) in [("cf-", "agent", "dev"), ("cfprd-", "agent", "prod"), ("mid_", "mid", "dev")] {
                reg.prefixes.insert(p.into(), PrefixInfo { key_type: kt.into(), environment: env.into() });
            }
            reg.key_types.insert("agent".into(), KeyTypeInfo::default());
            reg.key_types.insert("mid".into(), KeyTypeInfo { can_validate: vec!["agent".into()], ..KeyTypeInfo::default() });
            World { reg, rows: HashMap::new(), lookups: 0 }
        }

        fn issue(&mut self, prefix: &str, body: &str, account: &str, f: impl FnOnce(&mut TokenState)) -> String {
            let t = format::compose(prefix, body);
            let info = self.reg.prefixes[prefix].clone();
            let mut state = TokenState::new([self.rows.len() as u8 + 1; 16], account, &info.key_type, &info.environment);
            state.scopes = vec!["read".into()];
            f(&mut state);
            self.rows.insert(token_hash(&t), state);
            t
        }

        fn decide(&mut self, req: Request<'_>, env: Option<&str>, now: Micros) -> Result<Accepted<Row>, Refusal> {
            self.decide_from(req, env, now, Some(IpAddr::from([10, 0, 0, 1])))
        }

        fn decide_from(&mut self, req: Request<'_>, env: Option<&str>, now: Micros, client: Option<IpAddr>) -> Result<Accepted<Row>, Refusal> {
            let rows = &self.rows;
            let lookups = std::cell::Cell::new(self.lookups);
            let r = decide(
                req,
                Context { environment: env, now, client, jwt_leeway_s: 0 },
                &self.reg,
                |h: &TokenHash| {
                    lookups.set(lookups.get() + 1);
                    rows.get(h).cloned().map(Row)
                },
                |id: &[u8; 16]| {
                    lookups.set(lookups.get() + 1);
                    rows.values().find(|s| s.id == *id).cloned().map(Row)
                },
                &mut NoLegacy,
            );
            self.lookups = lookups.get();
            r
        }

        fn id_of(&self, t: &str) -> [u8; 16] {
            self.rows[&token_hash(t)].id
        }

        fn reason(&mut self, req: Request<'_>) -> Option<Reason> {
            self.decide(req, Some("dev"), NOW).err().map(|r| r.reason)
        }
    }

    fn presented(t: &str) -> Request<'_> {
        Request { token: Some(t.as_bytes()), ..Request::default() }
    }

    #[test]
    fn a_live_token_is_accepted_with_its_state() {
        let mut w = World::new();
        let t = w.issue("cf-", "aaaaaaaaaaaaaaaaaaaaaa", "acme", |_| {});
        let ok = w.decide(presented(&t), Some("dev"), NOW).expect("accepted");
        assert_eq!(ok.token.0.account, "acme");
        assert!(ok.caller.is_none());
    }

    #[test]
    fn each_format_failure_is_refused_before_any_lookup() {
        let mut w = World::new();
        let t = w.issue("cf-", "aaaaaaaaaaaaaaaaaaaaaa", "acme", |_| {});
        let mut bad = t.clone().into_bytes();
        let i = bad.len() - 1;
        bad[i] = if bad[i] == b'a' { b'b' } else { b'a' };
        let bad = String::from_utf8(bad).expect("ascii");
        assert_eq!(w.reason(Request::default()), Some(Reason::Malformed));
        assert_eq!(w.reason(presented("")), Some(Reason::Malformed));
        assert_eq!(w.reason(presented("cf-'; drop table x;--")), Some(Reason::Malformed));
        assert_eq!(w.reason(presented(&bad)), Some(Reason::BadChecksum));
        let unknown = format::compose("zz-", "aaaaaaaaaaaaaaaaaaaaaa");
        assert_eq!(w.reason(presented(&unknown)), Some(Reason::UnknownPrefix));
        assert_eq!(w.lookups, 0);
    }

    #[test]
    fn the_prefix_decides_the_environment_before_any_lookup() {
        let mut w = World::new();
        // No row anywhere: the token comes from another database.
        let foreign = format::compose("cfprd-", "bbbbbbbbbbbbbbbbbbbbbb");
        let r = w.decide(presented(&foreign), Some("dev"), NOW).expect_err("refused");
        assert_eq!(r.reason, Reason::EnvironmentMismatch);
        assert_eq!(r.message(), "Token environment mismatch: prod token used in dev");
        assert_eq!(w.lookups, 0);
        let r = w.decide(presented(&foreign), None, NOW).expect_err("refused");
        assert_eq!(r.message(), "Token environment mismatch: prod token used in (unset)");
    }

    #[test]
    fn status_reasons_follow_the_clock() {
        let mut w = World::new();
        let revoked = w.issue("cf-", "cccccccccccccccccccccc", "acme", |s| s.revoked_at = Some(NOW - 10));
        let rotated = w.issue("cf-", "dddddddddddddddddddddd", "acme", |s| s.revoke_after = Some(NOW + 10));
        let expiring = w.issue("cf-", "eeeeeeeeeeeeeeeeeeeeee", "acme", |s| s.expires_at = Some(NOW + 10));
        let missing = format::compose("cf-", "ffffffffffffffffffffff");
        assert_eq!(w.reason(presented(&revoked)), Some(Reason::Revoked));
        assert_eq!(w.reason(presented(&missing)), Some(Reason::NotFound));
        assert!(w.decide(presented(&rotated), Some("dev"), NOW).is_ok(), "inside the grace window");
        assert_eq!(w.decide(presented(&rotated), Some("dev"), NOW + 10).err().map(|r| r.reason), Some(Reason::Revoked));
        assert!(w.decide(presented(&expiring), Some("dev"), NOW + 9).is_ok());
        assert_eq!(w.decide(presented(&expiring), Some("dev"), NOW + 10).err().map(|r| r.reason), Some(Reason::Expired));
    }

    #[test]
    fn caller_rules() {
        let mut w = World::new();
        let mid = w.issue("mid_", "gggggggggggggggggggggg", "acme", |_| {});
        let agent = w.issue("cf-", "hhhhhhhhhhhhhhhhhhhhhh", "acme", |_| {});
        let other = w.issue("cf-", "iiiiiiiiiiiiiiiiiiiiii", "globex", |_| {});
        let dead_mid = w.issue("mid_", "jjjjjjjjjjjjjjjjjjjjjj", "acme", |s| s.revoked_at = Some(0));

        let ok = w.decide(Request { token: Some(agent.as_bytes()), caller: Some(mid.as_bytes()), required_scope: None }, Some("dev"), NOW);
        assert!(ok.expect("same account").caller.is_some());

        let r = w.decide(Request { token: Some(other.as_bytes()), caller: Some(mid.as_bytes()), required_scope: None }, Some("dev"), NOW);
        assert_eq!(r.expect_err("refused").reason, Reason::CrossAccount);

        // An agent may not validate anything; refused before the presented token is looked up.
        let before = w.lookups;
        let r = w.decide(Request { token: Some(mid.as_bytes()), caller: Some(agent.as_bytes()), required_scope: None }, Some("dev"), NOW);
        assert_eq!(r.expect_err("refused").reason, Reason::CallerNotPermitted);
        assert_eq!(w.lookups, before + 1, "only the caller was looked up");

        let before = w.lookups;
        let r = w.decide(Request { token: Some(agent.as_bytes()), caller: Some(dead_mid.as_bytes()), required_scope: None }, Some("dev"), NOW)
            .expect_err("refused");
        assert_eq!(r.reason, Reason::CallerInvalid);
        assert!(r.detail.contains("revoked"), "{}", r.detail);
        assert_eq!(w.lookups, before + 1, "nothing about the presented token is revealed");
    }

    #[test]
    fn a_token_whose_key_type_is_not_its_prefix_s_is_refused() {
        let mut w = World::new();
        let t = w.issue("cf-", "mmmmmmmmmmmmmmmmmmmmmm", "acme", |s| s.key_type = "mid".into());
        let r = w.decide(presented(&t), Some("dev"), NOW).expect_err("refused");
        assert_eq!(r.reason, Reason::Revoked);
        assert!(r.detail.contains("key type \"mid\""), "{}", r.detail);
    }

    #[test]
    fn required_scope() {
        let mut w = World::new();
        let t = w.issue("cf-", "kkkkkkkkkkkkkkkkkkkkkk", "acme", |_| {});
        assert!(w.decide(Request { token: Some(t.as_bytes()), caller: None, required_scope: Some("read") }, Some("dev"), NOW).is_ok());
        assert_eq!(
            w.reason(Request { token: Some(t.as_bytes()), caller: None, required_scope: Some("write") }),
            Some(Reason::InsufficientScope)
        );
    }

    #[test]
    fn refusals_never_carry_the_token() {
        let mut w = World::new();
        let t = w.issue("cf-", "llllllllllllllllllllll", "acme", |s| s.revoked_at = Some(0));
        let r = w.decide(presented(&t), Some("dev"), NOW).expect_err("refused");
        let everything = format!("{} {} {:?}", r.message(), r.detail, r.subject);
        assert!(!everything.contains(&t));
        assert!(!everything.contains("llllllll"), "more than the 4-char hint leaked: {everything}");
        assert_eq!(r.subject.hint.as_deref(), Some("cf-llll"));
    }
    #[test]
    fn a_disabled_token_is_refused_until_enabled() {
        let mut w = World::new();
        let t = w.issue("cf-", "nnnnnnnnnnnnnnnnnnnnnn", "acme", |s| s.disabled_at = Some(NOW - 5));
        assert_eq!(w.reason(presented(&t)), Some(Reason::Disabled));
        w.rows.get_mut(&token_hash(&t)).expect("row").disabled_at = None;
        assert_eq!(w.reason(presented(&t)), None);
        // Revoked or expired outranks disabled.
        let both = w.issue("cf-", "oooooooooooooooooooooo", "acme", |s| {
            s.disabled_at = Some(0);
            s.revoked_at = Some(0);
        });
        assert_eq!(w.reason(presented(&both)), Some(Reason::Revoked));
    }

    #[test]
    fn a_derived_token_follows_every_ancestor() {
        let mut w = World::new();
        let root = w.issue("cf-", "pppppppppppppppppppppp", "acme", |_| {});
        let root_id = w.id_of(&root);
        let child = w.issue("cf-", "qqqqqqqqqqqqqqqqqqqqqq", "acme", |s| s.parent_id = Some(root_id));
        let child_id = w.id_of(&child);
        let grandchild = w.issue("cf-", "rrrrrrrrrrrrrrrrrrrrrr", "acme", |s| s.parent_id = Some(child_id));
        assert_eq!(w.reason(presented(&grandchild)), None);
        for (field, word) in [("revoked", "was revoked"), ("disabled", "is disabled"), ("expired", "has expired")] {
            let row = w.rows.get_mut(&token_hash(&root)).expect("root");
            match field {
                "revoked" => row.revoked_at = Some(0),
                "disabled" => row.disabled_at = Some(0),
                _ => row.expires_at = Some(NOW - 1),
            }
            let r = w.decide(presented(&grandchild), Some("dev"), NOW).expect_err("refused");
            assert_eq!(r.reason, Reason::ParentInvalid, "{field}");
            assert!(r.detail.contains(&format!("an ancestor token {word}")), "{}", r.detail);
            assert_eq!(w.reason(presented(&child)), Some(Reason::ParentInvalid));
            assert_eq!(w.reason(presented(&root)).is_some(), true);
            let row = w.rows.get_mut(&token_hash(&root)).expect("root");
            (row.revoked_at, row.disabled_at, row.expires_at) = (None, None, None);
        }
        // A parent that is gone, and a cycle no real chain can have, are refused too.
        w.rows.get_mut(&token_hash(&child)).expect("child").parent_id = Some([0xee; 16]);
        let r = w.decide(presented(&grandchild), Some("dev"), NOW).expect_err("refused");
        assert!(r.detail.contains("an ancestor token") || r.detail.contains("no longer exists"), "{}", r.detail);
        w.rows.get_mut(&token_hash(&child)).expect("child").parent_id = Some(child_id);
        let r = w.decide(presented(&grandchild), Some("dev"), NOW).expect_err("refused");
        assert!(r.detail.contains("deeper than"), "{}", r.detail);
    }

    #[test]
    fn bound_networks_refuse_other_clients() {
        let mut w = World::new();
        let office = Network::new(false, 24, &[192, 0, 2, 0]).expect("net");
        let t = w.issue("cf-", "ssssssssssssssssssssss", "acme", |s| s.networks = Some(vec![office]));
        assert!(w.decide_from(presented(&t), Some("dev"), NOW, Some(IpAddr::from([192, 0, 2, 77]))).is_ok());
        let r = w.decide_from(presented(&t), Some("dev"), NOW, Some(IpAddr::from([198, 51, 100, 1]))).expect_err("refused");
        assert_eq!(r.reason, Reason::NetworkNotAllowed);
        assert!(r.detail.contains("198.51.100.1"), "{}", r.detail);
        assert_eq!(w.decide_from(presented(&t), Some("dev"), NOW, None).err().map(|r| r.reason), Some(Reason::NetworkNotAllowed));
        // The key type's list applies to tokens without their own; a token's own list wins.
        let loopback = Network::new(false, 8, &[127, 0, 0, 0]).expect("net");
        w.reg.key_types.get_mut("agent").expect("agent").networks = Some(vec![loopback]);
        let plain = w.issue("cf-", "tttttttttttttttttttttt", "acme", |_| {});
        assert!(w.decide_from(presented(&plain), Some("dev"), NOW, None).is_ok(), "a socket is loopback");
        assert_eq!(w.reason(presented(&plain)), Some(Reason::NetworkNotAllowed));
        assert!(w.decide_from(presented(&t), Some("dev"), NOW, Some(IpAddr::from([192, 0, 2, 1]))).is_ok());
    }

    #[test]
    fn a_concealing_key_type_shows_cross_account_as_not_found() {
        let mut w = World::new();
        let mid = w.issue("mid_", "uuuuuuuuuuuuuuuuuuuuuu", "acme", |_| {});
        let other = w.issue("cf-", "vvvvvvvvvvvvvvvvvvvvvv", "globex", |_| {});
        let req = Request { token: Some(other.as_bytes()), caller: Some(mid.as_bytes()), required_scope: None };
        let plain = w.decide(req, Some("dev"), NOW).expect_err("refused");
        assert_eq!((plain.reason, plain.shown_reason()), (Reason::CrossAccount, Reason::CrossAccount));
        w.reg.key_types.get_mut("agent").expect("agent").conceal_cross_account = true;
        let hidden = w.decide(req, Some("dev"), NOW).expect_err("refused");
        assert_eq!(hidden.reason, Reason::CrossAccount, "the event keeps the truth");
        assert_eq!(hidden.shown_reason(), Reason::NotFound);
        assert_eq!(hidden.message(), "token rejected: not_found");
        assert!(hidden.shown_detail().starts_with("no token matches cf-vvvv"), "{}", hidden.shown_detail());
        let missing = format::compose("cf-", "wwwwwwwwwwwwwwwwwwwwww");
        let absent = w.decide(Request { token: Some(missing.as_bytes()), ..req }, Some("dev"), NOW).expect_err("refused");
        assert_eq!((absent.message(), absent.shown_detail().replace("wwww", "vvvv")), (hidden.message(), hidden.shown_detail().to_owned()),
            "indistinguishable from a token that does not exist");
    }

    #[test]
    fn a_rotated_away_token_past_its_grace_window_is_a_reuse_only_with_detection() {
        let mut w = World::new();
        let family = [0xfa; 16];
        let old = w.issue("cf-", "xxxxxxxxxxxxxxxxxxxxxx", "acme", |s| {
            s.family_id = Some(family);
            s.revoke_after = Some(NOW - 1);
        });
        let old_id = w.id_of(&old);
        // Without the option: plain `revoked`, nothing to revoke.
        let r = w.decide(presented(&old), Some("dev"), NOW).expect_err("refused");
        assert_eq!((r.reason, r.reuse), (Reason::Revoked, None));
        w.reg.key_types.get_mut("agent").expect("agent").reuse_detection = true;
        let r = w.decide(presented(&old), Some("dev"), NOW).expect_err("refused");
        assert_eq!(r.reason, Reason::FamilyRevoked);
        assert_eq!(r.reuse, Some(Reuse { family_id: family, token_id: old_id }));
        assert!(r.detail.contains("rotated away") && r.detail.contains("cf-xxxx"), "{}", r.detail);
        assert_eq!(r.message(), "token rejected: family_revoked");
        // Grace 0: revoke_after is the rotation's own moment, so any presentation is a reuse.
        w.rows.get_mut(&token_hash(&old)).expect("old").revoke_after = Some(NOW);
        assert_eq!(w.decide(presented(&old), Some("dev"), NOW).err().and_then(|r| r.reuse).map(|u| u.token_id), Some(old_id));
        // Inside the grace window: accepted, no revocation.
        w.rows.get_mut(&token_hash(&old)).expect("old").revoke_after = Some(NOW + 1);
        assert!(w.decide(presented(&old), Some("dev"), NOW).is_ok());
        // Revoked explicitly: final on its own, not a reuse.
        let revoked = w.issue("cf-", "yyyyyyyyyyyyyyyyyyyyyy", "acme", |s| {
            s.family_id = Some(family);
            s.revoke_after = Some(NOW - 1);
            s.revoked_at = Some(NOW - 1);
        });
        let r = w.decide(presented(&revoked), Some("dev"), NOW).expect_err("refused");
        assert_eq!((r.reason, r.reuse), (Reason::Revoked, None));
        // A reused caller token revokes its family too (the presented token is never looked up).
        let mid = w.issue("mid_", "zzzzzzzzzzzzzzzzzzzzzz", "acme", |s| {
            s.family_id = Some([0xfb; 16]);
            s.revoke_after = Some(NOW - 1);
        });
        w.reg.key_types.get_mut("mid").expect("mid").reuse_detection = true;
        let live = w.issue("cf-", "aaaaaaaaaaaaaaaaaaaaab", "acme", |_| {});
        let r = w.decide(Request { token: Some(live.as_bytes()), caller: Some(mid.as_bytes()), required_scope: None }, Some("dev"), NOW)
            .expect_err("refused");
        assert_eq!(r.reason, Reason::CallerInvalid);
        assert_eq!(r.reuse.map(|u| u.family_id), Some([0xfb; 16]));
    }

    #[test]
    fn every_member_of_a_revoked_family_is_refused_as_such() {
        let mut w = World::new();
        let family = [0xfc; 16];
        let first = w.issue("cf-", "bbbbbbbbbbbbbbbbbbbbbc", "acme", |s| {
            s.family_id = Some(family);
            s.revoke_after = Some(NOW - 100);
            s.revoked_at = Some(NOW - 5);
            s.family_revoked_at = Some(NOW - 5);
        });
        let live = w.issue("cf-", "cccccccccccccccccccccd", "acme", |s| {
            s.family_id = Some(family);
            s.revoked_at = Some(NOW - 5);
            s.family_revoked_at = Some(NOW - 5);
        });
        let live_id = w.id_of(&live);
        let child = w.issue("cf-", "ddddddddddddddddddddde", "acme", |s| s.parent_id = Some(live_id));
        // With or without the option now, and with no new reuse reported.
        for detects in [true, false] {
            w.reg.key_types.get_mut("agent").expect("agent").reuse_detection = detects;
            for t in [&first, &live] {
                let r = w.decide(presented(t), Some("dev"), NOW).expect_err("refused");
                assert_eq!((r.reason, r.reuse), (Reason::FamilyRevoked, None), "detects={detects}");
            }
            let r = w.decide(presented(&child), Some("dev"), NOW).expect_err("refused");
            assert_eq!(r.reason, Reason::ParentInvalid);
            assert!(r.detail.contains("token family revoked"), "{}", r.detail);
        }
    }
}
