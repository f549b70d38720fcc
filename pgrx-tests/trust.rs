//! Environments, key types that validate others, same-account checks, events and privileges.

#[pgrx::pg_schema]
mod tests {
    use super::super::fixture::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn prod_token_in_dev_is_refused_by_prefix_before_lookup() {
        registry();
        // Registered prefix, but the token's row lives in another (prod) database: there is no
        // row here at all, and the refusal still names the environments, not not_found.
        let foreign = forged("tstprd-");
        assert_eq!(reason(&lit(&foreign)).as_deref(), Some("environment_mismatch"));
        assert_fails(
            &format!("SELECT token.validate_token({})", lit(&foreign)),
            "28000",
            "Token environment mismatch: prod token used in dev",
        );
    }

    #[pg_test]
    fn dev_token_in_a_prod_database_is_refused() {
        registry();
        let t = issue("acme", "agent", "");
        run("SET LOCAL token.environment = 'prod'");
        assert_fails(&format!("SELECT token.validate_token({})", lit(&t.token)), "28000", "Token environment mismatch: dev token used in prod");
        assert_eq!(reason(&lit(&forged("tstprd-"))).as_deref(), Some("not_found"), "prod tokens are looked up in prod");
    }

    #[pg_test]
    fn unset_environment_refuses_everything_and_generates_nothing() {
        registry();
        let t = issue("acme", "agent", "");
        run("SET LOCAL token.environment = ''");
        assert_fails(&format!("SELECT token.validate_token({})", lit(&t.token)), "28000", "dev token used in (unset)");
        assert_fails("SELECT token.generate_token('acme', 'agent')", "55000", "token.environment is not set");
    }

    #[pg_test]
    fn rotation_is_refused_across_environments() {
        registry();
        let t = issue("acme", "agent", "");
        run("SET LOCAL token.environment = 'prod'");
        assert_fails(&format!("SELECT token.rotate_token('{}')", t.id), "55000", "belongs to environment \"dev\"");
    }

    #[pg_test]
    fn mid_key_validates_agent_keys_of_its_own_account() {
        registry();
        let mid = issue("acme", "mid", "");
        let agent = issue("acme", "agent", "scopes => '{read}'");
        assert_eq!(reason(&format!("{}, caller_token => {}", lit(&agent.token), lit(&mid.token))), None);
        let account = one::<String>(&format!("SELECT account FROM token.validate_token({}, {})", lit(&agent.token), lit(&mid.token)));
        assert_eq!(account.as_deref(), Some("acme"));
    }

    #[pg_test]
    fn cross_account_validation_is_refused() {
        registry();
        let mid = issue("acme", "mid", "");
        let other = issue("globex", "agent", "");
        let args = format!("{}, caller_token => {}", lit(&other.token), lit(&mid.token));
        assert_eq!(reason(&args).as_deref(), Some("cross_account"));
        assert_fails(&format!("SELECT token.validate_token({args})"), "28000", "token rejected: cross_account");
    }

    #[pg_test]
    fn key_type_without_the_capability_is_not_permitted() {
        registry();
        let agent = issue("acme", "agent", "");
        let mid = issue("acme", "mid", "");
        let cli = issue("acme", "cli", "");
        assert_eq!(reason(&format!("{}, caller_token => {}", lit(&mid.token), lit(&agent.token))).as_deref(), Some("caller_not_permitted"));
        assert_eq!(reason(&format!("{}, caller_token => {}", lit(&cli.token), lit(&mid.token))).as_deref(), Some("caller_not_permitted"));
    }

    #[pg_test]
    fn invalid_caller_is_refused_before_the_presented_token_is_judged() {
        registry();
        let mid = issue("acme", "mid", "");
        run(&format!("SELECT token.revoke_token('{}')", mid.id));
        // The presented token does not even exist; the caller's failure is what is reported.
        assert_eq!(reason(&format!("{}, caller_token => {}", lit(&forged("tst-")), lit(&mid.token))).as_deref(), Some("caller_invalid"));
        assert_fails(
            &format!("SELECT token.validate_token({}, {})", lit(&forged("tst-")), lit(&mid.token)),
            "28000",
            "token rejected: caller_invalid",
        );
    }

    #[pg_test]
    fn missing_scope_is_insufficient_scope() {
        registry();
        let t = issue("acme", "agent", "scopes => '{read}'");
        assert_eq!(reason(&format!("{}, required_scope => 'read'", lit(&t.token))), None);
        assert_eq!(reason(&format!("{}, required_scope => 'write'", lit(&t.token))).as_deref(), Some("insufficient_scope"));
    }

    #[pg_test]
    fn refusal_is_recorded_even_when_its_subtransaction_rolls_back() {
        registry();
        let t = issue("acme", "agent", "");
        run(&format!("SELECT token.revoke_token('{}')", t.id));
        // A source of its own: refusals are counted per source, and one that has made many
        // distinct hints in the window (other tests here) is folded into one row without them.
        run(&format!("SET LOCAL application_name = 'tests-{}'", t.id));
        // validate_token raises; error_of rolls its subtransaction back.
        assert!(error_of(&format!("SELECT token.validate_token({})", lit(&t.token))).is_some());
        assert_eq!(one::<bool>("SELECT token.flush_events()"), Some(true));
        let recorded = one::<i64>(&format!(
            "SELECT count(*) FROM token.events WHERE event = 'refused' AND reason = 'revoked' AND token_id = '{}' \
             AND hint = {} AND account = 'acme' AND environment = 'dev' AND db_user = current_user AND count = 1",
            t.id, lit(&t.token[..8])
        ));
        assert_eq!(recorded, Some(1));
    }

    #[pg_test]
    fn environment_mismatch_and_cross_account_are_recorded() {
        registry();
        let foreign = forged("tstprd-");
        let mid = issue("acme", "mid", "");
        let other = issue("globex", "agent", "");
        reason(&lit(&foreign));
        reason(&format!("{}, caller_token => {}", lit(&other.token), lit(&mid.token)));
        assert_eq!(one::<bool>("SELECT token.flush_events()"), Some(true));
        let mismatch = one::<i64>(&format!("SELECT count(*) FROM token.events WHERE reason = 'environment_mismatch' AND hint = {}", lit(&foreign[..11])));
        assert!(mismatch >= Some(1), "{mismatch:?}");
        let cross = one::<i64>(&format!(
            "SELECT count(*) FROM token.events WHERE reason = 'cross_account' AND token_id = '{}' AND caller_token_id = '{}'",
            other.id, mid.id
        ));
        assert_eq!(cross, Some(1));
    }

    #[pg_test]
    fn lifecycle_events_are_recorded_in_the_transaction() {
        registry();
        let t = issue("acme", "agent", "");
        run(&format!("SELECT token.rotate_token('{}')", t.id));
        run(&format!("SELECT token.revoke_token('{}')", t.id));
        let kinds = one::<String>(&format!("SELECT string_agg(event, ',' ORDER BY id) FROM token.events WHERE token_id = '{}'", t.id));
        assert_eq!(kinds.as_deref(), Some("generated,rotated,revoked"));
    }

    fn as_validator(sql: &str) -> Option<String> {
        run("SET LOCAL ROLE tests_validator");
        let e = error_of(sql);
        run("RESET ROLE");
        e
    }

    #[pg_test]
    fn a_validator_can_validate_and_nothing_else() {
        registry();
        let t = issue("acme", "agent", "");
        run("CREATE ROLE tests_validator NOLOGIN");
        run("GRANT token_validator TO tests_validator");
        assert_eq!(as_validator(&format!("SELECT token.validate_token({})", lit(&t.token))), None);
        assert_eq!(as_validator(&format!("SELECT token.check_token({})", lit(&t.token))), None);
        for sql in [
            "SELECT * FROM token.tokens".to_string(),
            "SELECT * FROM token.events".to_string(),
            "SELECT * FROM token.token_list".to_string(),
            "SELECT * FROM token.prefixes".to_string(),
            "SELECT token.generate_token('acme', 'agent')".to_string(),
            format!("SELECT token.rotate_token('{}')", t.id),
            format!("SELECT token.rotate_own_token({})", lit(&t.token)),
            format!("SELECT token.revoke_token('{}')", t.id),
            "SELECT token.revoke_account_tokens('acme')".to_string(),
            "SELECT token.create_key_type('evil')".to_string(),
            "SELECT token.register_prefix('evil-', 'agent', 'dev')".to_string(),
            "SELECT token.purge_events('0')".to_string(),
            "SET token.environment = 'prod'".to_string(),
            "SELECT set_config('token.environment', 'prod', false)".to_string(),
            "UPDATE token.tokens SET revoked_at = NULL".to_string(),
        ] {
            let e = as_validator(&sql).unwrap_or_default();
            assert!(e.starts_with("42501: "), "{sql} should be denied (42501), got {e:?}");
        }
    }

    #[pg_test]
    fn a_hostile_search_path_changes_nothing() {
        registry();
        run("CREATE SCHEMA evil");
        // Shadows that would let anything validate, or store and compare the wrong things.
        run("CREATE FUNCTION evil.byteaeq_always(bytea, bytea) RETURNS boolean LANGUAGE sql AS 'SELECT true'");
        run("CREATE OPERATOR evil.= (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = evil.byteaeq_always)");
        run("CREATE FUNCTION evil.texteq_always(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true'");
        run("CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.texteq_always)");
        run("CREATE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE sql AS $$ SELECT '1999-01-01'::timestamptz $$");
        run("CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT '1999-01-01'::timestamptz $$");
        run("CREATE TABLE evil.tokens (LIKE token.tokens)");
        let t = issue("acme", "agent", "");
        run("SET LOCAL search_path = evil, pg_catalog, token");
        assert_eq!(reason(&lit(&forged("tst-"))).as_deref(), Some("not_found"));
        assert_eq!(reason(&lit(&t.token)), None);
        let t2 = issue("acme", "agent", "");
        assert_eq!(one::<bool>(&format!("SELECT token.revoke_token('{}')", t2.id)), Some(true));
        assert_eq!(reason(&lit(&t2.token)).as_deref(), Some("revoked"));
        assert_eq!(reason(&lit(&t.token)), None, "revoking one token revoked nothing else");
        run(&format!("SELECT token.rotate_token('{}')", t.id));
        let rotated = one::<bool>(&format!("SELECT revoke_after > '2000-01-01' FROM token.tokens WHERE id = '{}'", t.id));
        assert_eq!(rotated, Some(true), "the grace deadline came from the real clock");
        assert_eq!(one::<i64>("SELECT count(*) FROM evil.tokens"), Some(0));
    }

    /// The pinned search_path is one defence; schema-qualifying every object in the SQL of the
    /// SECURITY DEFINER functions is the other, and this checks it alone: with the pin taken
    /// off (in this test's transaction only), every table, operator and clock function an
    /// unqualified name could reach is a shadow that would visibly change the outcome.
    #[pg_test]
    fn definer_functions_qualify_every_object_without_their_pinned_path() {
        registry();
        let bystander = issue("bystander", "agent", "");
        run("CREATE SCHEMA evil");
        for ddl in [
            "CREATE TABLE evil.tokens (LIKE token.tokens)",
            "CREATE TABLE evil.key_types (LIKE token.key_types)",
            "CREATE TABLE evil.prefixes (LIKE token.prefixes)",
            "CREATE TABLE evil.events (LIKE token.events)",
            "CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT '1999-01-01'::timestamptz $$",
            "CREATE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE sql AS $$ SELECT '1999-01-01'::timestamptz $$",
        ] {
            run(ddl);
        }
        for ty in ["bytea", "text", "uuid", "timestamptz", "interval"] {
            for (op, result) in [("=", "true"), ("<>", "false"), ("<", "true"), ("<=", "true"), (">", "true"), (">=", "true")] {
                let f = format!("evil.op_{}_{}", ty, op.bytes().map(|b| b.to_string()).collect::<Vec<_>>().join("_"));
                run(&format!("CREATE FUNCTION {f}({ty}, {ty}) RETURNS boolean LANGUAGE sql AS 'SELECT {result}'"));
                run(&format!("CREATE OPERATOR evil.{op} (LEFTARG = {ty}, RIGHTARG = {ty}, FUNCTION = {f})"));
            }
        }
        run("DO $$ DECLARE f regprocedure; BEGIN \
               FOR f IN SELECT p.oid FROM pg_proc p WHERE p.pronamespace = 'token'::regnamespace AND p.prosecdef LOOP \
                 EXECUTE format('ALTER FUNCTION %s RESET search_path', f); \
               END LOOP; END $$");
        assert_eq!(one::<i64>("SELECT count(*) FROM pg_proc WHERE pronamespace = 'token'::regnamespace AND prosecdef AND proconfig IS NOT NULL"), Some(0));
        // Each call runs under the hostile path; each check under a safe one (the shadows would
        // fool the checks too).
        let hostile = |sql: &str| {
            run("SET LOCAL search_path = evil, pg_catalog, token, public");
            run(sql);
            run("SET LOCAL search_path = pg_catalog, token, public");
        };
        let hostile_one = |sql: &str| {
            run("SET LOCAL search_path = evil, pg_catalog, token, public");
            let r = one::<String>(&format!("SELECT ({sql})::text"));
            run("SET LOCAL search_path = pg_catalog, token, public");
            r
        };
        hostile("SELECT token.create_key_type('qualified', max_ttl => '30 days')");
        hostile("SELECT token.register_prefix('qual-', 'qualified', 'dev')");
        let t = issue("q-acct", "qualified", "expires_in => '1 day'");
        assert_eq!(reason(&lit(&t.token)), None);
        let successor = hostile_one(&format!("SELECT token FROM token.rotate_token('{}')", t.id)).unwrap_or_default();
        assert_eq!(one::<bool>(&format!("SELECT revoke_after > now() AND expires_at > now() FROM token.tokens WHERE id = '{}'", t.id)), Some(true));
        assert_eq!(reason(&lit(&successor)), None);
        hostile(&format!("SELECT token.rotate_own_token({}, grace => '0 seconds')", lit(&successor)));
        assert_eq!(reason(&lit(&successor)).as_deref(), Some("revoked"), "the real clock ended the grace window");
        let other = issue("q-acct", "qualified", "");
        assert_eq!(hostile_one(&format!("SELECT token.revoke_token('{}')", other.id)).as_deref(), Some("true"));
        assert_eq!(reason(&lit(&bystander.token)), None, "revoke_token revoked one token");
        // t and its successor (rotated, not yet revoked) and the successor's successor.
        assert_eq!(hostile_one("SELECT token.revoke_account_tokens('q-acct')").as_deref(), Some("3"), "q-acct's three unrevoked tokens");
        assert_eq!(reason(&lit(&bystander.token)), None, "revoke_account_tokens kept to its account");
        assert_eq!(hostile_one("SELECT token.unregister_prefix('qual-')").as_deref(), Some("true"));
        assert_eq!(one::<i64>("SELECT count(*) FROM token.prefixes WHERE prefix LIKE 'tst%'"), Some(4), "one prefix removed");
        run("INSERT INTO token.events (occurred_at, event, detail) VALUES (now() - interval '100 days', 'refused', 'old')");
        assert_eq!(hostile_one("SELECT token.purge_events(interval '30 days')").as_deref(), Some("1"), "only the old event");
        assert_eq!(
            one::<i64>("SELECT (SELECT count(*) FROM evil.tokens) + (SELECT count(*) FROM evil.key_types) \
                        + (SELECT count(*) FROM evil.prefixes) + (SELECT count(*) FROM evil.events)"),
            Some(0)
        );
        assert!(one::<i64>("SELECT count(*) FROM token.events WHERE event IN ('generated', 'rotated', 'revoked')").unwrap_or(0) >= 4);
    }
}
