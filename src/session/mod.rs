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
use pg_token_core::format;
use pg_token_core::reason::Reason;
use pg_token_core::verdict::{Refusal, Subject};

use crate::error;
use crate::events;
use crate::guc;
use crate::metrics;
use crate::store::Stored;
use crate::v1;
use crate::validation;

mod guard;

thread_local! {
    /// (transaction nesting level, identity); the last entry is the current identity.
    static STACK: RefCell<Vec<(i32, Rc<Stored>)>> = const { RefCell::new(Vec::new()) };
}

fn current() -> Option<Rc<Stored>> {
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
    let req = unsafe { validation::request(fcinfo) };
    let token = validation::judge_or_raise(req);
    if let Some(why) = guard::taint_for(&token.state.account) {
        let parsed = req.token.and_then(|t| format::split(t).ok());
        let refusal = Refusal {
            reason: Reason::TaintedSession,
            detail: why,
            subject: Subject {
                prefix: parsed.map(|p| p.prefix.to_owned()),
                hint: parsed.map(|p| p.hint()),
                token_id: Some(token.state.id),
                account: Some(token.state.account.clone()),
                key_type: Some(token.state.key_type.clone()),
                environment: Some(token.state.environment.clone()),
            },
            caller: None,
            database_environment: guc::environment(),
        };
        metrics::refused(refusal.reason);
        events::refused(&refusal);
        error::refuse(&refusal);
    }
    guard::authenticated();
    let level = nest_level();
    STACK.with(|s| {
        let mut s = s.borrow_mut();
        s.retain(|(l, _)| *l != level);
        s.push((level, Rc::clone(&token)));
    });
    token.identity_datum()
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
