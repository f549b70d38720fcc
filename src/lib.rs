//! pg_token: opaque, prefixed, instantly revocable API tokens inside PostgreSQL.
//!
//! Pure modules (no Postgres): `format`, `hash`, `reason`, `verdict`, `cache`, `redact`,
//! `account`. Edge modules: `store` (hot-path reads, caches, invalidation), `validate`,
//! `session` (RLS identity), `lifecycle` (issue, rotate, revoke, registry), `events`,
//! `queue` + `worker` (durable events and last_used_at), `logscrub`, `guc`.

pub mod account;
pub mod cache;
pub mod format;
pub mod hash;
pub mod reason;
pub mod redact;
pub mod verdict;

mod events;
mod guc;
mod lifecycle;
mod logscrub;
mod queue;
mod session;
mod store;
mod validate;
mod worker;

::pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::register();
    store::register_callbacks();
    session::register_callbacks();
    logscrub::install_hook();
    // SAFETY: reads a flag set by the postmaster while loading shared_preload_libraries.
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        queue::install_hooks();
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
