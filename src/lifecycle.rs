//! Issuing and retiring tokens, and the registry they live in: key types, prefixes, generate,
//! rotate, revoke; plus event housekeeping.
//!
//! These functions are SECURITY DEFINER with `search_path = pg_catalog, pg_temp` and run only
//! for token_admin (EXECUTE is revoked from PUBLIC). Every object in their SQL is
//! schema-qualified, operators included, so a hostile search_path changes nothing.
//!
//! The plaintext token exists only in the row generate/rotate returns: it is never stored,
//! logged, or put in an error message.

use pgrx::datum::{Interval, JsonB};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{PgLogLevel, PgSqlErrorCode};

use crate::events::{self, Lifecycle};
use crate::format;
use crate::guc;
use crate::hash::token_hash;
use crate::queue;
use crate::validate;
use crate::verdict::Request;
use crate::worker;

/// Largest metadata document accepted, serialized (it is cached and returned on every hit).
pub const MAX_METADATA_BYTES: usize = 8192;
pub const MAX_SCOPE_LEN: usize = 64;
pub const MAX_SCOPES: usize = 64;

fn fail(code: PgSqlErrorCode, message: String, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message, "pg_token");
    if let Some(h) = hint {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Refuses a writing function in a read-only transaction or on a hot standby with 25006, the
/// way Postgres refuses INSERT there, before any SPI write could ask for a transaction id
/// (which on a standby fails as an internal error).
fn require_writable(function: &str) {
    // SAFETY: XactReadOnly is a plain backend-local global, set at transaction start (and
    // forced on during recovery); RecoveryInProgress only reads shared state.
    let (read_only, standby) = unsafe { (pg_sys::XactReadOnly, pg_sys::RecoveryInProgress()) };
    if read_only {
        let hint = standby.then_some("This server is a hot standby; run it on the primary.");
        fail(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("cannot execute {function}() in a read-only transaction"),
            hint,
        );
    }
}

fn invalid(message: String) -> ! {
    fail(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message, None)
}

fn required<'a, T>(value: Option<T>, what: &str) -> T {
    match value {
        Some(v) => v,
        None => fail(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, format!("{what} must not be NULL"), None),
    }
}

fn spi<T>(r: Result<T, pgrx::spi::Error>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => fail(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("pg_token: {e}"), None),
    }
}

fn database_environment() -> String {
    match guc::environment() {
        Some(e) => e,
        None => fail(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "token.environment is not set".into(),
            Some("A superuser sets it per cluster (ALTER SYSTEM) or per database (ALTER DATABASE ... SET token.environment = 'prod')."),
        ),
    }
}

fn check_environment_name(env: &str) {
    let ok = (1..=32).contains(&env.len())
        && env.as_bytes()[0].is_ascii_lowercase()
        && env.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        invalid(format!("invalid environment name \"{}\"", env.chars().take(40).collect::<String>()));
    }
}

fn check_scopes(scopes: &[Option<String>]) -> Vec<String> {
    if scopes.len() > MAX_SCOPES {
        invalid(format!("a token may carry at most {MAX_SCOPES} scopes"));
    }
    let mut out = Vec::with_capacity(scopes.len());
    for s in scopes {
        match s {
            None => invalid("scopes must not contain NULL".into()),
            Some(s) if s.is_empty() || s.len() > MAX_SCOPE_LEN || s.chars().any(char::is_control) => {
                invalid(format!("invalid scope: scopes are 1 to {MAX_SCOPE_LEN} characters without control characters"))
            }
            Some(s) => {
                if !out.contains(s) {
                    out.push(s.clone());
                }
            }
        }
    }
    out
}

fn check_account(account: &str) {
    if account.is_empty() || account.chars().count() > 256 || account.chars().any(char::is_control) {
        invalid("invalid account: accounts are 1 to 256 characters without control characters".into());
    }
}

struct NewToken {
    id: pgrx::Uuid,
    token: String,
}

/// Inserts a new token row; the plaintext is returned to the caller and nowhere else.
#[allow(clippy::too_many_arguments)]
fn insert_token(
    client: &mut SpiClient<'_>,
    prefix: &str,
    account: &str,
    key_type: &str,
    environment: &str,
    name: Option<&str>,
    scopes: Vec<String>,
    metadata: JsonB,
    lifetime: Option<Interval>,
    rotated_from: Option<pgrx::Uuid>,
) -> NewToken {
    let token = match format::generate(prefix) {
        Ok(t) => t,
        Err(_) => fail(PgSqlErrorCode::ERRCODE_SYSTEM_ERROR, "could not read from the operating system's random source".into(), None),
    };
    let hint = format::split(&token).map(|p| p.hint()).unwrap_or_else(|_| prefix.to_owned());
    let id = spi(client
        .update(
            "INSERT INTO token.tokens (token_hash, hint, prefix, account, key_type, environment, name, scopes, \
             metadata, expires_at, rotated_from) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
                     pg_catalog.now() OPERATOR(pg_catalog.+) $10, $11) \
             RETURNING id",
            Some(1),
            &[
                token_hash(&token).to_vec().into(),
                hint.as_str().into(),
                prefix.into(),
                account.into(),
                key_type.into(),
                environment.into(),
                name.into(),
                scopes.into(),
                metadata.into(),
                lifetime.into(),
                rotated_from.into(),
            ],
        )
        .and_then(|t| t.first().get_one::<pgrx::Uuid>()));
    let id = required(id, "token id");
    NewToken { id, token }
}

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
    validate::require_preload();
    let account = required(account, "account");
    let key_type = required(key_type, "key_type");
    check_account(account);
    let scopes = check_scopes(&scopes.unwrap_or_default());
    let metadata = metadata.unwrap_or(JsonB(serde_json::json!({})));
    if !metadata.0.is_object() {
        invalid("metadata must be a JSON object".into());
    }
    if serde_json::to_string(&metadata.0).map_or(usize::MAX, |s| s.len()) > MAX_METADATA_BYTES {
        invalid(format!("metadata must be at most {MAX_METADATA_BYTES} bytes"));
    }
    if let Some(n) = name {
        if n.chars().count() > 200 {
            invalid("name must be at most 200 characters".into());
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
            fail(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("key type \"{key_type}\" does not exist"), None);
        }
        let row = kt.first();
        let lifetime: Option<Interval> = spi(row.get(1));
        if spi(row.get::<bool>(2)).unwrap_or(false) {
            invalid(format!("expires_in exceeds the maximum TTL of key type \"{key_type}\""));
        }
        if spi(row.get::<bool>(3)).unwrap_or(false) {
            invalid("expires_in must be positive".into());
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
                    fail(
                        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                        format!("prefix \"{p}\" is not registered for key type \"{key_type}\" in environment \"{env}\""),
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
                    0 => fail(
                        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                        format!("no prefix is registered for key type \"{key_type}\" in environment \"{env}\""),
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

/// Rotates a token: issues a successor with the same account, key type, environment, scopes,
/// name and metadata, and lets the old one live until `now + grace`.
fn rotate(token_id: pgrx::Uuid, grace: Interval) -> NewToken {
    if grace.is_negative() {
        invalid("grace must not be negative".into());
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
            fail(PgSqlErrorCode::ERRCODE_NO_DATA_FOUND, format!("token {token_id} does not exist"), None);
        }
        let r = old.first();
        let account: String = required(spi(r.get(1)), "account");
        let key_type: String = required(spi(r.get(2)), "key_type");
        let environment: String = required(spi(r.get(3)), "environment");
        let prefix: String = required(spi(r.get(4)), "prefix");
        let name: Option<String> = spi(r.get(5));
        let scopes: Vec<String> = spi(r.get(6)).unwrap_or_default();
        let metadata: JsonB = spi(r.get(7)).unwrap_or(JsonB(serde_json::json!({})));
        let state = |s: &str| fail(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("token {token_id} {s}"), None);
        if environment != env {
            state(&format!("belongs to environment \"{environment}\"; this database serves \"{env}\""));
        }
        if spi(r.get::<bool>(8)).unwrap_or(false) {
            state("is revoked");
        }
        if spi(r.get::<bool>(9)).unwrap_or(false) {
            let successor: Option<pgrx::Uuid> = spi(r.get(13));
            let hint = successor.map(|s| format!("Rotate its successor, {s}."));
            fail(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("token {token_id} has already been rotated"),
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
    validate::require_preload();
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
    let judged = validate::judge_or_raise(Request { token: token.map(str::as_bytes), caller: None, required_scope: None });
    let new = rotate(pgrx::Uuid::from_bytes(judged.state.id), required(grace, "grace"));
    TableIterator::once((new.id, new.token))
}

/// Revokes one token, effective for the very next validation in every session. Returns false
/// when it was already revoked.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn revoke_token(token_id: Option<pgrx::Uuid>, reason: default!(Option<&str>, "NULL")) -> bool {
    require_writable("revoke_token");
    let token_id = required(token_id, "token_id");
    Spi::connect_mut(|client| {
        let revoked = spi(client.update(
            "UPDATE token.tokens SET revoked_at = pg_catalog.clock_timestamp(), revoked_reason = $2 \
             WHERE id OPERATOR(pg_catalog.=) $1 AND revoked_at IS NULL \
             RETURNING account, prefix, hint, environment",
            None,
            &[token_id.into(), reason.into()],
        ));
        if revoked.is_empty() {
            let exists = spi(client.select(
                "SELECT 1 FROM token.tokens WHERE id OPERATOR(pg_catalog.=) $1",
                Some(1),
                &[token_id.into()],
            ));
            if exists.is_empty() {
                fail(PgSqlErrorCode::ERRCODE_NO_DATA_FOUND, format!("token {token_id} does not exist"), None);
            }
            return false;
        }
        let r = revoked.first();
        let account: Option<String> = spi(r.get(1));
        let prefix: Option<String> = spi(r.get(2));
        let hint: Option<String> = spi(r.get(3));
        let environment: Option<String> = spi(r.get(4));
        spi(events::lifecycle(
            client,
            Lifecycle {
                event: "revoked",
                token_id: Some(token_id),
                account: account.as_deref(),
                prefix: prefix.as_deref(),
                hint: hint.as_deref(),
                environment: environment.as_deref(),
                detail: reason.map(str::to_owned),
            },
        ));
        true
    })
}

/// Revokes every live token of an account; returns how many. One event per token.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn revoke_account_tokens(account: Option<&str>, reason: default!(Option<&str>, "NULL")) -> i64 {
    require_writable("revoke_account_tokens");
    let account = required(account, "account");
    let who = events::Client::current();
    let count = Spi::connect_mut(|client| {
        let n: Option<i64> = spi(client
            .update(
                "WITH r AS (UPDATE token.tokens SET revoked_at = pg_catalog.clock_timestamp(), revoked_reason = $2 \
                            WHERE account OPERATOR(pg_catalog.=) $1 AND revoked_at IS NULL \
                            RETURNING id, account, prefix, hint, environment), \
                      e AS (INSERT INTO token.events (occurred_at, event, token_id, account, prefix, hint, environment, \
                                                      detail, client_addr, application_name, db_user, backend_pid) \
                            SELECT pg_catalog.clock_timestamp(), 'revoked', r.id, r.account, r.prefix, r.hint, \
                                   r.environment, $2, $3, $4, $5, $6 FROM r RETURNING 1) \
                 SELECT pg_catalog.count(*) FROM e",
                Some(1),
                &[account.into(), reason.into(), who.addr.clone().into(), who.application_name.clone().into(), who.db_user.clone().into(), who.pid.into()],
            )
            .and_then(|t| t.first().get_one()));
        n.unwrap_or(0)
    });
    if guc::LOG_EVENTS.get() && count > 0 {
        ereport!(
            PgLogLevel::LOG_SERVER_ONLY,
            PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
            format!("pg_token: revoked {count} tokens of account={account} user={}", who.db_user.as_deref().unwrap_or("?"))
        );
    }
    count
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
        invalid("invalid key type name: use 1 to 63 characters of a-z, 0-9 and _, starting with a letter".into());
    }
    let can_validate: Vec<String> = can_validate.unwrap_or_default().into_iter().map(|c| required(c, "can_validate element")).collect();
    let allowed_scopes = allowed_scopes.map(|s| check_scopes(&s));
    for ttl in [&default_ttl, &max_ttl].into_iter().flatten() {
        if ttl.is_negative() || ttl.as_micros() == 0 {
            invalid("TTLs must be positive".into());
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
            fail(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("can_validate names unknown key types: {}", list.join(", ")), None);
        }
        if let (Some(d), Some(m)) = (default_ttl, max_ttl) {
            let longer: Option<bool> = spi(client
                .select("SELECT $1::pg_catalog.interval OPERATOR(pg_catalog.>) $2::pg_catalog.interval", Some(1), &[d.into(), m.into()])
                .and_then(|t| t.first().get_one()));
            if longer == Some(true) {
                invalid("invalid key type definition: default_ttl must not exceed max_ttl".into());
            }
        }
        let exists = !spi(client.update(
            "SELECT 1 FROM token.key_types WHERE name OPERATOR(pg_catalog.=) $1 FOR UPDATE",
            Some(1),
            &[name.into()],
        ))
        .is_empty();
        if exists && !replace {
            fail(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                format!("key type \"{name}\" already exists"),
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
            fail(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("key type \"{key_type}\" does not exist"), None);
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
                fail(PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT, format!("prefix \"{prefix}\" is already registered"), None)
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

/// Deletes events older than `older_than` (default: token.event_retention). Returns how many.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn purge_events(older_than: default!(Option<Interval>, "NULL")) -> i64 {
    require_writable("purge_events");
    let keep = match older_than {
        Some(i) if i.is_negative() => invalid("older_than must not be negative".into()),
        Some(i) => i,
        None => match guc::EVENT_RETENTION_S.get() {
            0 => invalid("token.event_retention is 0 (keep forever); pass older_than".into()),
            s => Interval::from_seconds(f64::from(s)),
        },
    };
    Spi::connect_mut(|client| {
        let n: Option<i64> = spi(client
            .update(
                "WITH d AS (DELETE FROM token.events WHERE occurred_at OPERATOR(pg_catalog.<) \
                            (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) $1) RETURNING 1) \
                 SELECT pg_catalog.count(*) FROM d",
                Some(1),
                &[keep.into()],
            )
            .and_then(|t| t.first().get_one()));
        n.unwrap_or(0)
    })
}

/// Waits until every event and last_used_at update queued so far in this database has been
/// written by the background writer. Returns false on timeout.
#[pg_extern(volatile, parallel_unsafe)]
fn flush_events(timeout: default!(Option<Interval>, "'10 seconds'")) -> bool {
    validate::require_preload();
    let timeout = timeout.unwrap_or(Interval::from_seconds(10.0));
    let limit = std::time::Duration::from_micros(u64::try_from(timeout.as_micros()).unwrap_or(0));
    // SAFETY: MyDatabaseId is set in a connected backend.
    let db = unsafe { pg_sys::MyDatabaseId };
    let Some(target) = queue::head(db) else { return true };
    let start = std::time::Instant::now();
    loop {
        if queue::written_up_to(db, target) {
            return true;
        }
        if let Some(slot) = queue::nudge(db) {
            worker::start(slot, db);
        }
        if start.elapsed() >= limit {
            return false;
        }
        // SAFETY: the standard wait on our own latch, with interrupts checked after.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                10,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pg_sys::check_for_interrupts!();
    }
}

/// The event writers: one row per database slot in use, with the refusal events and last-use
/// updates queued now, and written and dropped since the slot was claimed.
#[pg_extern(volatile, parallel_unsafe)]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(database, Option<String>),
        name!(worker_pid, Option<i32>),
        name!(events_queued, i64),
        name!(events_written, i64),
        name!(events_dropped, i64),
        name!(touches_queued, i64),
        name!(touches_written, i64),
        name!(touches_dropped, i64),
    ),
> {
    let rows: Vec<_> = queue::status()
        .into_iter()
        .map(|s| {
            // SAFETY: a syscache lookup; NULL when the database is gone.
            let name = unsafe {
                let p = pg_sys::get_database_name(s.database);
                (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
            };
            let n = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
            let (e, t) = (s.events, s.touches);
            (name, s.worker_pid, n(e.queued), n(e.written), n(e.dropped), n(t.queued), n(t.written), n(t.dropped))
        })
        .collect();
    TableIterator::new(rows)
}
