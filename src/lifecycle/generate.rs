//! `generate_token`: a new token for an account, under a key type's rules, in this database's
//! environment. The token starts a rotation family of its own (`family_id` = its id).

use std::sync::OnceLock;

use pg_token_core::limits;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;

use super::options::{check_networks, check_rate_limits, check_uses, inets, networks_sql};
use super::{
    check_account, check_scopes, check_text, database_environment, fail, invalid, lock_account, new_secret, required,
    require_writable, spi, NewToken,
};
use crate::datum::{RawJsonb, RawInets, RawRateLimits};
use crate::error::Kind;
use crate::events::{self, Lifecycle};
use crate::prepared;
use crate::schema;

/// Issues a token for `account` under `key_type`, in this database's environment. Returns its
/// id and the token itself; the token is shown this once and can never be read again. A usage
/// cap (`uses`, optionally refilled), rate limits and bound networks are optional.
#[allow(clippy::too_many_arguments)]
#[pg_extern(name = "generate_token", volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn generate_token_v2(
    account: Option<&str>,
    key_type: Option<&str>,
    name: default!(Option<&str>, "NULL"),
    scopes: default!(Option<Vec<Option<String>>>, "'{}'"),
    expires_in: default!(Option<Interval>, "NULL"),
    metadata: default!(Option<RawJsonb>, "'{}'"),
    prefix: default!(Option<&str>, "NULL"),
    uses: default!(Option<i64>, "NULL"),
    refill_uses: default!(Option<i64>, "NULL"),
    refill_interval: default!(Option<Interval>, "NULL"),
    rate_limits: default!(Option<RawRateLimits>, "NULL"),
    allowed_networks: default!(Option<RawInets>, "NULL"),
) -> TableIterator<'static, (name!(token_id, pgrx::Uuid), name!(token, String))> {
    require_writable("generate_token");
    events::require_preload();
    schema::require_current("generate_token");
    let account = check_account(required(account, "account"));
    let key_type = required(key_type, "key_type");
    let scopes = check_scopes(&scopes.unwrap_or_default());
    check_text("name", name, limits::MAX_TOKEN_NAME_CHARS);
    check_uses(uses, refill_uses, refill_interval);
    let env = database_environment();

    let issued = Spi::connect_mut(|client| {
        let rate_limits = check_rate_limits(client, rate_limits);
        let networks = check_networks(client, allowed_networks);
        // The document as the caller gave it (pgrx's JsonB would round numbers through f64).
        let (is_object, bytes) = spi(prepared::run(
            client,
            "SELECT pg_catalog.jsonb_typeof($1) OPERATOR(pg_catalog.=) 'object', \
                    pg_catalog.octet_length($1::pg_catalog.text)",
            Some(1),
            &[metadata.into()],
        )
        .and_then(|t| t.first().get_two::<bool, i32>()));
        if metadata.is_some() && is_object != Some(true) {
            invalid("metadata must be a JSON object");
        }
        if bytes.unwrap_or(0) as usize > limits::MAX_METADATA_BYTES {
            invalid(format!("metadata must be at most {} bytes", limits::MAX_METADATA_BYTES));
        }

        // The key type: TTL rules (on real timestamps: '3 months' from today is compared with
        // '90 days' from today, not as intervals where a month is 30 days) and allowed scopes.
        let kt = spi(prepared::run(
            client,
            "SELECT CASE WHEN $2::pg_catalog.interval IS NOT NULL \
                         THEN pg_catalog.now() OPERATOR(pg_catalog.+) $2 \
                         ELSE pg_catalog.now() OPERATOR(pg_catalog.+) COALESCE(kt.default_ttl, kt.max_ttl) END, \
                    ($2 IS NOT NULL AND kt.max_ttl IS NOT NULL AND \
                     (pg_catalog.now() OPERATOR(pg_catalog.+) $2) OPERATOR(pg_catalog.>) \
                     (pg_catalog.now() OPERATOR(pg_catalog.+) kt.max_ttl)), \
                    ($2 IS NOT NULL AND \
                     (pg_catalog.now() OPERATOR(pg_catalog.+) $2) OPERATOR(pg_catalog.<=) pg_catalog.now()), \
                    kt.allowed_scopes \
             FROM token.key_types kt WHERE kt.name OPERATOR(pg_catalog.=) $1",
            Some(1),
            &[key_type.into(), expires_in.into()],
        ));
        if kt.is_empty() {
            crate::error::unknown_key_type(key_type);
        }
        let row = kt.first();
        let expires_at: Option<TimestampWithTimeZone> = spi(row.get(1));
        if spi(row.get::<bool>(2)).unwrap_or(false) {
            invalid(format!("expires_in exceeds the maximum TTL of key type \"{key_type}\""));
        }
        if spi(row.get::<bool>(3)).unwrap_or(false) {
            invalid("expires_in must be positive");
        }
        if let Some(allowed) = spi(row.get::<Vec<Option<String>>>(4)) {
            if let Some(bad) = scopes.iter().find(|s| !allowed.iter().any(|a| a.as_deref() == Some(s.as_str()))) {
                invalid(format!("scope \"{}\" is not allowed for key type \"{key_type}\"", limits::quoted(bad)));
            }
        }

        // The prefix: given, or the one registered for this key type in this environment.
        let chosen = match prefix {
            Some(p) => {
                // FOR SHARE: unregister_prefix waits for us (and then revokes this token too).
                let ok = spi(prepared::run(
                    client,
                    "SELECT 1 FROM token.prefixes WHERE prefix OPERATOR(pg_catalog.=) $1 \
                     AND key_type OPERATOR(pg_catalog.=) $2 AND environment OPERATOR(pg_catalog.=) $3 FOR SHARE",
                    Some(1),
                    &[p.into(), key_type.into(), env.as_str().into()],
                ));
                if ok.is_empty() {
                    fail(
                        Kind::UndefinedObject,
                        format!(
                            "prefix \"{}\" is not registered for key type \"{key_type}\" in environment \"{env}\"",
                            limits::quoted(p)
                        ),
                        None,
                    );
                }
                p.to_owned()
            }
            None => {
                let found = spi(prepared::run(
                    client,
                    "SELECT prefix FROM token.prefixes WHERE key_type OPERATOR(pg_catalog.=) $1 \
                     AND environment OPERATOR(pg_catalog.=) $2 ORDER BY prefix FOR SHARE",
                    None,
                    &[key_type.into(), env.as_str().into()],
                ));
                let mut all = Vec::new();
                for r in found {
                    if let Some(p) = spi(r.get::<String>(1)) {
                        all.push(p);
                    }
                }
                match all.len() {
                    1 => all.remove(0),
                    0 => fail(Kind::UndefinedObject, format!("no prefix is registered for key type \"{key_type}\" in environment \"{env}\""),
                        Some("Register one with token.register_prefix(prefix, key_type, environment)."),
                    ),
                    _ => invalid(format!(
                        "key type \"{key_type}\" has several prefixes in environment \"{env}\" ({}); pass prefix => ...",
                        all.join(", ")
                    )),
                }
            }
        };

        // No token of this account is issued while revoke_account_tokens runs (it waits for
        // us, then revokes this one too).
        lock_account(client, &account, false);
        let secret = new_secret(&chosen);
        static INSERT: OnceLock<String> = OnceLock::new();
        let sql = INSERT.get_or_init(|| format!(
            "INSERT INTO token.tokens (id, token_hash, hint, prefix, account, key_type, environment, name, \
                                       scopes, metadata, expires_at, family_id, family_issued_at, \
                                       uses_remaining, refill_uses, refill_interval, refilled_at, rate_limits, \
                                       allowed_networks) \
             SELECT u.id, $1, $2, $3, $4, $5, $6, $7, $8, COALESCE($9, '{{}}'::pg_catalog.jsonb), $10, u.id, \
                    pg_catalog.now(), $11, $12, $13, CASE WHEN $12 IS NOT NULL THEN pg_catalog.now() END, $14, {} \
               FROM (SELECT pg_catalog.gen_random_uuid() AS id) u \
             RETURNING id",
            networks_sql(15)
        ));
        let id = spi(prepared::run(
            client,
            sql,
            Some(1),
            &[
                secret.hash.clone().into(),
                secret.hint.as_str().into(),
                chosen.as_str().into(),
                account.as_str().into(),
                key_type.into(),
                env.as_str().into(),
                name.into(),
                scopes.into(),
                metadata.into(),
                expires_at.into(),
                uses.into(),
                refill_uses.into(),
                refill_interval.into(),
                rate_limits,
                inets(networks),
            ],
        )
        .and_then(|t| t.first().get_one::<pgrx::Uuid>()));
        let new = NewToken { id: required(id, "token id"), token: secret.token };
        let hint = Some(secret.hint);
        spi(events::lifecycle(
            client,
            Lifecycle {
                event: "generated",
                token_id: Some(new.id),
                account: Some(&account),
                prefix: Some(&chosen),
                hint: hint.as_deref(),
                environment: Some(&env),
                detail: Some(format!("key_type={key_type}{}", uses.map(|u| format!(" uses={u}")).unwrap_or_default())),
            },
        ));
        new
    });
    TableIterator::once((issued.id, issued.token))
}

/// 0.1.0's `generate_token` (its SQL calls this symbol until ALTER EXTENSION pg_token UPDATE,
/// and refuses to write before that): the same, without the 0.2.0 options.
#[allow(clippy::too_many_arguments)]
#[pg_extern(sql = false, volatile, parallel_unsafe, security_definer)]
fn generate_token(
    account: Option<&str>,
    key_type: Option<&str>,
    name: default!(Option<&str>, "NULL"),
    scopes: default!(Option<Vec<Option<String>>>, "'{}'"),
    expires_in: default!(Option<Interval>, "NULL"),
    metadata: default!(Option<RawJsonb>, "'{}'"),
    prefix: default!(Option<&str>, "NULL"),
) -> TableIterator<'static, (name!(token_id, pgrx::Uuid), name!(token, String))> {
    generate_token_v2(account, key_type, name, scopes, expires_in, metadata, prefix, None, None, None, None, None)
}

