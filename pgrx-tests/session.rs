//! token.authenticate and the accessors policies read.

#[pgrx::pg_schema]
mod tests {
    use super::super::fixture::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn unauthenticated_accessors_deny_by_default() {
        assert_eq!(one::<bool>("SELECT token.current_account() IS NULL AND token.current_token_id() IS NULL \
            AND token.current_key_type() IS NULL AND token.current_scopes() IS NULL \
            AND token.current_identity() IS NULL AND NOT token.has_scope('read')"), Some(true));
    }

    #[pg_test]
    fn authenticate_binds_the_identity() {
        registry();
        let t = issue("acme", "agent", "scopes => '{read}'");
        assert_eq!(one::<String>(&format!("SELECT account FROM token.authenticate({})", lit(&t.token))).as_deref(), Some("acme"));
        assert_eq!(one::<String>("SELECT token.current_account()").as_deref(), Some("acme"));
        assert_eq!(one::<String>("SELECT token.current_token_id()::text").as_deref(), Some(t.id.as_str()));
        assert_eq!(one::<String>("SELECT token.current_key_type()").as_deref(), Some("agent"));
        assert_eq!(one::<bool>("SELECT token.has_scope('read') AND NOT token.has_scope('write') AND token.current_scopes() = '{read}'"), Some(true));
        assert_eq!(one::<String>("SELECT (token.current_identity()).account").as_deref(), Some("acme"));
    }

    #[pg_test]
    fn typed_accessors_read_uuid_and_bigint_accounts() {
        registry();
        let u = issue("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "agent", "");
        run(&format!("SELECT token.authenticate({})", lit(&u.token)));
        assert_eq!(one::<bool>("SELECT token.current_account_uuid() = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AND token.current_account_bigint() IS NULL"), Some(true));
        let n = issue("4242", "agent", "");
        run(&format!("SELECT token.authenticate({})", lit(&n.token)));
        assert_eq!(one::<bool>("SELECT token.current_account_bigint() = 4242 AND token.current_account_uuid() IS NULL"), Some(true));
    }

    #[pg_test]
    fn a_second_authenticate_replaces_the_first() {
        registry();
        let a = issue("acme", "agent", "");
        let b = issue("globex", "agent", "");
        run(&format!("SELECT token.authenticate({})", lit(&a.token)));
        run(&format!("SELECT token.authenticate({})", lit(&b.token)));
        assert_eq!(one::<String>("SELECT token.current_account()").as_deref(), Some("globex"));
    }

    #[pg_test]
    fn a_failed_authenticate_leaves_the_identity_alone() {
        registry();
        let a = issue("acme", "agent", "");
        run(&format!("SELECT token.authenticate({})", lit(&a.token)));
        assert_fails(&format!("SELECT token.authenticate({})", lit(&forged("tst-"))), "28000", "not_found");
        assert_eq!(one::<String>("SELECT token.current_account()").as_deref(), Some("acme"));
    }

    #[pg_test]
    fn a_rolled_back_savepoint_undoes_its_authenticate() {
        registry();
        let a = issue("acme", "agent", "");
        let b = issue("globex", "agent", "");
        run(&format!("SELECT token.authenticate({})", lit(&a.token)));
        // error_of runs in a subtransaction: authenticate as globex, then fail, then roll back.
        let sql = format!("SELECT token.authenticate({}), 1/0", lit(&b.token));
        assert!(error_of(&sql).unwrap_or_default().starts_with("22012"));
        assert_eq!(one::<String>("SELECT token.current_account()").as_deref(), Some("acme"));
    }

    #[pg_test]
    fn settings_cannot_forge_the_identity() {
        registry();
        let a = issue("acme", "agent", "");
        run(&format!("SELECT token.authenticate({})", lit(&a.token)));
        for (sql, setting) in [
            ("SET token.account = 'globex'", "token.account"),
            ("SET token.current_account = 'globex'", "token.current_account"),
            ("SELECT set_config('token.current_account', 'globex', false)", "token.current_account"),
            ("SELECT set_config('request.jwt.claim.sub', 'globex', false)", "request.jwt.claim.sub"),
        ] {
            // The attempt either fails, or really puts the forged value in place...
            let forged = error_of(sql).is_some()
                || one::<String>(&format!("SELECT current_setting('{setting}', true)")).as_deref() == Some("globex");
            assert!(forged, "{sql} neither failed nor took effect");
            // ...and either way the identity is the one the token proved.
            assert_eq!(one::<String>("SELECT token.current_account()").as_deref(), Some("acme"), "{sql}");
        }
    }
}
