//! Usage-cap reservations, written by the event writer: a block of uses subtracted from
//! `token.tokens.uses_remaining` in the writer's own committed transaction before any backend
//! spends it (`pg_token_core::uses` says why), so a use is never granted without being counted,
//! whatever the caller's transaction or the server does next.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::PgBuiltInOids;

use pg_token_core::uses::{self, Reserved};

use super::plans::{prepared, still_installed, Plans};
use crate::error;

/// Reserves blocks of uses, one per requested token: what is left (refilled first when the
/// refill is due: reset to refill_uses, from now) minus the block, committed before any backend
/// spends a use of it. Only for the cap's version the backend saw; a token without a cap (at
/// that version) returns no row. Waits for an administrator holding the row (a use must not be
/// granted without being subtracted).
pub(super) const RESERVE_USES: &str = "WITH r AS ( \
         SELECT u.id, u.version, u.want \
           FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.uuid[]), pg_catalog.unnest($2::pg_catalog.int8[]), \
                           pg_catalog.unnest($3::pg_catalog.int8[])) AS u(id, version, want)), \
     cur AS ( \
         SELECT t.id, r.want, \
                (t.refill_interval IS NOT NULL AND \
                 (t.refilled_at OPERATOR(pg_catalog.+) t.refill_interval) OPERATOR(pg_catalog.<=) pg_catalog.now()) AS due \
           FROM token.tokens t JOIN r ON t.id OPERATOR(pg_catalog.=) r.id AND t.uses_version OPERATOR(pg_catalog.=) r.version \
          WHERE t.uses_remaining IS NOT NULL \
            FOR NO KEY UPDATE OF t), \
     nxt AS ( \
         SELECT cur.id, cur.want, \
                CASE WHEN cur.due THEN t.refill_uses ELSE t.uses_remaining END AS have, \
                CASE WHEN cur.due THEN pg_catalog.now() ELSE t.refilled_at END AS refilled \
           FROM cur JOIN token.tokens t ON t.id OPERATOR(pg_catalog.=) cur.id) \
     UPDATE token.tokens t \
        SET uses_remaining = nxt.have OPERATOR(pg_catalog.-) LEAST(nxt.want, nxt.have), refilled_at = nxt.refilled \
       FROM nxt WHERE t.id OPERATOR(pg_catalog.=) nxt.id \
     RETURNING t.id, LEAST(nxt.want, nxt.have), t.uses_remaining, \
               (t.refilled_at OPERATOR(pg_catalog.+) t.refill_interval)";

/// Reserves the requested blocks in one transaction; every request gets an answer (None for a
/// token with no cap at the version asked about).
pub(super) fn reserve_uses(plans: &mut Plans, requests: &[uses::Request]) -> Vec<(uses::Request, Option<Reserved>)> {
    Spi::connect_mut(|client| {
        let mut answers: Vec<(uses::Request, Option<Reserved>)> = requests.iter().map(|r| (*r, None)).collect();
        if requests.is_empty() || !still_installed(client, plans) {
            return answers;
        }
        let ids: Vec<Option<pgrx::Uuid>> = requests.iter().map(|r| Some(pgrx::Uuid::from_bytes(r.token_id))).collect();
        let versions: Vec<Option<i64>> = requests.iter().map(|r| Some(r.version)).collect();
        let wants: Vec<Option<i64>> = requests.iter().map(|r| Some(r.want)).collect();
        let args = [ids.into(), versions.into(), wants.into()];
        let types = [PgBuiltInOids::UUIDARRAYOID, PgBuiltInOids::INT8ARRAYOID, PgBuiltInOids::INT8ARRAYOID];
        let Some(plan) = prepared(client, &mut plans.reserve_uses, RESERVE_USES, &types) else { return answers };
        let rows = error::spi_or(client.update(plan, None, &args), "pg_token writer could not reserve uses");
        for row in rows {
            let id: Option<pgrx::Uuid> = row.get(1).ok().flatten();
            let granted: Option<i64> = row.get(2).ok().flatten();
            let remaining: Option<i64> = row.get(3).ok().flatten();
            let refill: Option<TimestampWithTimeZone> = row.get(4).ok().flatten();
            let Some(id) = id else { continue };
            // SAFETY: a TimestampTz datum is its i64 value.
            let refill_at = refill.and_then(|t| t.into_datum()).map_or(0, |d| d.value() as i64);
            if let Some(a) = answers.iter_mut().find(|(r, _)| r.token_id == *id.as_bytes()) {
                a.1 = Some(Reserved { granted: granted.unwrap_or(0), remaining: remaining.unwrap_or(0), refill_at });
            }
        }
        answers
    })
}

