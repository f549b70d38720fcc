//! The writer's prepared statements: made on first use, kept for the life of the process, and
//! forgotten when the extension they name is dropped.

use pgrx::spi::OwnedPreparedStatement;
use pgrx::{PgBuiltInOids, PgOid};

use crate::error;

/// The writer's statements, prepared on first use and kept for the life of the process.
#[derive(Default)]
pub(super) struct Plans {
    pub(super) write_refusals: Option<OwnedPreparedStatement>,
    pub(super) write_refusals_0_1: Option<OwnedPreparedStatement>,
    pub(super) apply_touches: Option<OwnedPreparedStatement>,
    pub(super) apply_touches_skipping_locked: Option<OwnedPreparedStatement>,
    pub(super) reserve_uses: Option<OwnedPreparedStatement>,
    pub(super) revoke_family: Option<OwnedPreparedStatement>,
}

pub(super) fn prepared<'p>(
    client: &pgrx::spi::SpiClient<'_>,
    plan: &'p mut Option<OwnedPreparedStatement>,
    sql: &str,
    args: &[PgBuiltInOids],
) -> Option<&'p OwnedPreparedStatement> {
    if plan.is_none() {
        let args: Vec<PgOid> = args.iter().map(|&o| PgOid::BuiltIn(o)).collect();
        match client.prepare_mut(sql, &args) {
            Ok(p) => *plan = Some(p.keep()),
            Err(e) => error::spi_or(Err(e), "pg_token writer could not prepare a statement"),
        }
    }
    plan.as_ref()
}

/// Whether the extension is still there to write into; if not (dropped meanwhile), the
/// records are consumed unwritten and the plans, which name its tables, are forgotten.
pub(super) fn still_installed(client: &pgrx::spi::SpiClient<'_>, plans: &mut Plans) -> bool {
    if extension_installed(client) {
        return true;
    }
    *plans = Plans::default();
    false
}

pub(super) fn extension_installed(client: &pgrx::spi::SpiClient<'_>) -> bool {
    client
        .select("SELECT 1 FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pg_token'", None, &[])
        .map(|t| !t.is_empty())
        .unwrap_or(false)
}

