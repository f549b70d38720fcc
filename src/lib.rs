//! pg_token: opaque, prefixed, instantly revocable API tokens inside PostgreSQL.
//!
//! The rules live in the pure core (`pg_token_core`, `src/core/`: token format, hashing,
//! verdicts, reasons, redaction, the cache structure), which cannot reach Postgres. This crate
//! is the edge, one module per capability:
//!
//! | module       | owns |
//! |--------------|------|
//! | `validation` | validate_token, check_token, hash_token, reasons, cache_stats |
//! | `session`    | authenticate and the identity accessors RLS policies read |
//! | `lifecycle`  | generate, derive, rotate, revoke, disable, update, leak reports |
//! | `registry`   | key types and prefixes |
//! | `store`      | the per-backend cache, its freshness, the hash-index scan |
//! | `events`     | event recording, the shared-memory queue, the writer, event SQL |
//! | `logscrub`   | the log hook that masks tokens, and the backend's activity text |
//! | `metrics`    | counters summed over backends, for monitoring |
//! | `quota`      | rate limits and usage caps, applied to accepted tokens |
//! | `tarpit`     | the wait that holds a flooding backend's refusals to `token.max_refusal_rate` |
//! | `guc`        | every `token.*` setting |
//! | `error`      | every SQLSTATE, from one map |
//! | `datum`, `v1`| composite rows kept as bytes; hand-declared V1 functions |
//!
//! `scripts/check_layout.py` (part of the test command) keeps it this way: no pgrx in the
//! core, no import cycle between these modules, no file past about 500 lines, and no
//! `ereport!` outside `error`.

mod datum;
mod error;
mod events;
mod guc;
mod legacy;
mod lifecycle;
mod logscrub;
mod metrics;
mod prepared;
mod quota;
mod registry;
mod schema;
mod session;
mod store;
mod tarpit;
mod v1;
mod validation;

::pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);
pgrx::extension_sql_file!("../sql/comments.sql", name = "comments", requires = ["finalize"]);

#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::register();
    store::freshness::register_callbacks();
    session::register_callbacks();
    logscrub::install_hook();
    // SAFETY: reads a flag set by the postmaster while loading shared_preload_libraries.
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        events::queue::init_shared_memory();
        metrics::init_shared_memory();
        quota::init_shared_memory();
        store::changes::init_shared_memory();
        store::shared::init_shared_memory();
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[path = "../pgrx-tests/mod.rs"]
mod in_database;

/// Settings for `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'pg_token'", "token.environment = 'dev'"]
    }
}
