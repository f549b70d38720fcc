//! Rotation: a successor token with the same account, key type, environment, scopes, name and
//! metadata; the old one keeps validating for a grace window (`revoke_after`), then fails as
//! `revoked` with no job needed.

use pg_token_core::verdict::Request;
use pgrx::datum::{Interval, JsonB};
use pgrx::prelude::*;

use super::{database_environment, fail, insert_token, invalid, required, require_writable, spi, NewToken};
use crate::error::Kind;
use crate::events::{self, Lifecycle};
use crate::validation;

/// Rotates a token: issues a successor with the same account, key type, environment, scopes,
/// name and metadata, and lets the old one live until `now + grace`.
fn rotate(token_id: pgrx::Uuid, grace: Interval) -> NewToken {
    if grace.is_negative() {
        invalid("grace must not be negative");
    }
    let env = database_environment();
    Spi::connect_mut(|client| {
        let old = spi(client.update(
            "SELECT t.account, t.key_type, t.environment, t.prefix, t.name, t.scopes, t.metadata, \
                    t.revoked_at IS NOT NULL, t.revoke_after IS NOT NULL, \
                    (t.expires_at IS NOT NULL AND t.expires_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp()), \
                    CASE WHEN t.expires_at IS NULL THEN COALESCE(kt.default_ttl, kt.max_ttl) \
                         ELSE LEAST(t.expires_at OPERATOR(pg_catalog.-) t.created_at, kt.max_ttl) END, \
                    EXISTS (SELECT 1 FROM token.prefixes p WHERE p.prefix OPERATOR(pg_catalog.=) t.prefix \
                            AND p.environment OPERATOR(pg_catalog.=) t.environment), \
                    (SELECT s.id FROM token.tokens s WHERE s.rotated_from OPERATOR(pg_catalog.=) t.id LIMIT 1) \
             FROM token.tokens t JOIN token.key_types kt ON kt.name OPERATOR(pg_catalog.=) t.key_type \
             WHERE t.id OPERATOR(pg_catalog.=) $1 FOR NO KEY UPDATE OF t",
            Some(1),
            &[token_id.into()],
        ));
        if old.is_empty() {
            fail(Kind::NoSuchToken, format!("token {token_id} does not exist"), None);
        }
        let r = old.first();
        let account: String = required(spi(r.get(1)), "account");
        let key_type: String = required(spi(r.get(2)), "key_type");
        let environment: String = required(spi(r.get(3)), "environment");
        let prefix: String = required(spi(r.get(4)), "prefix");
        let name: Option<String> = spi(r.get(5));
        let scopes: Vec<String> = spi(r.get(6)).unwrap_or_default();
        let metadata: JsonB = spi(r.get(7)).unwrap_or(JsonB(serde_json::json!({})));
        let state = |s: &str| fail(Kind::WrongState, format!("token {token_id} {s}"), None);
        if environment != env {
            state(&format!("belongs to environment \"{environment}\"; this database serves \"{env}\""));
        }
        if spi(r.get::<bool>(8)).unwrap_or(false) {
            state("is revoked");
        }
        if spi(r.get::<bool>(9)).unwrap_or(false) {
            let successor: Option<pgrx::Uuid> = spi(r.get(13));
            let hint = successor.map(|s| format!("Rotate its successor, {s}."));
            fail(Kind::WrongState, format!("token {token_id} has already been rotated"),
                hint.as_deref(),
            );
        }
        if spi(r.get::<bool>(10)).unwrap_or(false) {
            state("has expired");
        }
        let lifetime: Option<Interval> = spi(r.get(11));
        if !spi(r.get::<bool>(12)).unwrap_or(false) {
            state(&format!("has prefix \"{prefix}\", which is no longer registered"));
        }

        let new = insert_token(client, &prefix, &account, &key_type, &environment, name.as_deref(), scopes, metadata, lifetime, Some(token_id));
        spi(client.update(
            "UPDATE token.tokens SET revoke_after = pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) $2 \
             WHERE id OPERATOR(pg_catalog.=) $1",
            None,
            &[token_id.into(), grace.into()],
        ));
        let old_hint: Option<String> = spi(client
            .select("SELECT hint FROM token.tokens WHERE id OPERATOR(pg_catalog.=) $1", Some(1), &[token_id.into()])
            .and_then(|t| t.first().get_one()));
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
    events::require_preload();
    let new = rotate(required(token_id, "token_id"), required(grace, "grace"));
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
    let judged = validation::judge_or_raise(Request { token: token.map(str::as_bytes), caller: None, required_scope: None });
    let new = rotate(pgrx::Uuid::from_bytes(judged.state.id), required(grace, "grace"));
    TableIterator::once((new.id, new.token))
}

