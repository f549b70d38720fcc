//! The token identity of the current transaction, for row-level-security policies.
//!
//! `token.authenticate(token)` validates (same rules and reasons as validate_token) and binds
//! the identity to the current transaction; the accessors read it. The identity lives only in
//! this backend's memory, never in a GUC or a table, so `SET`, `set_config` or any function a
//! token_validator can call cannot forge it: the only way in is a token that validates.
//!
//! It ends with the transaction (commit, rollback or PREPARE), which makes it safe behind a
//! transaction-pooling pgbouncer: the next client on this connection starts with none. A second
//! authenticate in the same transaction replaces the first. One made inside a savepoint that
//! is rolled back is undone with it (the previous identity, if any, comes back).
//!
//! Accessors are STABLE and PARALLEL RESTRICTED: parallel workers do not share this memory.
//!
//! A new accessor for policies goes here (and is granted to PUBLIC in `sql/finalize.sql`); it
//! must only read the bound identity, never bind one.

use std::cell::RefCell;
use std::rc::Rc;

use pgrx::prelude::*;

use pg_token_core::account;
use pg_token_core::reason::Reason;

use crate::datum::{palloc_copy, DatumBytes};
use crate::error;
use crate::store::Stored;
use crate::v1;
use crate::validation::{self, Origin, Purpose};

mod guard;

/// An identity bound by authenticate: the token, and the row authenticate returned when it
/// carried per-call figures (uses left, rate limit state), which current_identity repeats.
struct Bound {
    state_of: Rc<Stored>,
    row: Option<DatumBytes>,
}

impl Bound {
    fn identity_datum(&self) -> pg_sys::Datum {
        match &self.row {
            Some(row) => palloc_copy(row.as_bytes()),
            None => self.state_of.identity_datum(),
        }
    }
}

impl std::ops::Deref for Bound {
    type Target = Stored;
    fn deref(&self) -> &Stored {
        &self.state_of
    }
}

thread_local! {
    /// (transaction nesting level, identity); the last entry is the current identity.
    static STACK: RefCell<Vec<(i32, Rc<Bound>)>> = const { RefCell::new(Vec::new()) };
}

fn current() -> Option<Rc<Bound>> {
    STACK.with(|s| s.borrow().last().map(|(_, id)| Rc::clone(id)))
}

fn nest_level() -> i32 {
    // SAFETY: reads transaction state.
    unsafe { pg_sys::GetCurrentTransactionNestLevel() }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    if matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE) {
        let account = current().map(|id| id.state.account.clone());
        STACK.with(|s| s.borrow_mut().clear());
        guard::at_end(account);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    _sub: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    let level = nest_level();
    STACK.with(|s| {
        let mut s = s.borrow_mut();
        match event {
            SUBXACT_EVENT_ABORT_SUB => s.retain(|(l, _)| *l < level),
            SUBXACT_EVENT_COMMIT_SUB => {
                // The child's identity becomes the parent's, replacing the parent's own.
                if s.last().is_some_and(|(l, _)| *l == level) {
                    if let Some((_, id)) = s.pop() {
                        s.retain(|(l, _)| *l < level - 1);
                        s.push((level - 1, id));
                    }
                }
            }
            _ => {}
        }
    });
}

pub fn register_callbacks() {
    guard::install_hook();
    // SAFETY: documented registration API; callbacks never raise.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

v1::v1_function_info!(pg_finfo_pg_token_authenticate);
/// `token.authenticate(token, caller_token, required_scope) -> token.identity`: validates like
/// validate_token and binds the identity to the current transaction (replacing one bound
/// earlier at this nesting level).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pg_token_authenticate(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: called by Postgres as declared in sql/validation.sql.
    let req = unsafe { validation::request(fcinfo, 0) };
    authenticate(req, Origin::Connection)
}

v1::v1_function_info!(pg_finfo_pg_token_authenticate_from);
/// `token.authenticate_from(client_addr, token, ...)`: authenticate with the client address a
/// gateway states (token_gateway only, by grant).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pg_token_authenticate_from(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: called by Postgres as declared in sql/validation.sql.
    let (origin, req) = unsafe { (validation::stated_origin(fcinfo), validation::request(fcinfo, 1)) };
    authenticate(req, origin)
}

fn authenticate(req: pg_token_core::verdict::Request<'_>, origin: Origin) -> pg_sys::Datum {
    // A session that may not take this account's identity is refused before the token's rate
    // or uses are counted.
    let judged = validation::judge_with(req, origin, Purpose::Request, |token| {
        guard::taint_for(&token.state.account).map(|why| (Reason::TaintedSession, why))
    });
    let judged = match judged {
        Ok(j) => j,
        Err(r) => error::refuse(&r.refusal),
    };
    guard::authenticated();
    let row = (!judged.per_call.is_empty()).then(|| {
        let datum = judged.identity_datum();
        // SAFETY: a composite datum just built in this memory context (a whole varlena).
        let bytes = unsafe {
            let p = datum.cast_mut_ptr::<pg_sys::varlena>();
            std::slice::from_raw_parts(p.cast::<u8>(), pgrx::varlena::varsize_any(p)).to_vec()
        };
        DatumBytes::from_bytes(&bytes)
    });
    let bound = Rc::new(Bound { state_of: Rc::clone(&judged.token), row });
    let level = nest_level();
    STACK.with(|s| {
        let mut s = s.borrow_mut();
        s.retain(|(l, _)| *l != level);
        s.push((level, Rc::clone(&bound)));
    });
    bound.identity_datum()
}

/// An account id's one spelling, as pg_token stores and compares it: a decimal integer without
/// leading zeros, a uuid in lowercase 8-4-4-4-12 form, anything else as given. Applications
/// keying their own tables by account use it to agree with pg_token.
#[pg_extern(immutable, strict, parallel_safe)]
fn canonical_account(account: &str) -> String {
    account::canonical(account)
}

#[pg_extern(stable, parallel_restricted)]
fn current_account() -> Option<String> {
    current().map(|id| id.state.account.clone())
}

#[pg_extern(stable, parallel_restricted)]
fn current_account_uuid() -> Option<pgrx::Uuid> {
    current().and_then(|id| account::as_uuid(&id.state.account)).map(pgrx::Uuid::from_bytes)
}

#[pg_extern(stable, parallel_restricted)]
fn current_account_bigint() -> Option<i64> {
    current().and_then(|id| account::as_bigint(&id.state.account))
}

#[pg_extern(stable, parallel_restricted)]
fn current_token_id() -> Option<pgrx::Uuid> {
    current().map(|id| pgrx::Uuid::from_bytes(id.state.id))
}

#[pg_extern(stable, parallel_restricted)]
fn current_key_type() -> Option<String> {
    current().map(|id| id.state.key_type.clone())
}

#[pg_extern(stable, parallel_restricted)]
fn current_scopes() -> Option<Vec<String>> {
    current().map(|id| id.state.scopes.clone())
}

/// Whether the current identity carries `scope`; false when unauthenticated.
#[pg_extern(stable, parallel_restricted)]
fn has_scope(scope: Option<&str>) -> bool {
    match (current(), scope) {
        (Some(id), Some(scope)) => id.state.scopes.iter().any(|s| s == scope),
        _ => false,
    }
}

v1::v1_function_info!(pg_finfo_pg_token_current_identity);
/// `token.current_identity() -> token.identity`: the whole identity of the current
/// transaction, or NULL.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pg_token_current_identity(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    match current() {
        Some(id) => id.identity_datum(),
        // SAFETY: the live call's fcinfo, as declared in sql/validation.sql.
        None => unsafe { v1::return_null(fcinfo) },
    }
}
