//! Changing a live token without reissuing it: disable and enable (reversible, unlike
//! revocation; who and why recorded), update (name, scopes, metadata, expiry, usage cap, rate
//! limits, networks), and the exact count of a capped token's uses. Every change is seen by every
//! session's next validation (the cache triggers), and recorded as an event.

use pg_token_core::limits;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::options::{check_networks, check_rate_limits, check_uses, inets, networks_sql};
use super::{check_scopes, check_text, database_environment, fail, invalid, required, require_writable, spi};
use crate::datum::{RawJsonb, RawInets, RawRateLimits};
use crate::error::Kind;
use crate::events::{self, Lifecycle};
use crate::schema;

/// The token's account, prefix, hint and environment, for the event; P0002 if there is none.
fn describe(client: &mut SpiClient<'_>, token_id: pgrx::Uuid, lock: bool) -> (String, String, String, String, bool) {
    let sql = format!(
        "SELECT account, prefix, hint, environment, revoked_at IS NOT NULL OR (revoke_after IS NOT NULL AND \
                revoke_after OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp()) \
           FROM token.tokens WHERE id OPERATOR(pg_catalog.=) $1{}",
        if lock { " FOR NO KEY UPDATE" } else { "" }
    );
    let rows = spi(client.update(&sql, Some(1), &[token_id.into()]));
    if rows.is_empty() {
        fail(Kind::NoSuchToken, format!("token {token_id} does not exist"), None);
    }
    let r = rows.first();
    let text = |i| -> String { spi(r.get::<String>(i)).unwrap_or_default() };
    (text(1), text(2), text(3), text(4), spi(r.get::<bool>(5)).unwrap_or(false))
}

fn record(client: &mut SpiClient<'_>, event: &str, token_id: pgrx::Uuid, who: &(String, String, String, String, bool), detail: String) {
    spi(events::lifecycle(
        client,
        Lifecycle {
            event,
            token_id: Some(token_id),
            account: Some(&who.0),
            prefix: Some(&who.1),
            hint: Some(&who.2),
            environment: Some(&who.3),
            detail: Some(detail),
        },
    ));
}

/// Disables a token: refused (`disabled`) from every session's next call until enable_token.
/// Returns false when it was already disabled. A revoked token cannot be disabled (55000).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn disable_token(token_id: Option<pgrx::Uuid>, reason: default!(Option<&str>, "NULL")) -> bool {
    require_writable("disable_token");
    schema::require_current("disable_token");
    let token_id = required(token_id, "token_id");
    check_text("reason", reason, limits::MAX_REASON_CHARS);
    Spi::connect_mut(|client| {
        let who = describe(client, token_id, true);
        if who.4 {
            fail(Kind::WrongState, format!("token {token_id} is revoked"), Some("A revoked token stays revoked; there is nothing to disable."));
        }
        let changed = spi(client.update(
            "UPDATE token.tokens SET disabled_at = pg_catalog.clock_timestamp(), disabled_reason = $2 \
              WHERE id OPERATOR(pg_catalog.=) $1 AND disabled_at IS NULL RETURNING 1",
            None,
            &[token_id.into(), reason.into()],
        ));
        if changed.is_empty() {
            return false;
        }
        record(client, "disabled", token_id, &who, reason.unwrap_or("").to_owned());
        true
    })
}

/// Enables a disabled token again. Returns false when it was not disabled.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn enable_token(token_id: Option<pgrx::Uuid>) -> bool {
    require_writable("enable_token");
    schema::require_current("enable_token");
    let token_id = required(token_id, "token_id");
    Spi::connect_mut(|client| {
        let who = describe(client, token_id, true);
        let changed = spi(client.update(
            "UPDATE token.tokens SET disabled_at = NULL, disabled_reason = NULL \
              WHERE id OPERATOR(pg_catalog.=) $1 AND disabled_at IS NOT NULL RETURNING 1",
            None,
            &[token_id.into()],
        ));
        if changed.is_empty() {
            return false;
        }
        record(client, "enabled", token_id, &who, String::new());
        true
    })
}

/// What update_token can clear (`unset => '{...}'`).
const UNSETTABLE: [&str; 6] = ["name", "expires_at", "uses", "refill", "rate_limits", "allowed_networks"];

/// Changes a live token in place. NULL leaves a field as it is; `unset` names fields to clear.
/// Scopes stay within the key type's allowed scopes (and a derived token's parent's); narrowing
/// a token's scopes or expiry narrows its descendants' too. A new usage cap starts counting
/// afresh (uses reserved under the old one are dropped).
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn update_token(
    token_id: Option<pgrx::Uuid>,
    name: default!(Option<&str>, "NULL"),
    scopes: default!(Option<Vec<Option<String>>>, "NULL"),
    metadata: default!(Option<RawJsonb>, "NULL"),
    expires_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    uses: default!(Option<i64>, "NULL"),
    refill_uses: default!(Option<i64>, "NULL"),
    refill_interval: default!(Option<Interval>, "NULL"),
    rate_limits: default!(Option<RawRateLimits>, "NULL"),
    allowed_networks: default!(Option<RawInets>, "NULL"),
    unset: default!(Option<Vec<Option<String>>>, "'{}'"),
) {
    require_writable("update_token");
    schema::require_current("update_token");
    let token_id = required(token_id, "token_id");
    let unset: Vec<String> = unset.unwrap_or_default().into_iter().map(|u| required(u, "an unset entry")).collect();
    for u in &unset {
        if !UNSETTABLE.contains(&u.as_str()) {
            invalid(format!("unset names unknown field \"{}\" (one of: {})", limits::quoted(u), UNSETTABLE.join(", ")));
        }
    }
    let clears = |f: &str| unset.iter().any(|u| u == f);
    let both = |f: &str, given: bool| {
        if given && clears(f) {
            invalid(format!("{f} is both given and unset"));
        }
    };
    both("name", name.is_some());
    both("expires_at", expires_at.is_some());
    both("uses", uses.is_some());
    both("refill", refill_uses.is_some() || refill_interval.is_some());
    both("rate_limits", rate_limits.is_some());
    both("allowed_networks", allowed_networks.is_some());
    check_text("name", name, limits::MAX_TOKEN_NAME_CHARS);
    let scopes = scopes.map(|s| check_scopes(&s));
    let env = database_environment();
    Spi::connect_mut(|client| {
        let who = describe(client, token_id, true);
        if who.4 {
            fail(Kind::WrongState, format!("token {token_id} is revoked"), Some("Issue a new token with generate_token."));
        }
        if who.3 != env {
            fail(Kind::WrongState, format!("token {token_id} belongs to environment \"{}\"; this database serves \"{env}\"", who.3), None);
        }
        let rate_limits = check_rate_limits(client, rate_limits);
        let networks = check_networks(client, allowed_networks);
        // The cap after this update: what is given, else what the row has (a refill needs one).
        let current: (Option<i64>, Option<i64>) = {
            let r = spi(client.select(
                "SELECT uses_remaining, refill_uses FROM token.tokens WHERE id OPERATOR(pg_catalog.=) $1",
                Some(1),
                &[token_id.into()],
            ));
            let r = r.first();
            (spi(r.get(1)), spi(r.get(2)))
        };
        let uses_after = if clears("uses") { None } else { uses.or(current.0) };
        if refill_uses.is_some() || refill_interval.is_some() {
            check_uses(uses_after, refill_uses, refill_interval);
        } else if uses.is_some() {
            check_uses(uses, None, None);
        }
        if clears("uses") && current.1.is_some() && !clears("refill") {
            invalid("a refill needs a usage cap: unset refill too");
        }
        let mut changed: Vec<&str> = Vec::new();
        let mut note = |f: &'static str, given: bool| {
            if given || clears(f) {
                changed.push(f);
            }
        };
        note("name", name.is_some());
        note("scopes", scopes.is_some());
        note("metadata", metadata.is_some());
        note("expires_at", expires_at.is_some());
        note("uses", uses.is_some());
        note("refill", refill_uses.is_some());
        note("rate_limits", !rate_limits_is_null(&rate_limits));
        note("allowed_networks", networks.is_some());
        if changed.is_empty() {
            return;
        }
        check_update(client, token_id, scopes.as_deref(), metadata, expires_at, clears("expires_at"), networks);

        let sql = format!(
            "UPDATE token.tokens t SET \
                 name = CASE WHEN $2 THEN NULL ELSE COALESCE($3, t.name) END, \
                 scopes = COALESCE($4, t.scopes), \
                 metadata = COALESCE($5, t.metadata), \
                 expires_at = CASE WHEN $6 THEN NULL ELSE COALESCE($7, t.expires_at) END, \
                 uses_remaining = CASE WHEN $8 THEN NULL ELSE COALESCE($9, t.uses_remaining) END, \
                 uses_version = CASE WHEN $8 OR $9 IS NOT NULL OR $11 IS NOT NULL OR $10 \
                                     THEN t.uses_version OPERATOR(pg_catalog.+) 1 ELSE t.uses_version END, \
                 refill_uses = CASE WHEN $10 OR $8 THEN NULL ELSE COALESCE($11, t.refill_uses) END, \
                 refill_interval = CASE WHEN $10 OR $8 THEN NULL ELSE COALESCE($12, t.refill_interval) END, \
                 refilled_at = CASE WHEN $10 OR $8 THEN NULL WHEN $11 IS NOT NULL THEN pg_catalog.now() ELSE t.refilled_at END, \
                 rate_limits = CASE WHEN $13 THEN NULL ELSE COALESCE($14, t.rate_limits) END, \
                 allowed_networks = CASE WHEN $15 THEN NULL ELSE COALESCE({}, t.allowed_networks) END \
             WHERE t.id OPERATOR(pg_catalog.=) $1",
            networks_sql(16)
        );
        spi(client.update(
            &sql,
            None,
            &[
                token_id.into(),
                clears("name").into(),
                name.into(),
                scopes.clone().into(),
                metadata.into(),
                clears("expires_at").into(),
                expires_at.into(),
                clears("uses").into(),
                uses.into(),
                clears("refill").into(),
                refill_uses.into(),
                refill_interval.into(),
                clears("rate_limits").into(),
                rate_limits,
                clears("allowed_networks").into(),
                inets(networks),
            ],
        ));
        // Descendants never hold more than their ancestors: narrow their scopes and expiry.
        if scopes.is_some() || expires_at.is_some() {
            spi(client.update(
                "WITH RECURSIVE down(id) AS ( \
                     SELECT c.id FROM token.tokens c WHERE c.parent_id OPERATOR(pg_catalog.=) $1 \
                     UNION SELECT c.id FROM token.tokens c JOIN down ON c.parent_id OPERATOR(pg_catalog.=) down.id) \
                 UPDATE token.tokens c SET \
                     scopes = CASE WHEN $2::pg_catalog.text[] IS NULL THEN c.scopes ELSE \
                              ARRAY(SELECT s FROM pg_catalog.unnest(c.scopes) WITH ORDINALITY AS u(s, i) \
                                     WHERE s OPERATOR(pg_catalog.=) ANY ($2) ORDER BY u.i) END, \
                     expires_at = CASE WHEN $3::pg_catalog.timestamptz IS NULL THEN c.expires_at \
                                       ELSE LEAST(COALESCE(c.expires_at, $3), $3) END \
                   FROM down WHERE c.id OPERATOR(pg_catalog.=) down.id",
                None,
                &[token_id.into(), scopes.into(), expires_at.into()],
            ));
        }
        record(client, "updated", token_id, &who, format!("changed={}", changed.join(",")));
    });
}

fn rate_limits_is_null(d: &pgrx::datum::DatumWithOid<'_>) -> bool {
    d.datum().is_none()
}

/// The checks an update needs the row for: scopes within the key type's (and the parent's),
/// metadata an object of at most 8 kB, an expiry in the future and within max_ttl of the family
/// (and the parent's), networks within the parent's.
fn check_update(
    client: &mut SpiClient<'_>,
    token_id: pgrx::Uuid,
    scopes: Option<&[String]>,
    metadata: Option<RawJsonb>,
    expires_at: Option<TimestampWithTimeZone>,
    clear_expiry: bool,
    networks: Option<RawInets>,
) {
    let r = spi(client.select(
        "SELECT \
             (SELECT pg_catalog.array_agg(s) FROM pg_catalog.unnest($2::pg_catalog.text[]) AS s \
               WHERE (kt.allowed_scopes IS NOT NULL AND s OPERATOR(pg_catalog.<>) ALL (kt.allowed_scopes)) \
                  OR (p.id IS NOT NULL AND s OPERATOR(pg_catalog.<>) ALL (p.scopes))), \
             ($3::pg_catalog.jsonb IS NOT NULL AND (pg_catalog.jsonb_typeof($3) OPERATOR(pg_catalog.<>) 'object' \
                  OR pg_catalog.octet_length($3::pg_catalog.text) OPERATOR(pg_catalog.>) $4)), \
             ($5::pg_catalog.timestamptz IS NOT NULL AND $5 OPERATOR(pg_catalog.<=) pg_catalog.now()), \
             (kt.max_ttl IS NOT NULL AND (($5::pg_catalog.timestamptz IS NOT NULL AND \
                  $5 OPERATOR(pg_catalog.>) (t.family_issued_at OPERATOR(pg_catalog.+) kt.max_ttl)) OR $6)), \
             (p.id IS NOT NULL AND p.expires_at IS NOT NULL AND \
                  (($5::pg_catalog.timestamptz IS NOT NULL AND $5 OPERATOR(pg_catalog.>) p.expires_at) OR $6)), \
             (p.allowed_networks IS NOT NULL AND $7::pg_catalog.inet[] IS NOT NULL AND NOT (SELECT pg_catalog.bool_and( \
                  EXISTS (SELECT 1 FROM pg_catalog.unnest(p.allowed_networks) AS pn \
                           WHERE pg_catalog.network(c) OPERATOR(pg_catalog.<<=) pn)) FROM pg_catalog.unnest($7) AS c)) \
           FROM token.tokens t JOIN token.key_types kt ON kt.name OPERATOR(pg_catalog.=) t.key_type \
           LEFT JOIN token.tokens p ON p.id OPERATOR(pg_catalog.=) t.parent_id \
          WHERE t.id OPERATOR(pg_catalog.=) $1",
        Some(1),
        &[
            token_id.into(),
            scopes.map(<[String]>::to_vec).into(),
            metadata.into(),
            (limits::MAX_METADATA_BYTES as i32).into(),
            expires_at.into(),
            clear_expiry.into(),
            inets(networks),
        ],
    ));
    let r = r.first();
    if let Some(bad) = spi(r.get::<Vec<String>>(1)).and_then(|b| b.into_iter().next()) {
        invalid(format!("scope \"{}\" is not allowed for this token (its key type's or its parent's scopes)", limits::quoted(&bad)));
    }
    if spi(r.get::<bool>(2)).unwrap_or(false) {
        invalid(format!("metadata must be a JSON object of at most {} bytes", limits::MAX_METADATA_BYTES));
    }
    if spi(r.get::<bool>(3)).unwrap_or(false) {
        invalid("expires_at must be in the future");
    }
    if spi(r.get::<bool>(4)).unwrap_or(false) {
        invalid("expires_at must be within its key type's max_ttl of the token family's first issue");
    }
    if spi(r.get::<bool>(5)).unwrap_or(false) {
        invalid("a derived token cannot outlive its parent");
    }
    if spi(r.get::<bool>(6)).unwrap_or(false) {
        invalid("allowed_networks must lie within the parent token's networks");
    }
}

/// A capped token's uses, exactly: left in the table, reserved in this server's shared memory
/// and not yet spent, and the refill.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn token_uses(
    token_id: Option<pgrx::Uuid>,
) -> TableIterator<
    'static,
    (
        name!(uses_remaining, Option<i64>),
        name!(reserved, i64),
        name!(in_table, Option<i64>),
        name!(refill_uses, Option<i64>),
        name!(refill_interval, Option<Interval>),
        name!(next_refill_at, Option<TimestampWithTimeZone>),
    ),
> {
    events::require_preload();
    let token_id = required(token_id, "token_id");
    // A read-write SPI call: it takes a fresh snapshot each time (read committed), where a
    // read-only one would keep the statement's, older than the shared memory read beside it.
    let read = || {
        Spi::connect_mut(|client| {
            let rows = spi(client.update(
                "SELECT uses_remaining, refill_uses, refill_interval, refilled_at OPERATOR(pg_catalog.+) refill_interval \
                   FROM token.tokens WHERE id OPERATOR(pg_catalog.=) $1",
                Some(1),
                &[token_id.into()],
            ));
            if rows.is_empty() {
                fail(Kind::NoSuchToken, format!("token {token_id} does not exist"), None);
            }
            let r = rows.first();
            (spi(r.get::<i64>(1)), spi(r.get::<i64>(2)), spi(r.get::<Interval>(3)), spi(r.get::<TimestampWithTimeZone>(4)))
        })
    };
    // The table and shared memory, read so that no reservation moved uses from one to the
    // other in between (the writer commits the table's subtraction, then hands the block over).
    let mut attempt = 0;
    let (row, reserved) = loop {
        let before = events::reserved_uses(token_id.as_bytes());
        let row = read();
        let after = events::reserved_uses(token_id.as_bytes());
        attempt += 1;
        if (!before.1 && !after.1 && before.2 == after.2) || attempt >= 100 {
            break (row, after.0);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    let reserved = if row.0.is_some() { reserved } else { 0 };
    let total = row.0.map(|t| t + reserved);
    TableIterator::once((total, reserved, row.0, row.1, row.2, row.3))
}
