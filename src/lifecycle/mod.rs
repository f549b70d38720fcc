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

mod generate;
mod revoke;
mod rotate;

use pg_token_core::format;
use pg_token_core::hash::token_hash;
use pgrx::datum::{Interval, JsonB};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

pub(crate) use crate::error::{fail, invalid, require_writable, required, spi};
use crate::error::Kind;
use crate::guc;

/// Largest metadata document accepted, serialized (it is cached and returned on every hit).
pub const MAX_METADATA_BYTES: usize = 8192;
pub const MAX_SCOPE_LEN: usize = 64;
pub const MAX_SCOPES: usize = 64;

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

pub(crate) fn check_scopes(scopes: &[Option<String>]) -> Vec<String> {
    if scopes.len() > MAX_SCOPES {
        invalid(format!("a token may carry at most {MAX_SCOPES} scopes"));
    }
    let mut out = Vec::with_capacity(scopes.len());
    for s in scopes {
        match s {
            None => invalid("scopes must not contain NULL"),
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

pub(crate) fn check_account(account: &str) {
    if account.is_empty() || account.chars().count() > 256 || account.chars().any(char::is_control) {
        invalid("invalid account: accounts are 1 to 256 characters without control characters");
    }
}

pub(crate) struct NewToken {
    pub id: pgrx::Uuid,
    pub token: String,
}

/// Inserts a new token row; the plaintext is returned to the caller and nowhere else.
#[allow(clippy::too_many_arguments)]
pub(crate) fn insert_token(
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
        Err(_) => fail(Kind::SystemError, "could not read from the operating system's random source".into(), None),
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

