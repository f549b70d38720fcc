//! In-database tests (`cargo pgrx test pg15`), grouped by capability, one behaviour each.
//!
//! Each test runs as a superuser in its own transaction, which is rolled back afterwards, in
//! a cluster with `token.environment = 'dev'`. What needs committed data or several sessions
//! (the cache across sessions, last_used_at, identity after COMMIT) is tested end to end in
//! `tests/`.

mod errors;
mod fixture;
mod formats_and_reasons;
mod hardening;
mod lifecycle;
mod trust;
mod session;
mod housekeeping;

pgrx::extension_sql!(
    r#"
    CREATE SCHEMA IF NOT EXISTS tests;
    GRANT USAGE ON SCHEMA tests TO PUBLIC;
    -- Runs a statement in a subtransaction; returns 'SQLSTATE: message', or NULL if it succeeded.
    CREATE FUNCTION tests.error_of(sql text) RETURNS text LANGUAGE plpgsql AS $fn$
    BEGIN
        EXECUTE sql;
        RETURN NULL;
    EXCEPTION WHEN others THEN
        RETURN SQLSTATE || ': ' || SQLERRM;
    END
    $fn$;
    "#,
    name = "test_helpers",
    requires = ["finalize"]
);
