//! The options a token may carry besides its identity: a usage cap (with an optional refill),
//! rate limits and bound networks. generate_token, derive_token and update_token take them the
//! same way; this file checks them (22023 with what is wrong) and says how SQL stores them.

use pg_token_core::network::MAX_NETWORKS;
use pg_token_core::ratelimit::{self, RateLimit};
use pgrx::datum::{DatumWithOid, Interval};
use pgrx::pg_sys;
use pgrx::spi::SpiClient;

use super::{invalid, spi};
use crate::datum::{RawInets, RawRateLimits};

/// The shortest refill interval: one second.
const MIN_REFILL_MICROS: i128 = 1_000_000;

/// A usage cap: how many uses, and optionally a refill to `refill_uses` every `refill_interval`.
pub(crate) fn check_uses(uses: Option<i64>, refill_uses: Option<i64>, refill_interval: Option<Interval>) {
    if uses.is_some_and(|u| u < 0) {
        invalid("uses must not be negative");
    }
    match (refill_uses, refill_interval) {
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => invalid("refill_uses and refill_interval go together"),
        (Some(n), Some(i)) => {
            if n < 1 {
                invalid("refill_uses must be at least 1");
            }
            if i.as_micros() < MIN_REFILL_MICROS {
                invalid("refill_interval must be at least 1 second");
            }
            if uses.is_none() {
                invalid("a refill needs a usage cap: pass uses too");
            }
        }
    }
}

/// token.rate_limit[]'s OID in this database (looked up each time: the extension may have been
/// dropped and created again since this backend last looked).
fn rate_limit_array_type(client: &mut SpiClient<'_>) -> pg_sys::Oid {
    let oid: Option<pg_sys::Oid> = spi(client
        .select("SELECT 'token.rate_limit[]'::pg_catalog.regtype::pg_catalog.oid", Some(1), &[])
        .and_then(|t| t.first().get_one()));
    oid.unwrap_or(pg_sys::InvalidOid)
}

/// A rate-limit list as an SPI argument, checked: at most four, one per window, each 1 to 2^32-1
/// requests per a window of whole milliseconds from 1 second to 30 days, without months.
pub(crate) fn check_rate_limits(client: &mut SpiClient<'_>, raw: Option<RawRateLimits>) -> DatumWithOid<'static> {
    let oid = rate_limit_array_type(client);
    let Some(raw) = raw else { return DatumWithOid::null_oid(oid) };
    let arg = raw.with_type(oid);
    let rows = spi(client.select(
        "SELECT r.requests::pg_catalog.int8, \
                (pg_catalog.date_part('epoch', r.per) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8, \
                (pg_catalog.date_part('month', r.per) OPERATOR(pg_catalog.<>) 0 \
                 OR pg_catalog.date_part('year', r.per) OPERATOR(pg_catalog.<>) 0) \
           FROM pg_catalog.unnest($1) AS r(requests, per)",
        None,
        &[arg],
    ));
    let mut limits = Vec::new();
    for row in rows {
        let requests: Option<i64> = spi(row.get(1));
        let window: Option<i64> = spi(row.get(2));
        let months: Option<bool> = spi(row.get(3));
        let (Some(requests), Some(window)) = (requests, window) else {
            invalid("a rate limit needs both requests and per");
        };
        if months == Some(true) {
            invalid("a rate limit's window is days, hours, minutes or seconds, not months");
        }
        limits.push(RateLimit::new(requests, window).unwrap_or_else(|e| invalid(e)));
    }
    ratelimit::check_list(&limits).unwrap_or_else(|e| invalid(e));
    raw.with_type(oid)
}

/// A network list as an SPI argument, checked: at most 64 CIDR blocks or addresses, none NULL,
/// not empty (NULL allows any address; an empty list would allow none).
pub(crate) fn check_networks(client: &mut SpiClient<'_>, given: Option<RawInets>) -> Option<RawInets> {
    let given = given?;
    let row = spi(client.select(
        "SELECT pg_catalog.cardinality($1), pg_catalog.array_position($1, NULL) IS NOT NULL",
        Some(1),
        &[given.with_type(pg_sys::INETARRAYOID)],
    ));
    let row = row.first();
    let n: i32 = spi(row.get(1)).unwrap_or(0);
    if n == 0 {
        invalid("allowed_networks must not be empty (NULL allows any address)");
    }
    if n as usize > MAX_NETWORKS {
        invalid(format!("at most {MAX_NETWORKS} allowed_networks"));
    }
    if spi(row.get::<bool>(2)).unwrap_or(true) {
        invalid("allowed_networks must not contain NULL");
    }
    Some(given)
}

/// A network list (checked) as an SPI argument.
pub(crate) fn inets(given: Option<RawInets>) -> DatumWithOid<'static> {
    given.map_or(DatumWithOid::null_oid(pg_sys::INETARRAYOID), |g| g.with_type(pg_sys::INETARRAYOID))
}

/// SQL for the cidr[] stored from inet[] parameter `$n`: each address's network (host bits
/// cleared, a bare address as a single host), in the order given; NULL stays NULL.
pub(crate) fn networks_sql(n: usize) -> String {
    format!(
        "CASE WHEN ${n}::pg_catalog.inet[] IS NULL THEN NULL ELSE \
         ARRAY(SELECT pg_catalog.network(u.x) FROM pg_catalog.unnest(${n}::pg_catalog.inet[]) WITH ORDINALITY AS u(x, i) \
               ORDER BY u.i) END"
    )
}
