//! The registry: key types (what a kind of key may do: validate other kinds, TTL bounds,
//! allowed scopes) and prefixes (which key type and environment a token's prefix names).
//! Changes here empty every backend's cache through the triggers in `sql/finalize.sql`.
//!
//! A new key-type option (rate limits, bound networks, reuse detection) is a column of
//! `token.key_types`, an argument of `create_key_type`, and a field the verdict rules read
//! (`pg_token_core::verdict::KeyTypeInfo`, loaded by `store`).

use pg_token_core::format;
use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::error::{fail, invalid, require_writable, required, spi, Kind};
use crate::events::{self, Lifecycle};
use crate::lifecycle::check_scopes;

fn check_environment_name(env: &str) {
    let ok = (1..=32).contains(&env.len())
        && env.as_bytes()[0].is_ascii_lowercase()
        && env.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        invalid(format!("invalid environment name \"{}\"", env.chars().take(40).collect::<String>()));
    }
}


/// Creates a key type (or, with replace => true, replaces its definition).
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn create_key_type(
    name: Option<&str>,
    description: default!(Option<&str>, "NULL"),
    can_validate: default!(Option<Vec<Option<String>>>, "'{}'"),
    default_ttl: default!(Option<Interval>, "NULL"),
    max_ttl: default!(Option<Interval>, "NULL"),
    allowed_scopes: default!(Option<Vec<Option<String>>>, "NULL"),
    replace: default!(bool, false),
) {
    require_writable("create_key_type");
    let name = required(name, "name");
    let ok_name = (1..=63).contains(&name.len())
        && name.as_bytes()[0].is_ascii_lowercase()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok_name {
        invalid("invalid key type name: use 1 to 63 characters of a-z, 0-9 and _, starting with a letter");
    }
    let can_validate: Vec<String> = can_validate.unwrap_or_default().into_iter().map(|c| required(c, "can_validate element")).collect();
    let allowed_scopes = allowed_scopes.map(|s| check_scopes(&s));
    for ttl in [&default_ttl, &max_ttl].into_iter().flatten() {
        if ttl.is_negative() || ttl.as_micros() == 0 {
            invalid("TTLs must be positive");
        }
    }
    Spi::connect_mut(|client| {
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
            fail(Kind::UndefinedObject, format!("can_validate names unknown key types: {}", list.join(", ")), None);
        }
        if let (Some(d), Some(m)) = (default_ttl, max_ttl) {
            let longer: Option<bool> = spi(client
                .select("SELECT $1::pg_catalog.interval OPERATOR(pg_catalog.>) $2::pg_catalog.interval", Some(1), &[d.into(), m.into()])
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
        let result = client.update(
            "INSERT INTO token.key_types AS k (name, description, can_validate, default_ttl, max_ttl, allowed_scopes) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (name) DO UPDATE SET description = EXCLUDED.description, can_validate = EXCLUDED.can_validate, \
                 default_ttl = EXCLUDED.default_ttl, max_ttl = EXCLUDED.max_ttl, allowed_scopes = EXCLUDED.allowed_scopes",
            None,
            &[name.into(), description.into(), can_validate.into(), default_ttl.into(), max_ttl.into(), allowed_scopes.into()],
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
    let prefix = required(prefix, "prefix");
    let key_type = required(key_type, "key_type");
    let environment = required(environment, "environment");
    if let Err(e) = format::validate_prefix(prefix) {
        invalid(format!("invalid prefix: {e}"));
    }
    check_environment_name(environment);
    Spi::connect_mut(|client| {
        // Serialize registrations so that two overlapping prefixes cannot both get in.
        spi(client.update("LOCK TABLE token.prefixes IN SHARE ROW EXCLUSIVE MODE", None, &[]));
        let kt = spi(client.select("SELECT 1 FROM token.key_types WHERE name OPERATOR(pg_catalog.=) $1", Some(1), &[key_type.into()]));
        if kt.is_empty() {
            fail(Kind::UndefinedObject, format!("key type \"{key_type}\" does not exist"), None);
        }
        let clash: Option<String> = spi(client
            .select(
                "SELECT prefix FROM token.prefixes \
                 WHERE pg_catalog.starts_with(prefix, $1) OR pg_catalog.starts_with($1, prefix) LIMIT 1",
                Some(1),
                &[prefix.into()],
            )
            .and_then(|t| if t.is_empty() { Ok(None) } else { t.first().get_one() }));
        match clash {
            Some(c) if c == prefix => {
                fail(Kind::DuplicateObject, format!("prefix \"{prefix}\" is already registered"), None)
            }
            Some(c) => invalid(format!("prefix \"{prefix}\" overlaps registered prefix \"{c}\"; no prefix may start another")),
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

/// Unregisters a prefix: every token carrying it is refused (unknown_prefix) from the next call.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn unregister_prefix(prefix: Option<&str>) -> bool {
    require_writable("unregister_prefix");
    let prefix = required(prefix, "prefix");
    Spi::connect_mut(|client| {
        let gone = spi(client.update(
            "DELETE FROM token.prefixes WHERE prefix OPERATOR(pg_catalog.=) $1 RETURNING environment",
            None,
            &[prefix.into()],
        ));
        if gone.is_empty() {
            return false;
        }
        let environment: Option<String> = spi(gone.first().get_one());
        spi(events::lifecycle(
            client,
            Lifecycle {
                event: "prefix_unregistered",
                token_id: None,
                account: None,
                prefix: Some(prefix),
                hint: None,
                environment: environment.as_deref(),
                detail: None,
            },
        ));
        true
    })
}

