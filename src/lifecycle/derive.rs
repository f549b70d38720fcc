//! Child tokens, as Vault's token tree has them: `derive_token` issues a token from a parent
//! with at most the parent's scopes, an expiry no later than the parent's, and networks within
//! the parent's. The child records its parent, and every validation follows the chain (the
//! verdict rules' `ancestry`): revoking, disabling or expiring a parent refuses every descendant
//! at its next call, with nothing written to the descendants. Depth and fan-out are bounded by
//! `token.max_token_depth` and `token.max_child_tokens`.

use pg_token_core::limits;
use pg_token_core::verdict::Request;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;

use super::options::{check_networks, check_rate_limits, inets, networks_sql};
use super::{check_scopes, check_text, database_environment, fail, invalid, new_secret, required, require_writable, spi, NewToken};
use crate::datum::{RawJsonb, RawInets, RawRateLimits};
use crate::error::Kind;
use crate::events::{self, Lifecycle};
use crate::guc;
use crate::schema;
use crate::validation::{self, Origin, Purpose};

/// What a child may carry, as the caller asked.
struct Asked {
    name: Option<String>,
    scopes: Option<Vec<Option<String>>>,
    expires_in: Option<Interval>,
    metadata: Option<RawJsonb>,
    uses: Option<i64>,
    rate_limits: Option<RawRateLimits>,
    allowed_networks: Option<RawInets>,
}

fn derive(parent: pgrx::Uuid, asked: Asked) -> NewToken {
    check_text("name", asked.name.as_deref(), limits::MAX_TOKEN_NAME_CHARS);
    if asked.expires_in.is_some_and(|i| i.is_negative() || i.as_micros() == 0) {
        invalid("expires_in must be positive");
    }
    if asked.uses.is_some_and(|u| u < 0) {
        invalid("uses must not be negative");
    }
    let scopes = asked.scopes.as_ref().map(|s| check_scopes(s));
    let env = database_environment();
    Spi::connect_mut(|client| {
        let rate_limits = check_rate_limits(client, asked.rate_limits);
        let networks = check_networks(client, asked.allowed_networks);
        // The parent, locked against a concurrent derive (fan-out) and revocation (which then
        // waits for us; the child is refused through the chain once it commits anyway).
        let row = spi(client.update(
            "SELECT t.account, t.key_type, t.environment, t.prefix, t.scopes, t.name, t.metadata, t.expires_at, \
                    (t.revoked_at IS NOT NULL OR (t.revoke_after IS NOT NULL AND t.revoke_after OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp()) \
                     OR (t.expires_at IS NOT NULL AND t.expires_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp()) \
                     OR t.disabled_at IS NOT NULL), \
                    t.allowed_networks IS NOT NULL, t.hint \
               FROM token.tokens t WHERE t.id OPERATOR(pg_catalog.=) $1 FOR NO KEY UPDATE",
            Some(1),
            &[parent.into()],
        ));
        if row.is_empty() {
            fail(Kind::NoSuchToken, format!("token {parent} does not exist"), None);
        }
        let r = row.first();
        let account: String = required(spi(r.get(1)), "account");
        let key_type: String = required(spi(r.get(2)), "key_type");
        let environment: String = required(spi(r.get(3)), "environment");
        let prefix: String = required(spi(r.get(4)), "prefix");
        let parent_scopes: Vec<String> = spi(r.get::<Vec<String>>(5)).unwrap_or_default();
        let parent_name: Option<String> = spi(r.get(6));
        let parent_expires: Option<TimestampWithTimeZone> = spi(r.get(8));
        let parent_hint: Option<String> = spi(r.get(11));
        let state = |s: &str| fail(Kind::WrongState, format!("token {parent} {s}"), None);
        if environment != env {
            state(&format!("belongs to environment \"{environment}\"; this database serves \"{env}\""));
        }
        if spi(r.get::<bool>(9)).unwrap_or(true) {
            state("is revoked, expired or disabled; only a live token can have children");
        }
        let scopes = match scopes {
            None => parent_scopes.clone(),
            Some(s) => {
                if let Some(extra) = s.iter().find(|x| !parent_scopes.contains(x)) {
                    invalid(format!("scope \"{}\" is not among the parent token's scopes", limits::quoted(extra)));
                }
                s
            }
        };
        // Networks within the parent's own (a child never reaches further than its parent).
        if spi(r.get::<bool>(10)).unwrap_or(false) {
            if networks.is_some() {
                let within: Option<bool> = spi(client
                    .select(
                        "SELECT pg_catalog.bool_and(EXISTS (SELECT 1 FROM pg_catalog.unnest(t.allowed_networks) AS p \
                                                             WHERE pg_catalog.network(c) OPERATOR(pg_catalog.<<=) p)) \
                           FROM token.tokens t, pg_catalog.unnest($2::pg_catalog.inet[]) AS c WHERE t.id OPERATOR(pg_catalog.=) $1",
                        Some(1),
                        &[parent.into(), inets(networks)],
                    )
                    .and_then(|t| t.first().get_one()));
                if within != Some(true) {
                    invalid("allowed_networks must lie within the parent token's networks");
                }
            }
        }
        // Depth: how many ancestors the parent has, bounded (a chain this long is refused).
        let max_depth = guc::MAX_TOKEN_DEPTH.get();
        let depth: Option<i32> = spi(client
            .select(
                "WITH RECURSIVE up(id, depth) AS ( \
                     SELECT t.parent_id, 1 FROM token.tokens t WHERE t.id OPERATOR(pg_catalog.=) $1 \
                     UNION ALL \
                     SELECT t.parent_id, up.depth OPERATOR(pg_catalog.+) 1 FROM token.tokens t JOIN up ON t.id OPERATOR(pg_catalog.=) up.id \
                      WHERE up.depth OPERATOR(pg_catalog.<=) 32) \
                 SELECT pg_catalog.max(depth) FROM up WHERE id IS NULL OR depth OPERATOR(pg_catalog.>) 32",
                Some(1),
                &[parent.into()],
            )
            .and_then(|t| t.first().get_one()));
        let depth = depth.unwrap_or(i32::MAX);
        if depth > max_depth {
            fail(
                Kind::ConfigurationLimit,
                format!("a token derived from {parent} would be {depth} levels deep; token.max_token_depth is {max_depth}"),
                Some("Derive from a token higher up, or ask a superuser to raise token.max_token_depth."),
            );
        }
        let max_children = guc::MAX_CHILD_TOKENS.get();
        let children: Option<i64> = spi(client
            .select(
                "SELECT pg_catalog.count(*) FROM token.tokens WHERE parent_id OPERATOR(pg_catalog.=) $1 \
                    AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp())",
                Some(1),
                &[parent.into()],
            )
            .and_then(|t| t.first().get_one()));
        if children.unwrap_or(0) >= i64::from(max_children) {
            fail(
                Kind::ConfigurationLimit,
                format!("token {parent} already has {max_children} live children; token.max_child_tokens is {max_children}"),
                Some("Revoke children that are no longer used, or ask a superuser to raise token.max_child_tokens."),
            );
        }
        // Expiry: as asked but never past the parent's (nor the key type's max_ttl from now).
        let expiry = spi(client.select(
            "SELECT CASE WHEN $2::pg_catalog.interval IS NULL THEN $1::pg_catalog.timestamptz \
                         ELSE pg_catalog.now() OPERATOR(pg_catalog.+) $2 END, \
                    ($2 IS NOT NULL AND $1 IS NOT NULL AND (pg_catalog.now() OPERATOR(pg_catalog.+) $2) OPERATOR(pg_catalog.>) $1), \
                    ($2 IS NOT NULL AND kt.max_ttl IS NOT NULL AND \
                     (pg_catalog.now() OPERATOR(pg_catalog.+) $2) OPERATOR(pg_catalog.>) (pg_catalog.now() OPERATOR(pg_catalog.+) kt.max_ttl)) \
               FROM token.key_types kt WHERE kt.name OPERATOR(pg_catalog.=) $3",
            Some(1),
            &[parent_expires.into(), asked.expires_in.into(), key_type.as_str().into()],
        ));
        let e = expiry.first();
        if spi(e.get::<bool>(2)).unwrap_or(false) {
            invalid("expires_in would outlive the parent token");
        }
        if spi(e.get::<bool>(3)).unwrap_or(false) {
            invalid(format!("expires_in exceeds the maximum TTL of key type \"{key_type}\""));
        }
        let expires_at: Option<TimestampWithTimeZone> = spi(e.get(1));
        if asked.metadata.is_some() {
            let ok: Option<bool> = spi(client
                .select(
                    "SELECT pg_catalog.jsonb_typeof($1) OPERATOR(pg_catalog.=) 'object' \
                        AND pg_catalog.octet_length($1::pg_catalog.text) OPERATOR(pg_catalog.<=) $2",
                    Some(1),
                    &[asked.metadata.into(), (limits::MAX_METADATA_BYTES as i32).into()],
                )
                .and_then(|t| t.first().get_one()));
            if ok != Some(true) {
                invalid(format!("metadata must be a JSON object of at most {} bytes", limits::MAX_METADATA_BYTES));
            }
        }
        // FOR SHARE: unregister_prefix waits for us (and then revokes this child too).
        let registered = spi(client.update(
            "SELECT 1 FROM token.prefixes WHERE prefix OPERATOR(pg_catalog.=) $1 \
             AND key_type OPERATOR(pg_catalog.=) $2 AND environment OPERATOR(pg_catalog.=) $3 FOR SHARE",
            Some(1),
            &[prefix.as_str().into(), key_type.as_str().into(), environment.as_str().into()],
        ));
        if registered.is_empty() {
            state(&format!("has prefix \"{prefix}\", which is not registered for its key type any more"));
        }
        super::lock_account(client, &account, false);
        let secret = new_secret(&prefix);
        let name = asked.name.or(parent_name);
        let sql = format!(
            "INSERT INTO token.tokens (id, token_hash, hint, prefix, account, key_type, environment, name, scopes, metadata, \
                                       expires_at, family_id, family_issued_at, parent_id, uses_remaining, rate_limits, \
                                       allowed_networks) \
             SELECT u.id, $1, $2, p.prefix, p.account, p.key_type, p.environment, $3, $4, COALESCE($5, p.metadata), $6, \
                    u.id, pg_catalog.now(), p.id, $7, $8, COALESCE({}, p.allowed_networks) \
               FROM (SELECT pg_catalog.gen_random_uuid() AS id) u, token.tokens p WHERE p.id OPERATOR(pg_catalog.=) $10 \
             RETURNING id",
            networks_sql(9)
        );
        let id = spi(client
            .update(
                &sql,
                Some(1),
                &[
                    secret.hash.clone().into(),
                    secret.hint.as_str().into(),
                    name.into(),
                    scopes.into(),
                    asked.metadata.into(),
                    expires_at.into(),
                    asked.uses.into(),
                    rate_limits,
                    inets(networks),
                    parent.into(),
                ],
            )
            .and_then(|t| t.first().get_one::<pgrx::Uuid>()));
        let new = NewToken { id: required(id, "token id"), token: secret.token };
        spi(events::lifecycle(
            client,
            Lifecycle {
                event: "derived",
                token_id: Some(new.id),
                account: Some(&account),
                prefix: Some(&prefix),
                hint: Some(&secret.hint),
                environment: Some(&environment),
                detail: Some(format!("parent={parent} parent_hint={} depth={depth}", parent_hint.unwrap_or_default())),
            },
        ));
        new
    })
}

/// Issues a child of the token with this id: at most its scopes (default: all of them), an
/// expiry no later than its (default: the same), networks within its (default: the same).
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn derive_token(
    parent_id: Option<pgrx::Uuid>,
    name: default!(Option<&str>, "NULL"),
    scopes: default!(Option<Vec<Option<String>>>, "NULL"),
    expires_in: default!(Option<Interval>, "NULL"),
    metadata: default!(Option<RawJsonb>, "NULL"),
    uses: default!(Option<i64>, "NULL"),
    rate_limits: default!(Option<RawRateLimits>, "NULL"),
    allowed_networks: default!(Option<RawInets>, "NULL"),
) -> TableIterator<'static, (name!(token_id, pgrx::Uuid), name!(token, String))> {
    require_writable("derive_token");
    events::require_preload();
    schema::require_current("derive_token");
    let parent = required(parent_id, "parent_id");
    let asked = Asked { name: name.map(str::to_owned), scopes, expires_in, metadata, uses, rate_limits, allowed_networks };
    let new = derive(parent, asked);
    TableIterator::once((new.id, new.token))
}

/// derive_token by presenting the parent token instead of its id (it must validate): how a
/// service hands a narrower key to a task. Granted to token_admin; grant it to the roles that
/// should derive their own.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn derive_own_token(
    token: Option<&str>,
    name: default!(Option<&str>, "NULL"),
    scopes: default!(Option<Vec<Option<String>>>, "NULL"),
    expires_in: default!(Option<Interval>, "NULL"),
    metadata: default!(Option<RawJsonb>, "NULL"),
    uses: default!(Option<i64>, "NULL"),
    rate_limits: default!(Option<RawRateLimits>, "NULL"),
    allowed_networks: default!(Option<RawInets>, "NULL"),
) -> TableIterator<'static, (name!(token_id, pgrx::Uuid), name!(token, String))> {
    require_writable("derive_own_token");
    schema::require_current("derive_own_token");
    let req = Request { token: token.map(str::as_bytes), caller: None, required_scope: None };
    let judged = match validation::judge_with(req, Origin::Connection, Purpose::Manage, |_| None) {
        Ok(j) => j,
        Err(r) => crate::error::refuse(&r.refusal),
    };
    let asked = Asked { name: name.map(str::to_owned), scopes, expires_in, metadata, uses, rate_limits, allowed_networks };
    let new = derive(pgrx::Uuid::from_bytes(judged.token.state.id), asked);
    TableIterator::once((new.id, new.token))
}
