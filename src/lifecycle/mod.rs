//! Issuing and retiring tokens: generate (`generate`), rotate (`rotate`), revoke (`revoke`).
//! This file holds what they share: argument checks, the writable-transaction check, and the
//! one INSERT that creates a token row.
//!
//! These functions are SECURITY DEFINER with `search_path = pg_catalog, pg_temp` and run only
//! for token_admin (EXECUTE is revoked from PUBLIC). Every object in their SQL is
//! schema-qualified, operators included, so a hostile search_path changes nothing.
//!
//! The plaintext token exists only in the row generate/rotate returns: it is never stored,
//! logged, or put in an error message. A new way to issue or retire tokens (a child token, a
//! disable flag, a leak report) gets its own file here and records its event through
//! `events::lifecycle` in the same transaction.

mod derive;
mod generate;
mod leaks;
mod manage;
mod options;

pub(crate) use options::{check_networks, check_rate_limits, inets, networks_sql};
mod revoke;
mod rotate;

use pg_token_core::hash::token_hash;
use pg_token_core::{format, limits};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

pub(crate) use crate::error::{fail, invalid, require_writable, required, spi};
use crate::error::Kind;
use crate::guc;

pub(crate) fn database_environment() -> String {
    match guc::environment() {
        Some(e) => e,
        None => fail(
            Kind::WrongState,
            "token.environment is not set".into(),
            Some("A superuser sets it per cluster (ALTER SYSTEM) or per database (ALTER DATABASE ... SET token.environment = 'prod')."),
        ),
    }
}

/// A scope list checked against the core's bounds (22023 otherwise).
pub(crate) fn check_scopes(scopes: &[Option<String>]) -> Vec<String> {
    let given: Vec<Option<&str>> = scopes.iter().map(Option::as_deref).collect();
    limits::scopes(&given).unwrap_or_else(|e| invalid(e))
}

/// The account's one spelling, or 22023.
pub(crate) fn check_account(account: &str) -> String {
    limits::account(account).unwrap_or_else(|e| invalid(e))
}

/// Free text bounded by the core (22023 otherwise).
pub(crate) fn check_text(what: &str, value: Option<&str>, max: usize) {
    if let Some(v) = value {
        if let Err(e) = limits::text(what, v, max) {
            invalid(e);
        }
    }
}

/// Serializes token issuance with account-wide revocation: generate_token holds a lock on the
/// account's bucket shared, revoke_account_tokens exclusively, so no token of an account can be
/// issued while its tokens are being revoked and survive (the revoke waits for the issuing
/// transaction, then sees its token). Transaction-scoped advisory locks on one of
/// `ACCOUNT_BUCKETS` buckets by the account's hash, not one lock per account: a transaction
/// issuing tokens for 100,000 accounts holds at most 64 locks instead of exhausting the lock
/// table. Accounts sharing a bucket only wait for each other's revocations, never mix.
pub(crate) const ACCOUNT_LOCK_SPACE: i32 = 0x7067_746b; // "pgtk"
pub(crate) const ACCOUNT_BUCKETS: i32 = 64;

pub(crate) fn lock_account(client: &mut SpiClient<'_>, account: &str, exclusive: bool) {
    let sql = if exclusive {
        "SELECT pg_catalog.pg_advisory_xact_lock($1, (pg_catalog.hashtext($2) OPERATOR(pg_catalog.&) ($3 OPERATOR(pg_catalog.-) 1)))"
    } else {
        "SELECT pg_catalog.pg_advisory_xact_lock_shared($1, (pg_catalog.hashtext($2) OPERATOR(pg_catalog.&) ($3 OPERATOR(pg_catalog.-) 1)))"
    };
    spi(crate::prepared::run(client, sql, None, &[ACCOUNT_LOCK_SPACE.into(), account.into(), ACCOUNT_BUCKETS.into()]));
}

pub(crate) struct NewToken {
    pub id: pgrx::Uuid,
    pub token: String,
}

/// A new token's secret parts: the plaintext (returned to the caller and nowhere else), its
/// hint and its hash (what is stored).
pub(crate) struct Secret {
    pub token: String,
    pub hint: String,
    pub hash: Vec<u8>,
}

pub(crate) fn new_secret(prefix: &str) -> Secret {
    let token = match format::generate(prefix) {
        Ok(t) => t,
        Err(_) => fail(Kind::SystemError, "could not read from the operating system's random source".into(), None),
    };
    let hint = format::split(&token).map(|p| p.hint()).unwrap_or_else(|_| prefix.to_owned());
    let hash = token_hash(&token).to_vec();
    Secret { token, hint, hash }
}
