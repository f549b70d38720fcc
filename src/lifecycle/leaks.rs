//! Leaked tokens: `report_leaked` for a secret-scanning service (GitHub's partner program calls
//! such an endpoint with what it found in public code), and `scanner_patterns`, the regular
//! expressions that find this database's tokens in text.
//!
//! A report checks each candidate's checksum offline (no lookup for a typo or a random string),
//! revokes what matches with reason `leaked`, records who reported from where, and answers one
//! row per input with the hint and the outcome, never the token. `token_reporter` may call these
//! two functions and nothing else.

use pg_token_core::format::{self, BODY_LEN, CHECKSUM_LEN};
use pg_token_core::hash::token_hash;
use pgrx::prelude::*;

use super::{invalid, require_writable, spi};
use crate::events::{self, Lifecycle};
use crate::schema;

/// Candidates per call.
const MAX_REPORTED: usize = 1000;
/// What report_leaked writes in revoked_reason.
pub const LEAKED: &str = "leaked";

/// Revokes every reported token that exists here and is live. One row per input, in order:
/// its hint (the prefix and 4 characters; NULL when malformed) and the outcome: `revoked`,
/// `already_revoked`, `unknown` (well formed, but no such token here) or `malformed`.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn report_leaked(
    tokens: Option<Vec<Option<String>>>,
) -> TableIterator<'static, (name!(hint, Option<String>), name!(outcome, &'static str))> {
    require_writable("report_leaked");
    schema::require_current("report_leaked");
    let tokens = tokens.unwrap_or_default();
    if tokens.len() > MAX_REPORTED {
        invalid(format!("report at most {MAX_REPORTED} tokens per call"));
    }
    let rows = Spi::connect_mut(|client| {
        let mut out = Vec::with_capacity(tokens.len());
        for t in &tokens {
            let parsed = t.as_deref().map(str::as_bytes).and_then(|b| format::split(b).ok()).filter(|p| p.checksum_matches());
            let Some(parsed) = parsed else {
                out.push((None, "malformed"));
                continue;
            };
            let hint = parsed.hint();
            let hash = token_hash(t.as_deref().unwrap_or("")).to_vec();
            let found = spi(client.update(
                "SELECT id, account, prefix, environment, \
                        revoked_at IS NOT NULL OR (revoke_after IS NOT NULL AND \
                                                   revoke_after OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp()) \
                   FROM token.tokens WHERE token_hash OPERATOR(pg_catalog.=) $1 FOR NO KEY UPDATE",
                Some(1),
                &[hash.into()],
            ));
            if found.is_empty() {
                out.push((Some(hint), "unknown"));
                continue;
            }
            let r = found.first();
            let id: Option<pgrx::Uuid> = spi(r.get(1));
            let account: Option<String> = spi(r.get(2));
            let prefix: Option<String> = spi(r.get(3));
            let environment: Option<String> = spi(r.get(4));
            let already = spi(r.get::<bool>(5)).unwrap_or(false);
            let outcome = if already { "already_revoked" } else { "revoked" };
            if !already {
                spi(client.update(
                    "UPDATE token.tokens SET revoked_at = pg_catalog.clock_timestamp(), revoked_reason = $2 \
                      WHERE id OPERATOR(pg_catalog.=) $1",
                    None,
                    &[id.into(), LEAKED.into()],
                ));
            }
            spi(events::lifecycle(
                client,
                Lifecycle {
                    event: "leak_reported",
                    token_id: id,
                    account: account.as_deref(),
                    prefix: prefix.as_deref(),
                    hint: Some(&hint),
                    environment: environment.as_deref(),
                    detail: Some(format!("outcome={outcome}")),
                },
            ));
            out.push((Some(hint), outcome));
        }
        out
    });
    TableIterator::new(rows)
}

/// For every registered prefix, a POSIX extended regular expression matching its tokens (for
/// grep -E, ripgrep, or a scanner's custom pattern), and the same with boundaries: a token is
/// never preceded by a token character nor followed by a body character (the token is the second
/// group). A match is only a candidate: report_leaked checks the checksum.
#[pg_extern(stable, parallel_safe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn scanner_patterns() -> TableIterator<
    'static,
    (
        name!(prefix, String),
        name!(key_type, String),
        name!(environment, String),
        name!(pattern, String),
        name!(bounded_pattern, String),
    ),
> {
    let rows = Spi::connect(|client| {
        let mut out = Vec::new();
        for r in spi(client.select(
            "SELECT prefix, key_type, environment FROM token.prefixes ORDER BY prefix",
            None,
            &[],
        )) {
            let prefix: String = spi(r.get(1)).unwrap_or_default();
            let key_type: String = spi(r.get(2)).unwrap_or_default();
            let environment: String = spi(r.get(3)).unwrap_or_default();
            // Prefixes are [A-Za-z0-9_-]: no character needs escaping outside a bracket.
            let pattern = format!("{prefix}[0-9A-Za-z]{{{}}}", BODY_LEN + CHECKSUM_LEN);
            let bounded = format!("(^|[^0-9A-Za-z_-])({pattern})([^0-9A-Za-z]|$)");
            out.push((prefix, key_type, environment, pattern, bounded));
        }
        out
    });
    TableIterator::new(rows)
}
