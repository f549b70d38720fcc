//! The one error map: Postgres' own errors inside pg_token's statements keep their SQLSTATE,
//! and the `token.` settings prefix is reserved.

#[pgrx::pg_schema]
mod tests {
    use super::super::fixture::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn a_constraint_failing_inside_generate_keeps_its_sqlstate() {
        registry();
        // A DBA's own constraint on the token table: the INSERT inside generate_token fails
        // as Postgres raised it (23514), not as an internal error.
        run("ALTER TABLE token.tokens ADD CONSTRAINT tests_no_blocked CHECK (account <> 'blocked')");
        assert_fails("SELECT token.generate_token('blocked', 'agent')", "23514", "tests_no_blocked");
        assert_eq!(token_rows(), 0, "nothing half-written");
    }

    #[pg_test]
    fn misspelt_token_settings_are_refused_not_kept_as_placeholders() {
        if one::<i32>("SELECT current_setting('server_version_num')::int") < Some(150000) {
            // PostgreSQL 14 has no reserved prefixes: EmitWarningsOnPlaceholders only warns
            // about the ones present when the library loads (tests/e2e/test_errors.py).
            run("SET LOCAL token.enviroment = 'prod'");
        } else {
            // MarkGUCPrefixReserved("token"): only settings pg_token defines may use the prefix.
            assert_fails("SET token.enviroment = 'prod'", "42602", "token.enviroment");
            assert_fails("SELECT set_config('token.anything', 'x', true)", "42602", "token.anything");
        }
        assert_eq!(one::<String>("SELECT current_setting('token.environment')").as_deref(), Some("dev"));
    }
}
