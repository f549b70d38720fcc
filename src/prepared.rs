//! Statements the lifecycle functions run on every call, parsed and planned once per backend
//! and kept for its life (`SPI_keepplan`) instead of on every call. A rotation runs about ten
//! statements; parsing and planning them on every call was more than half of its CPU (1.7 ms
//! of backend CPU per rotation before, 0.8 ms after, same cluster).
//!
//! A kept plan stays right when the schema changes under it: Postgres' plan cache notices the
//! invalidation of any relation or function the statement names and analyzes the statement
//! again from its text (so DROP and CREATE EXTENSION in the same backend find the new tables).
//! The functions that use these run with a pinned `search_path` and name everything with its
//! schema, so a plan never depends on the caller's path.
//!
//! The text is the key: a statement built at run time is kept once per distinct text (build it
//! once, in a `OnceLock`). The parameter types are those of the call's arguments: a call with
//! other types than the kept plan's (the extension's own types get new OIDs when it is dropped
//! and created again) prepares the statement again rather than hand a datum of one type to a
//! plan made for another. The plan it replaces is left allocated (a few kB, once per
//! re-creation), since a caller up the stack may still be running it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::mem::ManuallyDrop;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, PgOid};
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};


struct Kept {
    plan: &'static OwnedPreparedStatement,
    types: Vec<pg_sys::Oid>,
}

thread_local! {
    // Never freed: a backend keeps a few dozen, and freeing them at process exit (when Rust
    // runs thread-local destructors) would call into a Postgres that is shutting down.
    static KEPT: ManuallyDrop<RefCell<HashMap<&'static str, Kept>>> = ManuallyDrop::new(RefCell::new(HashMap::new()));
}

/// Runs `sql` (a constant) with `args` from this backend's kept plan of it; the first call
/// prepares and keeps the plan. Like `SpiClient::update`, the statement sees what earlier ones
/// in the transaction wrote; unlike it, running one does not by itself assign a transaction id.
pub fn run<'conn>(
    client: &SpiClient<'conn>,
    sql: &'static str,
    limit: Option<libc::c_long>,
    args: &[DatumWithOid<'_>],
) -> SpiResult<SpiTupleTable<'conn>> {
    let types: Vec<pg_sys::Oid> = args.iter().map(DatumWithOid::oid).collect();
    // The map is not borrowed while the statement runs: a trigger it fires may run another.
    let kept = KEPT.with(|k| k.borrow().get(sql).map(|e| (e.plan, e.types == types)));
    let plan = match kept {
        Some((plan, true)) => plan,
        _ => {
            let oids: Vec<PgOid> = types.iter().map(|&o| PgOid::from(o)).collect();
            let plan: &'static OwnedPreparedStatement =
                Box::leak(Box::new(client.prepare_mut(sql, &oids)?.keep()));
            KEPT.with(|k| k.borrow_mut().insert(sql, Kept { plan, types }));
            plan
        }
    };
    client.select(plan, limit, args)
}
