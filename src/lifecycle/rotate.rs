//! Rotation: a successor token with the same account, key type, environment, scopes, name,
//! metadata, networks, rate limits and parent; the old one keeps validating for a grace window
//! (`revoke_after`), then fails as `revoked` with no job needed. A usage cap moves to the
//! successor (the old token keeps none), and derived children follow it too.

use pg_token_core::reason::Reason;
use pg_token_core::verdict::{Refusal, Request, Reuse, Subject};
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;

use super::{database_environment, fail, invalid, new_secret, required, require_writable, spi, NewToken};
use crate::error::Kind;
use crate::events::{self, Lifecycle};
use crate::prepared;
use crate::schema;
use crate::validation::{self, Origin, Purpose};

/// Rotates a token: issues a successor in the same family with the same account, key type,
/// environment, name and metadata, and lets the old one live until `now + grace`.
///
/// Rotation replaces a secret; it does not make a family live forever. The successor gets the
/// old token's lifetime again, but never past the family's first issue plus the key type's
/// `max_ttl` (so repeated rotation ends there), and keeps only the scopes the key type allows
/// now.
///
/// `presented`: the holder presented the token (rotate_own_token). Losing a race to another
/// rotation of it is then a reuse like any other presentation of a rotated-away token: past its
/// grace window (always, with grace 0), under a key type with reuse_detection, the whole family is
/// revoked and the call refused (`family_revoked`).
fn rotate(token_id: pgrx::Uuid, grace: Interval, presented: bool) -> NewToken {
    if grace.is_negative() {
        invalid("grace must not be negative");
    }
    let env = database_environment();
    Spi::connect_mut(|client| {
        let old = spi(prepared::run(
            client,
            "SELECT t.account, t.environment, t.prefix, \
                    t.revoked_at IS NOT NULL, t.revoke_after IS NOT NULL, \
                    (t.expires_at IS NOT NULL AND t.expires_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp()), \
                    t.key_type, \
                    (SELECT s.id FROM token.tokens s WHERE s.rotated_from OPERATOR(pg_catalog.=) t.id LIMIT 1), \
                    e.until, \
                    ARRAY(SELECT s FROM pg_catalog.unnest(t.scopes) AS s \
                           WHERE kt.allowed_scopes IS NULL OR s OPERATOR(pg_catalog.=) ANY (kt.allowed_scopes)), \
                    t.family_issued_at, t.disabled_at IS NOT NULL, \
                    t.family_id, kt.reuse_detection, \
                    (t.revoke_after OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp()), t.hint, \
                    e.until OPERATOR(pg_catalog.<=) pg_catalog.now() \
             FROM token.tokens t JOIN token.key_types kt ON kt.name OPERATOR(pg_catalog.=) t.key_type \
                  CROSS JOIN LATERAL (SELECT LEAST( \
                      pg_catalog.now() OPERATOR(pg_catalog.+) \
                          (CASE WHEN t.expires_at IS NULL THEN COALESCE(kt.default_ttl, kt.max_ttl) \
                                ELSE (t.expires_at OPERATOR(pg_catalog.-) t.created_at) END), \
                      (t.family_issued_at OPERATOR(pg_catalog.+) kt.max_ttl), \
                      (SELECT p.expires_at FROM token.tokens p WHERE p.id OPERATOR(pg_catalog.=) t.parent_id)) AS until) e \
             WHERE t.id OPERATOR(pg_catalog.=) $1 FOR NO KEY UPDATE OF t",
            Some(1),
            &[token_id.into()],
        ));
        if old.is_empty() {
            fail(Kind::NoSuchToken, format!("token {token_id} does not exist"), None);
        }
        let r = old.first();
        let account: String = required(spi(r.get(1)), "account");
        let environment: String = required(spi(r.get(2)), "environment");
        let prefix: String = required(spi(r.get(3)), "prefix");
        let state = |s: &str| fail(Kind::WrongState, format!("token {token_id} {s}"), None);
        if environment != env {
            state(&format!("belongs to environment \"{environment}\"; this database serves \"{env}\""));
        }
        if spi(r.get::<bool>(4)).unwrap_or(false) {
            state("is revoked");
        }
        if spi(r.get::<bool>(5)).unwrap_or(false) {
            let family: Option<pgrx::Uuid> = spi(r.get(13));
            let detects = spi(r.get::<bool>(14)).unwrap_or(false);
            let past_grace = spi(r.get::<bool>(15)).unwrap_or(false);
            if let (true, true, true, Some(family)) = (presented, detects, past_grace, family) {
                let hint: Option<String> = spi(r.get(16));
                let key_type: Option<String> = spi(r.get(7));
                let detail = format!(
                    "token {} was rotated away and presented again after its grace window: its token family is revoked",
                    hint.as_deref().unwrap_or("")
                );
                let subject = Subject {
                    prefix: Some(prefix.clone()),
                    hint,
                    token_id: Some(*token_id.as_bytes()),
                    account: Some(account.clone()),
                    key_type,
                    environment: Some(environment.clone()),
                };
                let mut refusal = Refusal::new(Reason::FamilyRevoked, detail, subject, Some(env.clone()));
                refusal.reuse = Some(Reuse { family_id: *family.as_bytes(), token_id: *token_id.as_bytes() });
                validation::refuse_reuse(refusal);
            }
            let successor: Option<pgrx::Uuid> = spi(r.get(8));
            let hint = successor.map(|s| format!("Rotate its successor, {s}."));
            fail(Kind::WrongState, format!("token {token_id} has already been rotated"), hint.as_deref());
        }
        if spi(r.get::<bool>(6)).unwrap_or(false) {
            state("has expired");
        }
        if spi(r.get::<bool>(12)).unwrap_or(false) {
            state("is disabled; enable it first");
        }
        let key_type: String = required(spi(r.get(7)), "key_type");
        // FOR SHARE: unregister_prefix waits for this rotation (and then revokes the successor).
        let registered = spi(prepared::run(
            client,
            "SELECT 1 FROM token.prefixes WHERE prefix OPERATOR(pg_catalog.=) $1 \
             AND key_type OPERATOR(pg_catalog.=) $2 AND environment OPERATOR(pg_catalog.=) $3 FOR SHARE",
            Some(1),
            &[prefix.as_str().into(), key_type.into(), environment.as_str().into()],
        ));
        if registered.is_empty() {
            state(&format!("has prefix \"{prefix}\", which is not registered for its key type any more"));
        }
        let expires_at: Option<TimestampWithTimeZone> = spi(r.get(9));
        let old_hint: Option<String> = spi(r.get(16));
        let scopes: Vec<String> = spi(r.get::<Vec<String>>(10)).unwrap_or_default();
        // The family's end: the successor's expiry (never past its first issue + max_ttl) is now.
        if spi(r.get::<bool>(17)).unwrap_or(false) {
            let issued: Option<TimestampWithTimeZone> = spi(r.get(11));
            fail(
                Kind::WrongState,
                format!("token {token_id}'s rotation family has reached its key type's max_ttl"),
                Some(&format!(
                    "The family was first issued at {}; issue a new token with generate_token.",
                    issued.map(|t| t.to_string()).unwrap_or_default()
                )),
            );
        }

        let secret = new_secret(&prefix);
        let id = spi(prepared::run(
            client,
            "INSERT INTO token.tokens (id, token_hash, hint, prefix, account, key_type, environment, name, scopes, \
                                       metadata, expires_at, rotated_from, family_id, family_issued_at, parent_id, \
                                       allowed_networks, rate_limits, uses_remaining, refill_uses, refill_interval, \
                                       refilled_at) \
             SELECT pg_catalog.gen_random_uuid(), $1, $2, t.prefix, t.account, t.key_type, t.environment, t.name, \
                    $3, t.metadata, $4, t.id, t.family_id, t.family_issued_at, t.parent_id, t.allowed_networks, \
                    t.rate_limits, t.uses_remaining, t.refill_uses, t.refill_interval, t.refilled_at \
               FROM token.tokens t WHERE t.id OPERATOR(pg_catalog.=) $5 \
             RETURNING id",
            Some(1),
            &[secret.hash.clone().into(), secret.hint.as_str().into(), scopes.into(), expires_at.into(), token_id.into()],
        )
        .and_then(|t| t.first().get_one::<pgrx::Uuid>()));
        let new = NewToken { id: required(id, "token id"), token: secret.token };
        // The old token's usage cap moves to the successor (the old one keeps no uses, so the
        // two never spend more than the cap), and its children become the successor's.
        spi(prepared::run(
            client,
            "UPDATE token.tokens SET revoke_after = pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) $2, \
                    uses_remaining = CASE WHEN uses_remaining IS NULL THEN NULL ELSE 0 END, \
                    refill_uses = NULL, refill_interval = NULL, refilled_at = NULL, \
                    uses_version = CASE WHEN uses_remaining IS NULL THEN uses_version \
                                        ELSE uses_version OPERATOR(pg_catalog.+) 1 END \
             WHERE id OPERATOR(pg_catalog.=) $1",
            None,
            &[token_id.into(), grace.into()],
        ));
        spi(prepared::run(
            client,
            "UPDATE token.tokens SET parent_id = $2 WHERE parent_id OPERATOR(pg_catalog.=) $1",
            None,
            &[token_id.into(), new.id.into()],
        ));
        spi(events::lifecycle(
            client,
            Lifecycle {
                event: "rotated",
                token_id: Some(token_id),
                account: Some(&account),
                prefix: Some(&prefix),
                hint: old_hint.as_deref(),
                environment: Some(&environment),
                detail: Some(format!("successor={} grace={}", new.id, grace)),
            },
        ));
        new
    })
}

/// Rotates the token with this id. The old token keeps validating until `grace` has passed.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_token(
    token_id: Option<pgrx::Uuid>,
    grace: default!(Option<Interval>, "'24 hours'"),
) -> TableIterator<'static, (name!(token_id, pgrx::Uuid), name!(token, String))> {
    require_writable("rotate_token");
    schema::require_current("rotate_token");
    events::require_preload();
    let new = rotate(required(token_id, "token_id"), required(grace, "grace"), false);
    TableIterator::once((new.id, new.token))
}

/// Self-service rotation: the holder presents the current token (which must validate).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_own_token(
    token: Option<&str>,
    grace: default!(Option<Interval>, "'24 hours'"),
) -> TableIterator<'static, (name!(token_id, pgrx::Uuid), name!(token, String))> {
    require_writable("rotate_own_token");
    schema::require_current("rotate_own_token");
    let req = Request { token: token.map(str::as_bytes), caller: None, required_scope: None };
    let judged = match validation::judge_with(req, Origin::Connection, Purpose::Manage, |_| None) {
        Ok(j) => j,
        Err(r) => crate::error::refuse(&r.refusal),
    };
    let new = rotate(pgrx::Uuid::from_bytes(judged.token.state.id), required(grace, "grace"), true);
    TableIterator::once((new.id, new.token))
}

