//! Keeps tokens out of the server log, whatever wrote the line.
//!
//! An `emit_log_hook` sees every message before it is written. It masks token-shaped text
//! (`redact`) in the message, detail, hint, context and internal query, in place, and hides
//! the STATEMENT line when the statement holds a token (an application that put a token in a
//! literal rather than a bind parameter, then hit an error; or `log_statement = 'all'`). The
//! client receives the same masked text, which costs it nothing: it has the token.
//!
//! This hook must never raise, allocate, or take a lock: it runs inside error reporting, in
//! every process. What counts as token-shaped is decided by the core (`redact`); change it
//! there, with its tests.

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
        }
        if let Some(prev) = PREV_EMIT_LOG_HOOK {
            prev(edata);
        }
    }
}
