//! Legacy JWT issuers (migrating from JWTs): registering them, changing their cut-off or key,
//! revoking a JWT by `jti`, and exchanging a JWT for an opaque token. Validation of the JWTs
//! themselves is the verdict rules' (`pg_token_core::legacy`, `verdict`), loaded by `store`.
//!
//! SECURITY DEFINER with a pinned search_path, every object schema-qualified. The key
//! material goes into token.legacy_issuer_keys, which only the extension's owner can read; it
//! is checked here (parsed as the validation will parse it) before it is stored, and never
//! put in a message.

use pg_token_core::hash::token_hash;
use pg_token_core::jwt::{Algorithm, IssuerKeys};
use pg_token_core::limits;
use pg_token_core::verdict::Request;
use pgrx::prelude::*;

use crate::error::{self, fail, invalid, require_writable, required, spi, Kind};
use crate::events::{self, Lifecycle};
use crate::schema;
use crate::validation;

/// The algorithms and key, checked together (22023 naming what is wrong, never the key).
fn check_key(algorithms: &[Option<String>], key: &str) -> Vec<String> {
    let mut algs = Vec::new();
    for a in algorithms {
        let a = required(a.as_deref(), "algorithms element");
        match Algorithm::from_name(a) {
            Some(alg) if !algs.contains(&alg) => algs.push(alg),
            Some(_) => {}
            None => invalid(format!("algorithm \"{}\" is not supported: HS256, RS256 or ES256", limits::quoted(a))),
        }
    }
    if let Err(e) = IssuerKeys::from_material(&algs, key.as_bytes()) {
        invalid(format!("key: {}", e.describe()));
    }
    algs.iter().map(|a| a.as_str().to_owned()).collect()
}

fn check_name(name: &str) {
    if !limits::is_identifier(name, 31) {
        invalid(format!("legacy issuer name \"{}\" must match [a-z][a-z0-9_]{{0,30}}", limits::quoted(name)));
    }
}

fn no_such_issuer(name: &str) -> ! {
    fail(
        Kind::UndefinedObject,
        format!("legacy issuer \"{}\" does not exist", limits::quoted(name)),
        Some("SELECT name FROM token.legacy_issuers lists them."),
    )
}

/// Registers a legacy JWT issuer: its JWTs validate like tokens (with a deprecation marker)
/// until `cutoff_at`, then are refused as legacy_token_retired with `migration_message`.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn register_legacy_issuer(
    name: Option<&str>,
    algorithms: Option<Vec<Option<String>>>,
    key: Option<&str>,
    key_type: Option<&str>,
    environment: Option<&str>,
    cutoff_at: Option<TimestampWithTimeZone>,
    migration_message: default!(Option<&str>, "NULL"),
    issuer: default!(Option<&str>, "NULL"),
    audience: default!(Option<&str>, "NULL"),
    account_claim: default!(Option<&str>, "'sub'"),
    scopes_claim: default!(Option<&str>, "'scope'"),
    exchange_ttl: default!(Option<Interval>, "NULL"),
) {
    require_writable("register_legacy_issuer");
    schema::require_current("register_legacy_issuer");
    let name = required(name, "name");
    check_name(name);
    let algs = check_key(&required(algorithms, "algorithms"), required(key, "key"));
    let key_type = required(key_type, "key_type");
    let environment = required(environment, "environment");
    // What token.legacy_issuers holds; checked here so that a bad argument is 22023, not the
    // table's check violation (23514), as tests/fuzz found.
    if !limits::is_identifier(environment, 31) {
        invalid("a legacy issuer's environment must be 1 to 31 characters of a-z, 0-9 and _, starting with a letter");
    }
    let cutoff_at = required(cutoff_at, "cutoff_at");
    let account_claim = required(account_claim, "account_claim");
    let scopes_claim = required(scopes_claim, "scopes_claim");
    crate::lifecycle::check_text("migration_message", migration_message, 1000);
    // The table's bounds, as 22023 rather than a check violation.
    for (what, value, max) in
        [("issuer", issuer, 1024), ("audience", audience, 1024), ("account_claim", Some(account_claim), 128), ("scopes_claim", Some(scopes_claim), 128)]
    {
        if value.is_some_and(|v| v.is_empty()) {
            invalid(format!("{what} must not be empty"));
        }
        crate::lifecycle::check_text(what, value, max);
    }
    // The table's CHECK (exchange_ttl > interval '0'), compared as Postgres compares intervals
    // (a month as 30 days): 22023, not 23514 (tests/fuzz, seed 202195857).
    if exchange_ttl.is_some_and(|t| t.as_micros() <= 0) {
        invalid("exchange_ttl must be positive");
    }
    Spi::connect_mut(|client| {
        let kt = spi(client.update(
            "SELECT 1 FROM token.key_types WHERE name OPERATOR(pg_catalog.=) $1 FOR SHARE",
            Some(1),
            &[key_type.into()],
        ));
        if kt.is_empty() {
            error::unknown_key_type(key_type);
        }
        let inserted = spi(client.update(
            "INSERT INTO token.legacy_issuers (name, algorithms, key_type, environment, cutoff_at, migration_message, \
                                               issuer, audience, account_claim, scopes_claim, exchange_ttl) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING RETURNING 1",
            None,
            &[
                name.into(),
                algs.clone().into(),
                key_type.into(),
                environment.into(),
                cutoff_at.into(),
                migration_message.into(),
                issuer.into(),
                audience.into(),
                account_claim.into(),
                scopes_claim.into(),
                exchange_ttl.into(),
            ],
        ));
        if inserted.is_empty() {
            fail(
                Kind::DuplicateObject,
                format!("legacy issuer \"{name}\" (or one with this iss) already exists"),
                Some("token.alter_legacy_issuer changes its cut-off, message or key."),
            );
        }
        spi(client.update(
            "INSERT INTO token.legacy_issuer_keys (name, key) VALUES ($1, $2)",
            None,
            &[name.into(), key.into()],
        ));
        record(client, "legacy_issuer_registered", name, format!("algorithms={} key_type={key_type} environment={environment}", algs_text(&algs)));
    });
}

fn algs_text(algs: &[String]) -> String {
    algs.join(",")
}

fn record(client: &mut pgrx::spi::SpiClient<'_>, event: &str, issuer: &str, detail: String) {
    spi(events::lifecycle(
        client,
        Lifecycle { event, token_id: None, account: None, prefix: Some(issuer), hint: None, environment: None, detail: Some(detail) },
    ));
}

/// Changes a legacy issuer: its cut-off, its migration message, or its algorithms and key
/// (together). NULL leaves a field as it is.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn alter_legacy_issuer(
    name: Option<&str>,
    cutoff_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    migration_message: default!(Option<&str>, "NULL"),
    algorithms: default!(Option<Vec<Option<String>>>, "NULL"),
    key: default!(Option<&str>, "NULL"),
) {
    require_writable("alter_legacy_issuer");
    schema::require_current("alter_legacy_issuer");
    let name = required(name, "name");
    crate::lifecycle::check_text("migration_message", migration_message, 1000);
    let algs = match (&algorithms, key) {
        (Some(a), Some(k)) => Some(check_key(a, k)),
        (None, None) => None,
        _ => invalid("algorithms and key change together: give both"),
    };
    Spi::connect_mut(|client| {
        let found = spi(client.update(
            "UPDATE token.legacy_issuers SET cutoff_at = COALESCE($2, cutoff_at), \
                    migration_message = COALESCE($3, migration_message), algorithms = COALESCE($4, algorithms) \
              WHERE name OPERATOR(pg_catalog.=) $1 RETURNING 1",
            None,
            &[name.into(), cutoff_at.into(), migration_message.into(), algs.clone().into()],
        ));
        if found.is_empty() {
            no_such_issuer(name);
        }
        if let Some(k) = key {
            spi(client.update(
                "UPDATE token.legacy_issuer_keys SET key = $2 WHERE name OPERATOR(pg_catalog.=) $1",
                None,
                &[name.into(), k.into()],
            ));
        }
        let mut changed = Vec::new();
        if cutoff_at.is_some() {
            changed.push("cutoff_at");
        }
        if migration_message.is_some() {
            changed.push("migration_message");
        }
        if algs.is_some() {
            changed.push("key");
        }
        record(client, "legacy_issuer_altered", name, format!("changed={}", changed.join(",")));
    });
}

/// Removes a legacy issuer, its key and its revocations: its JWTs are refused (unknown_issuer)
/// from every session's next call. Returns false when there was none.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn drop_legacy_issuer(name: Option<&str>) -> bool {
    require_writable("drop_legacy_issuer");
    schema::require_current("drop_legacy_issuer");
    let name = required(name, "name");
    Spi::connect_mut(|client| {
        let gone = !spi(client.update(
            "DELETE FROM token.legacy_issuers WHERE name OPERATOR(pg_catalog.=) $1 RETURNING 1",
            None,
            &[name.into()],
        ))
        .is_empty();
        if gone {
            record(client, "legacy_issuer_dropped", name, String::new());
        }
        gone
    })
}

/// Revokes one legacy JWT by its issuer and `jti`, from every session's next call. Returns
/// false when it was revoked already.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn revoke_legacy_jwt(issuer: Option<&str>, jti: Option<&str>, reason: default!(Option<&str>, "NULL")) -> bool {
    require_writable("revoke_legacy_jwt");
    schema::require_current("revoke_legacy_jwt");
    let issuer = required(issuer, "issuer");
    let jti = required(jti, "jti");
    crate::lifecycle::check_text("jti", Some(jti), 128);
    crate::lifecycle::check_text("reason", reason, limits::MAX_REASON_CHARS);
    Spi::connect_mut(|client| {
        let known = spi(client.update(
            "SELECT 1 FROM token.legacy_issuers WHERE name OPERATOR(pg_catalog.=) $1 FOR SHARE",
            Some(1),
            &[issuer.into()],
        ));
        if known.is_empty() {
            no_such_issuer(issuer);
        }
        let new = !spi(client.update(
            "INSERT INTO token.legacy_revocations (issuer, jti, reason, revoked_at) \
             VALUES ($1, $2, $3, pg_catalog.clock_timestamp()) ON CONFLICT DO NOTHING RETURNING 1",
            None,
            &[issuer.into(), jti.into(), reason.into()],
        ))
        .is_empty();
        if new {
            let jti_shown: String = jti.chars().take(32).filter(|c| !c.is_control()).collect();
            record(client, "legacy_revoked", issuer, format!("jti={jti_shown}"));
        }
        new
    })
}

/// Verifies a legacy JWT as validate_token would (refusals raise 28000) and issues an opaque
/// token for the same account and scopes under the issuer's key type, expiring after the
/// issuer's exchange_ttl (or the key type's default). Once per JWT (its issuer and jti, or
/// its hash without one): a second exchange returns the first token's id and no token.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn exchange_legacy_jwt(
    jwt: Option<&str>,
    name: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(token, Option<String>),
        name!(token_id, Option<pgrx::Uuid>),
        name!(expires_at, Option<TimestampWithTimeZone>),
        name!(first_exchange, bool),
    ),
> {
    require_writable("exchange_legacy_jwt");
    schema::require_current("exchange_legacy_jwt");
    let jwt = required(jwt, "jwt");
    let judged = validation::judge_or_raise(Request { token: Some(jwt.as_bytes()), caller: None, required_scope: None });
    let state = &judged.token.state;
    let Some(lg) = state.legacy.as_deref() else {
        invalid("exchange_legacy_jwt takes a legacy JWT; this is already a pg_token token");
    };
    let jwt_key = match &lg.jti {
        Some(j) => format!("jti:{j}"),
        None => format!("sha256:{}", token_hash(jwt).iter().map(|b| format!("{b:02x}")).collect::<String>()),
    };
    let row = Spi::connect_mut(|client| {
        let claimed = spi(client.update(
            "INSERT INTO token.legacy_exchanges (issuer, jwt_key) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING 1",
            None,
            &[lg.issuer.as_str().into(), jwt_key.as_str().into()],
        ));
        if claimed.is_empty() {
            let first: Option<pgrx::Uuid> = spi(client
                .update(
                    "SELECT token_id FROM token.legacy_exchanges WHERE issuer OPERATOR(pg_catalog.=) $1 \
                       AND jwt_key OPERATOR(pg_catalog.=) $2",
                    Some(1),
                    &[lg.issuer.as_str().into(), jwt_key.as_str().into()],
                )
                .and_then(|t| t.first().get_one()));
            return (None, first, None, false);
        }
        let issued = spi(client.update(
            "SELECT g.token, g.token_id \
               FROM token.legacy_issuers i, \
                    LATERAL token.generate_token($2, i.key_type, $3, $4, expires_in => i.exchange_ttl, \
                                                 metadata => pg_catalog.jsonb_build_object('exchanged_from', \
                                                     pg_catalog.jsonb_build_object('issuer', i.name, 'jti', $5::pg_catalog.text))) g \
              WHERE i.name OPERATOR(pg_catalog.=) $1",
            Some(1),
            &[lg.issuer.as_str().into(), state.account.as_str().into(), name.into(), state.scopes.clone().into(), lg.jti.as_deref().into()],
        ));
        if issued.is_empty() {
            no_such_issuer(&lg.issuer);
        }
        let r = issued.first();
        let (token, id): (Option<String>, Option<pgrx::Uuid>) = (spi(r.get(1)), spi(r.get(2)));
        // A new command: it sees the row generate_token inserted.
        let expires: Option<TimestampWithTimeZone> = spi(client
            .update("SELECT expires_at FROM token.tokens WHERE id OPERATOR(pg_catalog.=) $1", Some(1), &[id.into()])
            .and_then(|t| t.first().get_one()));
        spi(client.update(
            "UPDATE token.legacy_exchanges SET token_id = $3 WHERE issuer OPERATOR(pg_catalog.=) $1 \
               AND jwt_key OPERATOR(pg_catalog.=) $2",
            None,
            &[lg.issuer.as_str().into(), jwt_key.as_str().into(), id.into()],
        ));
        (token, id, expires, true)
    });
    TableIterator::once(row)
}
