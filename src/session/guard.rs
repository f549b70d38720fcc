//! What a pooled connection may carry from one identity to the next. Behind a transaction
//! pooler one server connection serves many clients in turn; the identity ends with each
//! transaction, but two kinds of session state outlive it and could show one tenant's rows to
//! the next:
//! - temporary objects: a temporary view named like an application table shadows it for
//!   unqualified queries (pg_temp is searched first), and a function behind it can copy every
//!   row the next tenant reads;
//! - WITH HOLD cursors: materialized at COMMIT under the identity of the transaction that
//!   declared them, fetchable after it ends.
//!
//! The defence: no WITH HOLD cursor and an identity ever share a transaction. Once a
//! transaction has called `authenticate`, `DECLARE ... WITH HOLD` fails (55000); and
//! `authenticate` refuses (`tainted_session`) while any WITH HOLD cursor is open (declared
//! earlier in this transaction or held from an earlier one), or while the connection carries
//! temporary objects, unless its previous transaction was authenticated as the same account.
//! (Refusing at COMMIT instead does not work: PostgreSQL persists held cursors before the
//! pre-commit callbacks run, and an abort then keeps them.) The README's application-role recipe
//! also revokes TEMP from the application role.
//!
//! Declared cursors are seen through a ProcessUtility hook (chained); temporary objects through
//! the backend's temporary namespace and pg_depend, read only when that namespace exists.

use std::cell::{Cell, RefCell};
use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::{self, Error, Kind};

thread_local! {
    /// WITH HOLD cursors declared in this session (pruned once their portal is gone).
    static HOLDABLE: RefCell<Vec<CString>> = const { RefCell::new(Vec::new()) };
    /// Whether the current transaction has called authenticate.
    static AUTHENTICATED: Cell<bool> = const { Cell::new(false) };
    /// The account the connection's previous transaction was authenticated as, if any.
    static LAST_ACCOUNT: RefCell<Option<String>> = const { RefCell::new(None) };
}

static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

pub fn install_hook() {
    // SAFETY: _PG_init runs once per process; the previous hook is chained.
    unsafe {
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: Postgres passes a valid PlannedStmt; a DeclareCursorStmt's portal name is a
    // NUL-terminated string. The statement is handed on unchanged.
    unsafe {
        let stmt = (*pstmt).utilityStmt;
        if !stmt.is_null() && (*stmt).type_ == pg_sys::NodeTag::T_DeclareCursorStmt {
            let declare = stmt.cast::<pg_sys::DeclareCursorStmt>();
            if (*declare).options & pg_sys::CURSOR_OPT_HOLD as i32 != 0 && !(*declare).portalname.is_null() {
                if AUTHENTICATED.with(Cell::get) {
                    Error::new(Kind::WrongState, "a transaction that called token.authenticate cannot declare a WITH HOLD cursor")
                        .hint("A held cursor outlives the identity whose rows it reads; declare it without HOLD.")
                        .raise();
                }
                let name = std::ffi::CStr::from_ptr((*declare).portalname).to_owned();
                HOLDABLE.with(|h| h.borrow_mut().push(name));
            }
        }
        match PREV_PROCESS_UTILITY {
            Some(prev) => prev(pstmt, query, read_only_tree, context, params, env, dest, qc),
            None => pg_sys::standard_ProcessUtility(pstmt, query, read_only_tree, context, params, env, dest, qc),
        }
    }
}

fn portal_exists(name: &CString) -> bool {
    // SAFETY: a lookup in this backend's portal table by a NUL-terminated name.
    !unsafe { pg_sys::GetPortalByName(name.as_ptr()) }.is_null()
}

/// The current transaction has bound an identity: no WITH HOLD cursor from here on.
pub fn authenticated() {
    AUTHENTICATED.with(|a| a.set(true));
}

/// When a transaction ends: remember who it was authenticated as and forget cursors that are
/// gone.
pub fn at_end(account: Option<String>) {
    AUTHENTICATED.with(|a| a.set(false));
    LAST_ACCOUNT.with(|l| *l.borrow_mut() = account);
    HOLDABLE.with(|h| h.borrow_mut().retain(portal_exists));
}

/// Why `account` may not be bound on this connection now, or None.
pub fn taint_for(account: &str) -> Option<String> {
    let held = HOLDABLE.with(|h| h.borrow().iter().find(|n| portal_exists(n)).cloned());
    if let Some(name) = held {
        return Some(format!("the WITH HOLD cursor \"{}\" is open on this connection", name.to_string_lossy()));
    }
    let mut temp = pg_sys::InvalidOid;
    let mut toast = pg_sys::InvalidOid;
    // SAFETY: reads this backend's temporary namespace, InvalidOid until one is made.
    unsafe { pg_sys::GetTempNamespaceState(&mut temp, &mut toast) };
    if temp == pg_sys::InvalidOid {
        return None;
    }
    let has_objects = error::spi(Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_depend \
                         WHERE refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_namespace'::pg_catalog.regclass \
                           AND refobjid OPERATOR(pg_catalog.=) $1)",
        &[temp.into()],
    ));
    if has_objects != Some(true) {
        return None;
    }
    let same = LAST_ACCOUNT.with(|l| l.borrow().as_deref() == Some(account));
    (!same).then(|| "the connection carries temporary objects made outside a transaction of this account".to_owned())
}
