//! The registry: key types (what a kind of key may do: validate other kinds, TTL bounds,
//! allowed scopes) and prefixes (which key type and environment a token's prefix names).
//! Changes here empty every backend's cache through the triggers in `sql/finalize.sql`.
//!
//! A new key-type option (rate limits, bound networks, reuse detection) is a column of
//! `token.key_types`, an argument of `create_key_type`, and a field the verdict rules read
//! (`pg_token_core::verdict::KeyTypeInfo`, loaded by `store`).

use pg_token_core::{format, limits};
use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::error::{fail, invalid, require_writable, required, spi, Error, Kind};
use crate::events::{self, Lifecycle};
use crate::datum::{RawInets, RawRateLimits};
use crate::lifecycle::{check_networks, check_rate_limits, check_scopes, check_text, inets, networks_sql};
use crate::schema;
use crate::store;

/// What unregister_prefix writes in revoked_reason, and restore_prefix_tokens looks for.
const UNREGISTERED: &str = "pg_token: prefix unregistered";

fn check_environment_name(env: &str) {
    if let Err(e) = limits::environment_name(env) {
        invalid(e);
    }
}

/// Whether this transaction reads one snapshot throughout (REPEATABLE READ or SERIALIZABLE):
/// then what it read before a lock was granted may be stale, and the registry functions check
/// the latest committed state themselves.
fn uses_transaction_snapshot() -> bool {
    // SAFETY: a plain read of the backend's isolation level.
    unsafe { pgrx::pg_sys::XactIsoLevel >= pgrx::pg_sys::XACT_REPEATABLE_READ as i32 }
}

/// 0.1.0's `create_key_type` (its SQL calls this symbol until ALTER EXTENSION pg_token
/// UPDATE, and refuses to write before that): the same, without the 0.2.0 options.
#[allow(clippy::too_many_arguments)]
#[pg_extern(sql = false, volatile, parallel_unsafe, security_definer)]
fn create_key_type(
    name: Option<&str>,
    description: default!(Option<&str>, "NULL"),
    can_validate: default!(Option<Vec<Option<String>>>, "'{}'"),
    default_ttl: default!(Option<Interval>, "NULL"),
    max_ttl: default!(Option<Interval>, "NULL"),
    allowed_scopes: default!(Option<Vec<Option<String>>>, "NULL"),
    replace: default!(Option<bool>, false),
) {
    create_key_type_v2(name, description, can_validate, default_ttl, max_ttl, allowed_scopes, replace, None, None, Some(false), Some(false));
}

/// Creates a key type (or, with replace => true, replaces its definition). Its tokens inherit
/// `allowed_networks` and `rate_limits` unless they carry their own; `conceal_cross_account`
/// makes a caller token of another account see `not_found` instead of `cross_account`;
/// `reuse_detection` makes a rotated-away token presented after its grace window revoke its
/// whole rotation family (`family_revoked`).
#[allow(clippy::too_many_arguments)]
#[pg_extern(name = "create_key_type", volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn create_key_type_v2(
    name: Option<&str>,
    description: default!(Option<&str>, "NULL"),
    can_validate: default!(Option<Vec<Option<String>>>, "'{}'"),
    default_ttl: default!(Option<Interval>, "NULL"),
    max_ttl: default!(Option<Interval>, "NULL"),
    allowed_scopes: default!(Option<Vec<Option<String>>>, "NULL"),
    replace: default!(Option<bool>, false),
    allowed_networks: default!(Option<RawInets>, "NULL"),
    rate_limits: default!(Option<RawRateLimits>, "NULL"),
    conceal_cross_account: default!(Option<bool>, false),
    reuse_detection: default!(Option<bool>, false),
) {
    require_writable("create_key_type");
    schema::require_current("create_key_type");
    let name = required(name, "name");
    // Option, not bool: pgrx answers a NULL for a bool argument with an internal error (XX000).
    let replace = required(replace, "replace");
    let conceal_cross_account = required(conceal_cross_account, "conceal_cross_account");
    let reuse_detection = required(reuse_detection, "reuse_detection");
    if let Err(e) = limits::key_type_name(name) {
        invalid(e);
    }
    check_text("description", description, limits::MAX_DESCRIPTION_CHARS);
    let given: Vec<Option<String>> = can_validate.unwrap_or_default();
    let can_validate = limits::key_type_list(&given.iter().map(Option::as_deref).collect::<Vec<_>>()).unwrap_or_else(|e| invalid(e));
    let allowed_scopes = allowed_scopes.map(|s| check_scopes(&s));
    for ttl in [&default_ttl, &max_ttl].into_iter().flatten() {
        if ttl.is_negative() || ttl.as_micros() == 0 {
            invalid("TTLs must be positive");
        }
    }
    Spi::connect_mut(|client| {
        let rate_limits = check_rate_limits(client, rate_limits);
        let networks = check_networks(client, allowed_networks);
        let unknown: Option<Vec<Option<String>>> = spi(client
            .select(
                "SELECT pg_catalog.array_agg(c) FROM pg_catalog.unnest($1::pg_catalog.text[]) AS c \
                 WHERE c OPERATOR(pg_catalog.<>) $2 \
                   AND NOT EXISTS (SELECT 1 FROM token.key_types k WHERE k.name OPERATOR(pg_catalog.=) c)",
                Some(1),
                &[can_validate.clone().into(), name.into()],
            )
            .and_then(|t| t.first().get_one()));
        if let Some(unknown) = unknown {
            let list: Vec<String> = unknown.into_iter().flatten().collect();
            fail(
                Kind::UndefinedObject,
                format!("can_validate names unknown key types: {}", limits::quoted(&list.join(", "))),
                Some("Create those key types first (a key type may name itself), or check the spelling against token.key_types."),
            );
        }
        if let (Some(d), Some(m)) = (default_ttl, max_ttl) {
            let longer: Option<bool> = spi(client
                .select(
                    // Real timestamps: '3 months' against '90 days' from now, not 30-day months.
                    "SELECT (pg_catalog.now() OPERATOR(pg_catalog.+) $1::pg_catalog.interval) OPERATOR(pg_catalog.>) \
                            (pg_catalog.now() OPERATOR(pg_catalog.+) $2::pg_catalog.interval)",
                    Some(1),
                    &[d.into(), m.into()],
                )
                .and_then(|t| t.first().get_one()));
            if longer == Some(true) {
                invalid("invalid key type definition: default_ttl must not exceed max_ttl");
            }
        }
        let exists = !spi(client.update(
            "SELECT 1 FROM token.key_types WHERE name OPERATOR(pg_catalog.=) $1 FOR UPDATE",
            Some(1),
            &[name.into()],
        ))
        .is_empty();
        if exists && !replace {
            fail(Kind::DuplicateObject, format!("key type \"{name}\" already exists"),
                Some("Pass replace => true to redefine it."),
            );
        }
        let sql = format!(
            "INSERT INTO token.key_types AS k (name, description, can_validate, default_ttl, max_ttl, allowed_scopes, \
                                               allowed_networks, rate_limits, conceal_cross_account, reuse_detection) \
             VALUES ($1, $2, $3, $4, $5, $6, {}, $8, $9, $10) \
             ON CONFLICT (name) DO UPDATE SET description = EXCLUDED.description, can_validate = EXCLUDED.can_validate, \
                 default_ttl = EXCLUDED.default_ttl, max_ttl = EXCLUDED.max_ttl, allowed_scopes = EXCLUDED.allowed_scopes, \
                 allowed_networks = EXCLUDED.allowed_networks, rate_limits = EXCLUDED.rate_limits, \
                 conceal_cross_account = EXCLUDED.conceal_cross_account, reuse_detection = EXCLUDED.reuse_detection",
            networks_sql(7)
        );
        let result = client.update(
            &sql,
            None,
            &[
                name.into(),
                description.into(),
                can_validate.into(),
                default_ttl.into(),
                max_ttl.into(),
                allowed_scopes.into(),
                inets(networks),
                rate_limits,
                conceal_cross_account.into(),
                reuse_detection.into(),
            ],
        );
        if let Err(e) = result {
            invalid(format!("invalid key type definition: {e}"));
        }
        spi(events::lifecycle(
            client,
            Lifecycle {
                event: if exists { "key_type_replaced" } else { "key_type_created" },
                token_id: None,
                account: None,
                prefix: None,
                hint: None,
                environment: None,
                detail: Some(format!("key_type={name}")),
            },
        ));
    });
}

/// Registers a prefix for a key type in an environment. No registered prefix may be a prefix
/// of another, so a token's prefix is never ambiguous.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn register_prefix(prefix: Option<&str>, key_type: Option<&str>, environment: Option<&str>) {
    require_writable("register_prefix");
    schema::require_current("register_prefix");
    let prefix = required(prefix, "prefix");
    let key_type = required(key_type, "key_type");
    let environment = required(environment, "environment");
    if let Err(e) = format::validate_prefix(prefix) {
        invalid(format!("invalid prefix \"{}\": {e}", limits::quoted(prefix)));
    }
    check_environment_name(environment);
    Spi::connect_mut(|client| {
        // Serialize registrations so that two overlapping prefixes cannot both get in.
        spi(client.update("LOCK TABLE token.prefixes IN SHARE ROW EXCLUSIVE MODE", None, &[]));
        let kt = spi(client.select("SELECT 1 FROM token.key_types WHERE name OPERATOR(pg_catalog.=) $1", Some(1), &[key_type.into()]));
        if kt.is_empty() {
            crate::error::unknown_key_type(key_type);
        }
        // The lock above is granted only once every registration before ours has committed; a
        // READ COMMITTED statement from here sees them all, but a REPEATABLE READ snapshot may
        // be older, so the overlap check reads the latest committed registry itself.
        let registered = store::registered_prefixes();
        let clash = registered.into_iter().find(|r| r.starts_with(prefix) || prefix.starts_with(r.as_str()));
        match clash {
            Some(c) if c == prefix => {
                fail(Kind::DuplicateObject, format!("prefix \"{prefix}\" is already registered"), None)
            }
            Some(c) => fail(
                Kind::InvalidValue,
                format!("prefix \"{prefix}\" overlaps registered prefix \"{c}\"; no prefix may start another"),
                Some("A token's prefix must name one key type: pick one that neither starts nor is started by a registered prefix (e.g. 'acme_live_' beside 'acme_test_', not 'acme_' beside 'acme_live_')."),
            ),
            None => {}
        }
        spi(client.update(
            "INSERT INTO token.prefixes (prefix, key_type, environment) VALUES ($1, $2, $3)",
            None,
            &[prefix.into(), key_type.into(), environment.into()],
        ));
        spi(events::lifecycle(
            client,
            Lifecycle {
                event: "prefix_registered",
                token_id: None,
                account: None,
                prefix: Some(prefix),
                hint: None,
                environment: Some(environment),
                detail: Some(format!("key_type={key_type}")),
            },
        ));
    });
}

/// Unregisters a prefix. Final for the tokens that carried it: they are revoked (reason
/// "pg_token: prefix unregistered") in the same transaction, so registering the prefix again,
/// for this key type or another, brings none back. restore_prefix_tokens undoes that on
/// purpose. Until then they are refused as unknown_prefix, and as revoked once the prefix is
/// registered again.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn unregister_prefix(prefix: Option<&str>) -> bool {
    require_writable("unregister_prefix");
    schema::require_current("unregister_prefix");
    let prefix = required(prefix, "prefix");
    Spi::connect_mut(|client| {
        // Deleting the row waits for every generate_token and rotation holding it (they lock
        // it FOR SHARE while they issue), so the UPDATE below sees their tokens.
        let gone = spi(client.update(
            "DELETE FROM token.prefixes WHERE prefix OPERATOR(pg_catalog.=) $1 RETURNING environment",
            None,
            &[prefix.into()],
        ));
        if gone.is_empty() {
            return false;
        }
        let environment: Option<String> = spi(gone.first().get_one());
        let revoked: Option<i64> = spi(client
            .update(
                "WITH r AS (UPDATE token.tokens SET revoked_at = pg_catalog.clock_timestamp(), revoked_reason = $2 \
                            WHERE prefix OPERATOR(pg_catalog.=) $1 AND revoked_at IS NULL RETURNING 1) \
                 SELECT pg_catalog.count(*) FROM r",
                Some(1),
                &[prefix.into(), UNREGISTERED.into()],
            )
            .and_then(|t| t.first().get_one()));
        if uses_transaction_snapshot() && store::live_tokens_with_prefix(prefix) > 0 {
            Error::new(
                Kind::SerializationFailure,
                format!("a token with prefix \"{prefix}\" was issued concurrently; the prefix was not unregistered"),
            )
            .hint("Retry the transaction (or run unregister_prefix in a READ COMMITTED one).")
            .raise();
        }
        spi(events::lifecycle(
            client,
            Lifecycle {
                event: "prefix_unregistered",
                token_id: None,
                account: None,
                prefix: Some(prefix),
                hint: None,
                environment: environment.as_deref(),
                detail: Some(format!("revoked={}", revoked.unwrap_or(0))),
            },
        ));
        true
    })
}

/// Brings back the tokens unregister_prefix revoked for this prefix, if the prefix is
/// registered again for the key type and environment they were issued under (tokens of any
/// other key type or environment stay revoked). Tokens revoked for any other reason are not
/// touched. Returns how many were restored.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn restore_prefix_tokens(prefix: Option<&str>) -> i64 {
    require_writable("restore_prefix_tokens");
    schema::require_current("restore_prefix_tokens");
    let prefix = required(prefix, "prefix");
    Spi::connect_mut(|client| {
        let registration = spi(client.update(
            "SELECT key_type, environment FROM token.prefixes WHERE prefix OPERATOR(pg_catalog.=) $1 FOR SHARE",
            Some(1),
            &[prefix.into()],
        ));
        if registration.is_empty() {
            fail(
                Kind::UndefinedObject,
                format!("prefix \"{}\" is not registered", limits::quoted(prefix)),
                Some("Register it again for the key type and environment its tokens were issued under first."),
            );
        }
        let (key_type, environment) = spi(registration.first().get_two::<String, String>());
        let restored: Option<i64> = spi(client
            .update(
                "WITH r AS (UPDATE token.tokens SET revoked_at = NULL, revoked_reason = NULL \
                            WHERE prefix OPERATOR(pg_catalog.=) $1 AND revoked_reason OPERATOR(pg_catalog.=) $2 \
                              AND key_type OPERATOR(pg_catalog.=) $3 AND environment OPERATOR(pg_catalog.=) $4 \
                            RETURNING 1) \
                 SELECT pg_catalog.count(*) FROM r",
                Some(1),
                &[prefix.into(), UNREGISTERED.into(), key_type.clone().into(), environment.clone().into()],
            )
            .and_then(|t| t.first().get_one()));
        let restored = restored.unwrap_or(0);
        spi(events::lifecycle(
            client,
            Lifecycle {
                event: "prefix_tokens_restored",
                token_id: None,
                account: None,
                prefix: Some(prefix),
                hint: None,
                environment: environment.as_deref(),
                detail: Some(format!("key_type={} restored={restored}", key_type.unwrap_or_default())),
            },
        ));
        restored
    })
}
