//! Revocation, effective for the very next validation in every session (the cache triggers
//! see to that): one token (`revoke_token`), a token and everything rotated from it
//! (`revoke_token_tree`, the incident-response call), or every live token of an account
//! (`revoke_account_tokens`). The last two leave no window: a rotation or an issuance racing
//! with them either finishes first and is revoked too, or starts after and sees the revocation.

use pg_token_core::limits;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::{check_account, check_text, fail, lock_account, required, require_writable, spi};
use crate::error::{self, Error, Kind};
use crate::events::{self, Lifecycle};
use crate::guc;
use crate::prepared;
use crate::schema;
use crate::store;

/// Revokes one token, effective for the very next validation in every session. Returns false
/// when it was already revoked.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn revoke_token(token_id: Option<pgrx::Uuid>, reason: default!(Option<&str>, "NULL")) -> bool {
    require_writable("revoke_token");
    schema::require_current("revoke_token");
    let token_id = required(token_id, "token_id");
    check_text("reason", reason, limits::MAX_REASON_CHARS);
    Spi::connect_mut(|client| {
        let revoked = spi(prepared::run(
            client,
            "UPDATE token.tokens SET revoked_at = pg_catalog.clock_timestamp(), revoked_reason = $2 \
             WHERE id OPERATOR(pg_catalog.=) $1 AND revoked_at IS NULL \
             RETURNING account, prefix, hint, environment",
            None,
            &[token_id.into(), reason.into()],
        ));
        if revoked.is_empty() {
            let exists = spi(prepared::run(
                client,
                "SELECT 1 FROM token.tokens WHERE id OPERATOR(pg_catalog.=) $1",
                Some(1),
                &[token_id.into()],
            ));
            if exists.is_empty() {
                fail(Kind::NoSuchToken, format!("token {token_id} does not exist"), None);
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
    schema::require_current("revoke_account_tokens");
    // The account's one spelling: '042' revokes the tokens of '42'.
    let account = check_account(required(account, "account"));
    let account = account.as_str();
    check_text("reason", reason, limits::MAX_REASON_CHARS);
    let who = events::Client::current();
    let count = Spi::connect_mut(|client| {
        // Waits for every generate_token of this account in flight; none starts until we end.
        lock_account(client, account, true);
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
        // The account's legacy JWTs too: every one issued (iat) before now, or without iat.
        spi(client.update(
            "INSERT INTO token.legacy_revocations (account, reason, revoked_at) VALUES ($1, $2, pg_catalog.clock_timestamp())",
            None,
            &[account.into(), reason.into()],
        ));
        n.unwrap_or(0)
    });
    // Under READ COMMITTED the UPDATE above ran with a snapshot taken after the lock, so it saw
    // every token issued before. A REPEATABLE READ (or SERIALIZABLE) snapshot may predate a
    // token whose issuing transaction we waited for: it would survive, so refuse instead.
    if store::live_tokens_of_account(account) > 0 {
        Error::new(
            Kind::SerializationFailure,
            format!("a token of account {} was issued concurrently; none was revoked", limits::quoted(account)),
        )
        .hint("Retry the transaction (or run revoke_account_tokens in a READ COMMITTED one).")
        .raise();
    }
    if guc::LOG_EVENTS.get() && count > 0 {
        error::log_server_only(format!(
            "pg_token: revoked {count} tokens of account={account} user={}",
            who.db_user.as_deref().unwrap_or("?")
        ));
    }
    count
}


/// The token and every token rotated from it, directly or not: their ids, sorted.
fn tree(client: &mut SpiClient<'_>, root: pgrx::Uuid) -> Vec<pgrx::Uuid> {
    let ids: Option<Vec<pgrx::Uuid>> = spi(client
        .select(
            "WITH RECURSIVE tree(id) AS ( \
                 SELECT t.id FROM token.tokens t WHERE t.id OPERATOR(pg_catalog.=) $1 \
                 UNION \
                 SELECT t.id FROM token.tokens t JOIN tree ON t.rotated_from OPERATOR(pg_catalog.=) tree.id) \
             SELECT pg_catalog.array_agg(id ORDER BY id) FROM tree",
            Some(1),
            &[root.into()],
        )
        .and_then(|t| t.first().get_one()));
    ids.unwrap_or_default()
}

/// Revokes a token and every token rotated from it (its successors, theirs, and so on), live
/// or not, at once: what an incident response runs for a leaked token. Returns how many were
/// revoked now (those already revoked are left as they were).
///
/// A rotation of any of them that is in flight is waited for and its successor revoked too:
/// every member is locked, the tree is read again, and this repeats until it stops growing (a
/// rotation must lock the token it rotates, so none can start meanwhile). Under REPEATABLE
/// READ a rotation committed after the snapshot makes the lock fail with 40001 instead.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn revoke_token_tree(token_id: Option<pgrx::Uuid>, reason: default!(Option<&str>, "NULL")) -> i64 {
    require_writable("revoke_token_tree");
    schema::require_current("revoke_token_tree");
    let root = required(token_id, "token_id");
    check_text("reason", reason, limits::MAX_REASON_CHARS);
    let who = events::Client::current();
    let count = Spi::connect_mut(|client| {
        let mut members = tree(client, root);
        if members.is_empty() {
            fail(Kind::NoSuchToken, format!("token {root} does not exist"), None);
        }
        loop {
            spi(client.update(
                "SELECT 1 FROM token.tokens WHERE id OPERATOR(pg_catalog.=) ANY ($1) ORDER BY id FOR UPDATE",
                None,
                &[members.clone().into()],
            ));
            let again = tree(client, root);
            if again == members {
                break;
            }
            members = again;
        }
        let detail = format!("tree of {root}{}", reason.map(|r| format!(": {r}")).unwrap_or_default());
        let n: Option<i64> = spi(client
            .update(
                "WITH r AS (UPDATE token.tokens SET revoked_at = pg_catalog.clock_timestamp(), revoked_reason = $2 \
                            WHERE id OPERATOR(pg_catalog.=) ANY ($1) AND revoked_at IS NULL \
                            RETURNING id, account, prefix, hint, environment), \
                      e AS (INSERT INTO token.events (occurred_at, event, token_id, account, prefix, hint, environment, \
                                                      detail, client_addr, application_name, db_user, backend_pid) \
                            SELECT pg_catalog.clock_timestamp(), 'revoked', r.id, r.account, r.prefix, r.hint, \
                                   r.environment, $3, $4, $5, $6, $7 FROM r RETURNING 1) \
                 SELECT pg_catalog.count(*) FROM e",
                Some(1),
                &[
                    members.clone().into(),
                    reason.into(),
                    detail.as_str().into(),
                    who.addr.clone().into(),
                    who.application_name.clone().into(),
                    who.db_user.clone().into(),
                    who.pid.into(),
                ],
            )
            .and_then(|t| t.first().get_one()));
        n.unwrap_or(0)
    });
    if guc::LOG_EVENTS.get() {
        error::log_server_only(format!(
            "pg_token: revoked {count} tokens of the tree of {root} user={}",
            who.db_user.as_deref().unwrap_or("?")
        ));
    }
    count
}
