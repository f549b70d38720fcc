//! Every `token.*` setting, registered once from `_PG_init`. Anything that changes what is
//! accepted, written or kept is superuser-only (`Suset`), so an application role can neither
//! move its database to another environment nor switch off its own audit trail.
//!
//! The `token.` prefix is reserved once all settings are defined, so a misspelt
//! `token.enviroment` in postgresql.conf is a WARNING when the library loads (and an error when
//! SET), never a silent placeholder. A new setting goes here, with a description, a safe
//! default and the right context, and into the README's configuration table.

use std::ffi::CString;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

pub static ENVIRONMENT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static LAST_USED_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);
pub static CACHE_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(8 * 1024);
pub static SHARED_CACHE_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
pub static SHARED_CACHE: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static LOG_EVENTS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static EVENT_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(90 * 24 * 3600);
pub static MIN_EVENT_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(30 * 24 * 3600);
pub static MAX_EVENT_ROWS: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static EVENT_WINDOW_S: GucSetting<i32> = GucSetting::<i32>::new(60);
pub static MAX_EVENT_HINTS: GucSetting<i32> = GucSetting::<i32>::new(10);
pub static FLOOD_NICE: GucSetting<i32> = GucSetting::<i32>::new(10);
pub static TEST_COMMIT_PUBLISH_DELAY_MS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static MAX_REFUSAL_RATE: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static WORKER_IDLE_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(2000);
pub static MAX_TOKEN_DEPTH: GucSetting<i32> = GucSetting::<i32>::new(3);
pub static MAX_CHILD_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static JWT_LEEWAY_S: GucSetting<i32> = GucSetting::<i32>::new(30);
pub static LEGACY_NOTICE: GucSetting<LegacyNotice> = GucSetting::<LegacyNotice>::new(LegacyNotice::Notice);

/// `token.legacy_notice`: what an accepted legacy JWT tells the client besides its row.
#[derive(pgrx::PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum LegacyNotice {
    #[name = c"off"]
    Off,
    #[name = c"notice"]
    Notice,
    #[name = c"warning"]
    Warning,
}

pub fn register() {
    define();
    // SAFETY: called from _PG_init after every token.* setting is defined; the prefix is a
    // static NUL-terminated string.
    #[cfg(feature = "pg14")]
    unsafe {
        pgrx::pg_sys::EmitWarningsOnPlaceholders(c"token".as_ptr())
    };
    // SAFETY: as above.
    #[cfg(not(feature = "pg14"))]
    unsafe {
        pgrx::pg_sys::MarkGUCPrefixReserved(c"token".as_ptr())
    };
}

fn define() {
    GucRegistry::define_int_guc(
        c"token.jwt_leeway",
        c"Seconds of clock skew allowed on a legacy JWT's exp and nbf claims.",
        c"A legacy JWT is refused as expired at exp plus this, and before nbf minus this.",
        &JWT_LEEWAY_S,
        0,
        300,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_enum_guc(
        c"token.legacy_notice",
        c"What the client is sent for every accepted legacy JWT: off, notice or warning.",
        c"The identity's deprecation and sunset_at columns carry the same information. A NOTICE \
          reaches the client (psql shows it) and, at the default log_min_messages, not the server \
          log; a WARNING reaches both (one log line per accepted JWT).",
        &LEGACY_NOTICE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"token.environment",
        c"The environment this database serves (e.g. dev, stage, prod).",
        c"A token whose prefix is registered for another environment is refused with \
          environment_mismatch, before any lookup. Unset refuses every token.",
        &ENVIRONMENT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"token.max_token_depth",
        c"How many levels of derived tokens derive_token may make below a token made otherwise.",
        c"A derived token's parent may itself be derived, down to this depth (1: children only).",
        &MAX_TOKEN_DEPTH,
        1,
        16,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"token.max_child_tokens",
        c"How many live tokens derive_token may make from one parent.",
        c"Revoked and expired children do not count.",
        &MAX_CHILD_TOKENS,
        1,
        100_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"token.last_used_interval",
        c"Minimum seconds between two last_used_at updates of one token (-1 disables them).",
        c"Updates are queued to a background worker, so a validation never writes or waits.",
        &LAST_USED_INTERVAL,
        -1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"token.cache_size",
        c"Memory for each backend's validation cache (0 disables it).",
        c"An entry is dropped when its token changes, and every entry when a key type or prefix does.",
        &CACHE_SIZE_KB,
        0,
        i32::MAX / 1024,
        GucContext::Suset,
        GucFlags::UNIT_KB,
    );
    // A postmaster setting can only be defined while shared_preload_libraries loads us (else
    // Postgres raises): without the preload there is no shared memory to size anyway.
    // SAFETY: reads a flag Postgres sets while it loads the preload libraries.
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        define_shared_cache_size();
    }
    GucRegistry::define_bool_guc(
        c"token.shared_cache",
        c"Look tokens up in, and add them to, the shared validation cache.",
        c"Off: a token this backend has not cached is read from the table (for measurements).",
        &SHARED_CACHE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"token.log_events",
        c"Also write each security event to the server log.",
        c"Events are always recorded in token.events; this adds one LOG line each.",
        &LOG_EVENTS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"token.event_retention",
        c"How long token.events keeps a row before the worker purges it (0 keeps forever).",
        c"",
        &EVENT_RETENTION_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"token.min_event_retention",
        c"Events younger than this can be purged only by a superuser.",
        c"purge_events() refuses a token_admin below it (42501), and the writer never purges below it.",
        &MIN_EVENT_RETENTION_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"token.max_event_rows",
        c"At most this many new refusal rows per second per database; the rest is counted into overflow rows.",
        c"Whatever the traffic, refusals cost at most this many rows (and log lines) a second; every refusal is still counted.",
        &MAX_EVENT_ROWS,
        0,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"token.event_window",
        c"How long one refusal row collects the repeats of its key before a new row starts.",
        c"",
        &EVENT_WINDOW_S,
        1,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"token.max_event_hints",
        c"Distinct token hints one source may make in a window before its refusals are counted in one row without a hint.",
        c"A source is a reason, prefix, environment, client address, database user and application name.",
        &MAX_EVENT_HINTS,
        1,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"token.flood_nice",
        c"The CPU niceness a backend gives itself once it refuses over 1,000 tokens in a second (0: never).",
        c"Lowers the priority of a connection flooding garbage tokens so that other work keeps the CPU; it cannot be raised back, so it lasts until the connection ends.",
        &FLOOD_NICE,
        0,
        19,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"token.test_commit_publish_delay",
        c"For tests only: how long a committing change waits between becoming visible and telling caches (0: not at all).",
        c"Holds the window the change log closes open, so that tests can show no cache answers from before the commit in it. Never set it in production.",
        &TEST_COMMIT_PUBLISH_DELAY_MS,
        0,
        10_000,
        GucContext::Suset,
        GucFlags::UNIT_MS | GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_int_guc(
        c"token.max_refusal_rate",
        c"Refusals per second one backend may make before each further refusal waits (0: no limit).",
        c"A tarpit for floods of garbage tokens: past a burst of this many, a backend's refusals are \
          spaced so that it refuses at most this many a second. Accepted tokens never wait; the wait \
          ends at once on a cancel or a statement timeout. Per server connection: behind a pooler, \
          every client of that connection shares it.",
        &MAX_REFUSAL_RATE,
        0,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"token.worker_idle_timeout",
        c"How long an idle event writer stays connected to its database before exiting.",
        c"Short, so that DROP DATABASE is not held up; the writer restarts on demand.",
        &WORKER_IDLE_TIMEOUT_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

/// The configured environment, or `None` when unset or empty.
pub fn environment() -> Option<String> {
    ENVIRONMENT
        .get()
        .and_then(|c| c.into_string().ok())
        .filter(|s| !s.is_empty())
}

/// Runs `f` with the configured environment borrowed from the setting's own storage (no copy:
/// this is on every validation's path), or `None` when unset or empty.
pub fn with_environment<R>(f: impl FnOnce(Option<&str>) -> R) -> R {
    // SAFETY: the pointer is the GUC's current value, owned by the GUC machinery and replaced
    // only when the setting changes (SET, RESET, a reload, the end of a function's SET scope),
    // none of which can happen while `f` runs: callers only judge tokens in it, no SQL.
    let raw = unsafe { *ENVIRONMENT.as_ptr() };
    let value = if raw.is_null() {
        None
    } else {
        // SAFETY: a non-null GUC string value is a valid NUL-terminated C string.
        unsafe { std::ffi::CStr::from_ptr(raw) }.to_str().ok().filter(|s| !s.is_empty())
    };
    f(value)
}

/// The refusal-counting limits, from the settings above.
pub fn event_limits() -> pg_token_core::aggregate::Limits {
    pg_token_core::aggregate::Limits {
        window_us: i64::from(EVENT_WINDOW_S.get()) * 1_000_000,
        max_rows_per_s: u32::try_from(MAX_EVENT_ROWS.get()).unwrap_or(0),
        max_hints: u32::try_from(MAX_EVENT_HINTS.get()).unwrap_or(1),
    }
}

pub fn cache_budget_bytes() -> usize {
    usize::try_from(CACHE_SIZE_KB.get()).unwrap_or(0) * 1024
}

/// `token.shared_cache_size` in bytes.
pub fn shared_cache_bytes() -> usize {
    usize::try_from(SHARED_CACHE_SIZE_KB.get()).unwrap_or(0) * 1024
}

fn define_shared_cache_size() {
    GucRegistry::define_int_guc(
        c"token.shared_cache_size",
        c"Shared memory for the validation cache all backends share (0 disables it).",
        c"464 bytes a token; needs shared_preload_libraries and a restart. Standbys do not use it.",
        &SHARED_CACHE_SIZE_KB,
        0,
        i32::MAX,
        GucContext::Postmaster,
        GucFlags::UNIT_KB,
    );
}
