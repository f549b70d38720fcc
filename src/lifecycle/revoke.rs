//! Revocation: one token, or every live token of an account, effective for the very next
//! validation in every session (the cache triggers see to that).

use pgrx::prelude::*;

use super::{fail, required, require_writable, spi};
use crate::error::{self, Kind};
use crate::events::{self, Lifecycle};
use crate::guc;

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
        error::log_server_only(format!(
            "pg_token: revoked {count} tokens of account={account} user={}",
            who.db_user.as_deref().unwrap_or("?")
        ));
    }
    count
}

