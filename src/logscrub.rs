//! Keeps tokens out of the server log, whatever wrote the line, and out of this backend's own
//! `pg_stat_activity` text.
//!
//! An `emit_log_hook` sees every message before it is written. It masks token-shaped text
//! (`redact`) in the message, detail, hint, context and internal query, in place, and hides
//! the STATEMENT line when the statement holds a token (an application that put a token in a
//! literal rather than a bind parameter, then hit an error; or `log_statement = 'all'`). A
//! statement registering or changing a legacy JWT issuer has every quoted literal of its log
//! lines masked (its key or HS256 secret may be any of them) and its STATEMENT hidden. The
//! client receives the same masked text, which costs it nothing: it has the token.
//!
//! This hook must never raise, allocate, or take a lock: it runs inside error reporting, in
//! every process. What counts as token-shaped is decided by the core (`redact`); change it
//! there, with its tests.

use std::cell::Cell;
use std::ffi::c_char;

use pgrx::pg_sys;

use pg_token_core::redact;

static mut PREV_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;

pub fn install_hook() {
    // SAFETY: _PG_init runs once per process; the previous hook is chained.
    unsafe {
        PREV_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(scrub);
    }
}

/// Masks a NUL-terminated string where it lies (masking never changes its length).
unsafe fn mask(s: *mut c_char) {
    if s.is_null() {
        return;
    }
    // SAFETY: `s` is a NUL-terminated string owned by the error data being emitted.
    unsafe {
        let len = std::ffi::CStr::from_ptr(s).to_bytes().len();
        redact::mask_tokens(std::slice::from_raw_parts_mut(s.cast::<u8>(), len));
    }
}

/// Masks every quoted literal of a NUL-terminated string where it lies.
unsafe fn mask_all_literals(s: *mut c_char) {
    if s.is_null() {
        return;
    }
    // SAFETY: as in `mask`.
    unsafe {
        let len = std::ffi::CStr::from_ptr(s).to_bytes().len();
        redact::mask_literals(std::slice::from_raw_parts_mut(s.cast::<u8>(), len));
    }
}

unsafe fn names_key_material(s: *const c_char) -> bool {
    // SAFETY: `s` is null or a NUL-terminated string.
    !s.is_null() && redact::names_key_material(unsafe { std::ffi::CStr::from_ptr(s) }.to_bytes())
}

unsafe fn holds_token(s: *const c_char) -> bool {
    // SAFETY: `s` is null or a NUL-terminated string.
    !s.is_null() && redact::contains_token(unsafe { std::ffi::CStr::from_ptr(s) }.to_bytes())
}

/// pg_token's own event lines carry who and what; the statement would only double them.
unsafe fn is_event_line(e: &pg_sys::ErrorData) -> bool {
    // SAFETY: `message` is null or NUL-terminated.
    e.elevel == pg_sys::LOG_SERVER_ONLY as i32
        && !e.message.is_null()
        && unsafe { std::ffi::CStr::from_ptr(e.message) }.to_bytes().starts_with(b"pg_token: ")
}

unsafe extern "C-unwind" fn scrub(edata: *mut pg_sys::ErrorData) {
    // SAFETY: Postgres passes the ErrorData being emitted; its strings are writable copies
    // in ErrorContext. debug_query_string is null or the current statement's text.
    unsafe {
        if let Some(e) = edata.as_mut() {
            mask(e.message);
            mask(e.detail);
            mask(e.detail_log);
            mask(e.hint);
            mask(e.context);
            mask(e.internalquery);
            if holds_token(pg_sys::debug_query_string) || is_event_line(e) {
                e.hide_stmt = true;
            }
            // register_legacy_issuer / alter_legacy_issuer carry a secret or key in a literal or
            // a bind parameter: every literal of the statement's log lines is masked.
            if names_key_material(pg_sys::debug_query_string) || names_key_material(e.message) {
                mask_all_literals(e.message);
                mask_all_literals(e.detail);
                mask_all_literals(e.detail_log);
                e.hide_stmt = true;
            }
        }
        if let Some(prev) = PREV_EMIT_LOG_HOOK {
            prev(edata);
        }
    }
}

thread_local! {
    /// The statement whose activity text was last checked: (its text's address, its start).
    static CHECKED: Cell<(usize, i64)> = const { Cell::new((0, 0)) };
}

/// Masks tokens in this backend's `pg_stat_activity.query`, once per statement, when the
/// statement text holds any: an application that put a token in a literal
/// (`SELECT token.authenticate('cfprd-...')`, common with client libraries that interpolate)
/// would otherwise leave it readable by other sessions of the same role and by monitoring roles,
/// even after the query ends. Called by every entry point that is handed a token. Costs one
/// comparison per call after the first of a statement.
pub fn scrub_activity() {
    // SAFETY: debug_query_string is null or the current statement's NUL-terminated text; the
    // statement start is a plain read.
    let (text, started) = unsafe { (pg_sys::debug_query_string, pg_sys::GetCurrentStatementStartTimestamp()) };
    if text.is_null() {
        return;
    }
    let key = (text as usize, started);
    if CHECKED.with(|c| c.replace(key)) == key {
        return;
    }
    // SAFETY: non-null, NUL-terminated (above).
    let bytes = unsafe { std::ffi::CStr::from_ptr(text) }.to_bytes();
    if !redact::contains_token(bytes) {
        return;
    }
    let mut masked = Vec::with_capacity(bytes.len() + 1);
    masked.extend_from_slice(bytes);
    redact::mask_tokens(&mut masked);
    masked.push(0);
    // SAFETY: the documented way to set this backend's activity text; it copies the string
    // (cut to track_activity_query_size, after masking, so no cut token can stay readable).
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, masked.as_ptr().cast()) };
}
