//! `generate_token`: a new token for an account, under a key type's rules, in this database's
//! environment.

use pgrx::datum::{Interval, JsonB};
use pgrx::prelude::*;

use super::{check_account, check_scopes, database_environment, fail, insert_token, invalid, required, require_writable, spi};
use super::{MAX_METADATA_BYTES};
use crate::error::Kind;
use crate::events::{self, Lifecycle};
use pg_token_core::format;

/// Issues a token for `account` under `key_type`, in this database's environment. Returns its
/// id and the token itself; the token is shown this once and can never be read again.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn generate_token(
    account: Option<&str>,
    key_type: Option<&str>,
    name: default!(Option<&str>, "NULL"),
    scopes: default!(Option<Vec<Option<String>>>, "'{}'"),
    expires_in: default!(Option<Interval>, "NULL"),
    metadata: default!(Option<JsonB>, "'{}'"),
    prefix: default!(Option<&str>, "NULL"),
) -> TableIterator<'static, (name!(token_id, pgrx::Uuid), name!(token, String))> {
    require_writable("generate_token");
    events::require_preload();
    let account = required(account, "account");
    let key_type = required(key_type, "key_type");
    check_account(account);
    let scopes = check_scopes(&scopes.unwrap_or_default());
    let metadata = metadata.unwrap_or(JsonB(serde_json::json!({})));
    if !metadata.0.is_object() {
        invalid("metadata must be a JSON object");
    }
    if serde_json::to_string(&metadata.0).map_or(usize::MAX, |s| s.len()) > MAX_METADATA_BYTES {
        invalid(format!("metadata must be at most {MAX_METADATA_BYTES} bytes"));
    }
    if let Some(n) = name {
        if n.chars().count() > 200 {
            invalid("name must be at most 200 characters");
        }
    }
    let env = database_environment();

    let issued = Spi::connect_mut(|client| {
        // The key type: TTL rules and allowed scopes.
        let kt = spi(client.select(
            "SELECT COALESCE($2, kt.default_ttl, kt.max_ttl), \
                    ($2 IS NOT NULL AND kt.max_ttl IS NOT NULL AND $2 OPERATOR(pg_catalog.>) kt.max_ttl), \
                    ($2 IS NOT NULL AND $2 OPERATOR(pg_catalog.<=) '0'::pg_catalog.interval), \
                    kt.allowed_scopes \
             FROM token.key_types kt WHERE kt.name OPERATOR(pg_catalog.=) $1",
            Some(1),
            &[key_type.into(), expires_in.into()],
        ));
        if kt.is_empty() {
            fail(Kind::UndefinedObject, format!("key type \"{key_type}\" does not exist"), None);
        }
        let row = kt.first();
        let lifetime: Option<Interval> = spi(row.get(1));
        if spi(row.get::<bool>(2)).unwrap_or(false) {
            invalid(format!("expires_in exceeds the maximum TTL of key type \"{key_type}\""));
        }
        if spi(row.get::<bool>(3)).unwrap_or(false) {
            invalid("expires_in must be positive");
        }
        if let Some(allowed) = spi(row.get::<Vec<Option<String>>>(4)) {
            if let Some(bad) = scopes.iter().find(|s| !allowed.iter().any(|a| a.as_deref() == Some(s.as_str()))) {
                invalid(format!("scope \"{bad}\" is not allowed for key type \"{key_type}\""));
            }
        }

        // The prefix: given, or the one registered for this key type in this environment.
        let chosen = match prefix {
            Some(p) => {
                let ok = spi(client.select(
                    "SELECT 1 FROM token.prefixes WHERE prefix OPERATOR(pg_catalog.=) $1 \
                     AND key_type OPERATOR(pg_catalog.=) $2 AND environment OPERATOR(pg_catalog.=) $3",
                    Some(1),
                    &[p.into(), key_type.into(), env.as_str().into()],
                ));
                if ok.is_empty() {
                    fail(Kind::UndefinedObject, format!("prefix \"{p}\" is not registered for key type \"{key_type}\" in environment \"{env}\""),
                        None,
                    );
                }
                p.to_owned()
            }
            None => {
                let found = spi(client.select(
                    "SELECT prefix FROM token.prefixes WHERE key_type OPERATOR(pg_catalog.=) $1 \
                     AND environment OPERATOR(pg_catalog.=) $2 ORDER BY prefix",
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

        let new = insert_token(client, &chosen, account, key_type, &env, name, scopes, metadata, lifetime, None);
        let hint = format::split(&new.token).map(|p| p.hint()).ok();
        spi(events::lifecycle(
            client,
            Lifecycle {
                event: "generated",
                token_id: Some(new.id),
                account: Some(account),
                prefix: Some(&chosen),
                hint: hint.as_deref(),
                environment: Some(&env),
                detail: Some(format!("key_type={key_type}")),
            },
        ));
        new
    });
    TableIterator::once((issued.id, issued.token))
}

