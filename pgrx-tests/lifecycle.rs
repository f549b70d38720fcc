//! Generate, rotate, revoke, key types and prefixes.

#[pgrx::pg_schema]
mod tests {
    use super::super::fixture::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn generated_token_has_the_format_and_validates() {
        registry();
        let t = issue("acme", "agent", "name => 'ci', scopes => '{read}', metadata => '{\"team\": \"infra\"}'");
        let p = pg_token_core::format::parse(&t.token).expect("well formed");
        assert_eq!(p.prefix, "tst-");
        let row = Spi::get_three::<String, String, String>(&format!(
            "SELECT account, key_type, environment FROM token.validate_token({})", lit(&t.token)
        ));
        assert_eq!(row.ok(), Some((Some("acme".into()), Some("agent".into()), Some("dev".into()))));
        let id = one::<pgrx::Uuid>(&format!("SELECT token_id FROM token.validate_token({})", lit(&t.token)));
        assert_eq!(id.map(|u| u.to_string()), Some(t.id.clone()));
        assert_eq!(
            one::<String>(&format!("SELECT metadata->>'team' FROM token.validate_token({})", lit(&t.token))).as_deref(),
            Some("infra")
        );
    }

    #[pg_test]
    fn only_the_hash_is_stored() {
        registry();
        let t = issue("acme", "agent", "");
        let row_mentions_token = one::<i64>(&format!(
            "SELECT count(*) FROM token.tokens t WHERE t::text LIKE '%' || {} || '%' OR t::text LIKE '%' || {} || '%'",
            lit(&t.token), lit(&t.token[4..20])
        ));
        assert_eq!(row_mentions_token, Some(0));
        let hash_ok = one::<bool>(&format!(
            "SELECT token_hash = sha256(convert_to({}, 'UTF8')) AND hint = {} FROM token.tokens WHERE id = '{}'",
            lit(&t.token), lit(&t.token[..8]), t.id
        ));
        assert_eq!(hash_ok, Some(true));
        let events_mention = one::<i64>(&format!("SELECT count(*) FROM token.events e WHERE e::text LIKE '%' || {} || '%'", lit(&t.token[4..20])));
        assert_eq!(events_mention, Some(0));
    }

    #[pg_test]
    fn token_list_shows_everything_but_the_hash() {
        registry();
        issue("acme", "agent", "");
        let cols = one::<String>("SELECT string_agg(attname, ',') FROM pg_attribute WHERE attrelid = 'token.token_list'::regclass AND attnum > 0").unwrap_or_default();
        assert!(!cols.contains("hash"), "{cols}");
        for c in ["id", "hint", "account", "key_type", "environment", "scopes", "metadata", "expires_at", "revoke_after", "revoked_at", "last_used_at", "rotated_from", "status"] {
            assert!(cols.split(',').any(|x| x == c), "{c} missing from {cols}");
        }
        assert_eq!(one::<String>("SELECT status FROM token.token_list LIMIT 1").as_deref(), Some("active"));
    }

    #[pg_test]
    fn key_type_ttl_rules_apply_at_generation() {
        registry();
        let cli = issue("acme", "cli", "");
        let ttl = one::<bool>(&format!("SELECT expires_at - created_at BETWEEN interval '23 hours 59 minutes' AND interval '1 day 1 minute' FROM token.tokens WHERE id = '{}'", cli.id));
        assert_eq!(ttl, Some(true), "default_ttl of 1 day applied");
        let agent = issue("acme", "agent", "");
        assert_eq!(one::<bool>(&format!("SELECT expires_at IS NOT NULL FROM token.tokens WHERE id = '{}'", agent.id)), Some(true), "max_ttl applies when no default");
        assert_fails("SELECT token.generate_token('acme', 'agent', expires_in => '91 days')", "22023", "exceeds the maximum TTL");
        assert_fails("SELECT token.generate_token('acme', 'agent', expires_in => '-1 day')", "22023", "must be positive");
    }

    #[pg_test]
    fn key_type_scope_rules_apply_at_generation() {
        registry();
        issue("acme", "agent", "scopes => '{read,write}'");
        assert_fails("SELECT token.generate_token('acme', 'agent', scopes => '{root}')", "22023", "scope \"root\" is not allowed");
        assert_fails("SELECT token.generate_token('acme', 'agent', scopes => ARRAY[NULL]::text[])", "22023", "must not contain NULL");
    }

    #[pg_test]
    fn generate_rejects_bad_arguments_without_writing() {
        registry();
        let rows = token_rows();
        assert_fails("SELECT token.generate_token(NULL, 'agent')", "22004", "account must not be NULL");
        assert_fails("SELECT token.generate_token('', 'agent')", "22023", "invalid account");
        assert_fails("SELECT token.generate_token(repeat('a', 300), 'agent')", "22023", "invalid account");
        assert_fails("SELECT token.generate_token('acme', 'nosuch')", "42704", "key type \"nosuch\" does not exist");
        assert_fails("SELECT token.generate_token('acme', 'agent', metadata => '[1,2]')", "22023", "JSON object");
        assert_fails("SELECT token.generate_token('acme', 'agent', metadata => jsonb_build_object('x', repeat('a', 9000)))", "22023", "at most 8192 bytes");
        assert_fails("SELECT token.generate_token('acme', 'agent', prefix => 'tstprd-')", "42704", "not registered for key type");
        assert_eq!(token_rows(), rows);
    }

    #[pg_test]
    fn generate_needs_a_prefix_in_this_environment() {
        run("SELECT token.create_key_type('lonely')");
        run("SELECT token.register_prefix('lonely-', 'lonely', 'prod')");
        assert_fails("SELECT token.generate_token('acme', 'lonely')", "42704", "no prefix is registered for key type \"lonely\" in environment \"dev\"");
    }

    #[pg_test]
    fn rotation_keeps_identity_and_both_validate_in_grace() {
        registry();
        let old = issue("acme", "agent", "scopes => '{read}', name => 'deploy', expires_in => '10 days'");
        let row = Spi::get_two::<pgrx::Uuid, String>(&format!("SELECT token_id, token FROM token.rotate_token('{}')", old.id));
        let (new_id, new_token) = match row {
            Ok((Some(i), Some(t))) => (i.to_string(), t),
            other => panic!("rotate failed: {other:?}"),
        };
        assert_ne!(new_token, old.token);
        assert_eq!(reason(&lit(&old.token)), None, "old valid during grace");
        assert_eq!(reason(&lit(&new_token)), None, "new valid");
        let same = one::<bool>(&format!(
            "SELECT n.account = o.account AND n.key_type = o.key_type AND n.environment = o.environment \
             AND n.scopes = o.scopes AND n.name = o.name AND n.rotated_from = o.id \
             AND o.revoke_after BETWEEN clock_timestamp() + interval '23 hours' AND clock_timestamp() + interval '24 hours' \
             AND n.expires_at - n.created_at = o.expires_at - o.created_at \
             FROM token.tokens n, token.tokens o WHERE n.id = '{new_id}' AND o.id = '{}'", old.id
        ));
        assert_eq!(same, Some(true));
        // The grace window ends: the old one fails with no job run, the new one still works.
        run(&format!("UPDATE token.tokens SET revoke_after = clock_timestamp() - interval '1 second' WHERE id = '{}'", old.id));
        assert_eq!(reason(&lit(&old.token)).as_deref(), Some("revoked"));
        assert_eq!(reason(&lit(&new_token)), None);
    }

    #[pg_test]
    fn a_token_is_rotated_once() {
        registry();
        let t = issue("acme", "agent", "");
        run(&format!("SELECT token.rotate_token('{}')", t.id));
        assert_fails(&format!("SELECT token.rotate_token('{}')", t.id), "55000", "has already been rotated");
    }

    #[pg_test]
    fn revoked_missing_or_negative_grace_rotations_fail() {
        registry();
        let t = issue("acme", "agent", "");
        assert_fails(&format!("SELECT token.rotate_token('{}', grace => '-1 hour')", t.id), "22023", "must not be negative");
        run(&format!("SELECT token.revoke_token('{}')", t.id));
        assert_fails(&format!("SELECT token.rotate_token('{}')", t.id), "55000", "is revoked");
        assert_fails("SELECT token.rotate_token('00000000-0000-0000-0000-000000000000')", "P0002", "does not exist");
        assert_fails("SELECT token.rotate_token(NULL)", "22004", "must not be NULL");
    }

    #[pg_test]
    fn self_service_rotation_takes_the_token_itself() {
        registry();
        let t = issue("acme", "agent", "");
        let new_token = one::<String>(&format!("SELECT token FROM token.rotate_own_token({}, grace => '1 hour')", lit(&t.token))).unwrap_or_default();
        assert_eq!(reason(&lit(&new_token)), None);
        assert_eq!(reason(&lit(&t.token)), None, "in grace");
        assert_fails(&format!("SELECT token.rotate_own_token({})", lit(&forged("tst-"))), "28000", "token rejected: not_found");
    }

    #[pg_test]
    fn revoke_is_immediate_and_idempotent() {
        registry();
        let t = issue("acme", "agent", "");
        assert_eq!(reason(&lit(&t.token)), None);
        assert_eq!(one::<bool>(&format!("SELECT token.revoke_token('{}', 'leaked')", t.id)), Some(true));
        assert_eq!(reason(&lit(&t.token)).as_deref(), Some("revoked"), "the very next validation fails");
        assert_eq!(one::<bool>(&format!("SELECT token.revoke_token('{}')", t.id)), Some(false));
        assert_eq!(one::<String>(&format!("SELECT revoked_reason FROM token.tokens WHERE id = '{}'", t.id)).as_deref(), Some("leaked"));
        assert_fails("SELECT token.revoke_token('00000000-0000-0000-0000-000000000000')", "P0002", "does not exist");
    }

    #[pg_test]
    fn revoke_account_tokens_revokes_only_that_account() {
        registry();
        let a1 = issue("acme", "agent", "");
        let a2 = issue("acme", "mid", "");
        let b = issue("globex", "agent", "");
        assert_eq!(one::<i64>("SELECT token.revoke_account_tokens('acme', 'offboarded')"), Some(2));
        assert_eq!(reason(&lit(&a1.token)).as_deref(), Some("revoked"));
        assert_eq!(reason(&lit(&a2.token)).as_deref(), Some("revoked"));
        assert_eq!(reason(&lit(&b.token)), None);
        assert_eq!(one::<i64>("SELECT token.revoke_account_tokens('acme')"), Some(0));
        let events = one::<i64>(&format!("SELECT count(*) FROM token.events WHERE event = 'revoked' AND token_id IN ('{}', '{}')", a1.id, a2.id));
        assert_eq!(events, Some(2));
    }

    #[pg_test]
    fn prefix_registration_rules() {
        registry();
        assert_fails("SELECT token.register_prefix('tst-', 'agent', 'dev')", "42710", "already registered");
        assert_fails("SELECT token.register_prefix('tst-x-', 'agent', 'dev')", "22023", "overlaps registered prefix \"tst-\"");
        // And the other way round: a shorter prefix that a registered one starts with.
        run("SELECT token.register_prefix('longer-prefix_', 'agent', 'dev')");
        assert_fails("SELECT token.register_prefix('longer-', 'agent', 'dev')", "22023", "overlaps registered prefix \"longer-prefix_\"");
        assert_fails("SELECT token.register_prefix('ts', 'agent', 'dev')", "22023", "must end in");
        assert_fails("SELECT token.register_prefix('t', 'agent', 'dev')", "22023", "2 to 32");
        assert_fails("SELECT token.register_prefix('a b-', 'agent', 'dev')", "22023", "may contain only");
        assert_fails("SELECT token.register_prefix('ok-', 'nosuch', 'dev')", "42704", "does not exist");
        assert_fails("SELECT token.register_prefix('ok-', 'agent', 'Prod!')", "22023", "invalid environment name");
        run("SELECT token.register_prefix('other_', 'agent', 'stage')");
    }

    #[pg_test]
    fn unregistered_prefix_refuses_its_tokens_at_once() {
        registry();
        let t = issue("acme", "agent", "");
        assert_eq!(reason(&lit(&t.token)), None);
        assert_eq!(one::<bool>("SELECT token.unregister_prefix('tst-')"), Some(true));
        assert_eq!(reason(&lit(&t.token)).as_deref(), Some("unknown_prefix"));
        assert_eq!(one::<bool>("SELECT token.unregister_prefix('tst-')"), Some(false));
    }

    #[pg_test]
    fn key_types_are_created_once_unless_replaced() {
        run("SELECT token.create_key_type('svc', description => 'services')");
        assert_fails("SELECT token.create_key_type('svc')", "42710", "already exists");
        run("SELECT token.create_key_type('svc', max_ttl => '7 days', replace => true)");
        assert_eq!(one::<String>("SELECT max_ttl::text FROM token.key_types WHERE name = 'svc'").as_deref(), Some("7 days"));
        assert_fails("SELECT token.create_key_type('Bad Name')", "22023", "invalid key type name");
        assert_fails("SELECT token.create_key_type('x', can_validate => '{ghost}')", "42704", "unknown key types: ghost");
        assert_fails("SELECT token.create_key_type('y', max_ttl => '-1 day')", "22023", "positive");
        assert_fails("SELECT token.create_key_type('z', default_ttl => '2 days', max_ttl => '1 day')", "22023", "invalid key type definition");
    }

    #[pg_test]
    fn writers_refuse_read_only_transactions_with_25006() {
        registry();
        let t = issue("acme", "agent", "");
        run("SET LOCAL transaction_read_only = on");
        for sql in [
            "SELECT token.generate_token('acme', 'agent')".to_string(),
            format!("SELECT token.rotate_token('{}')", t.id),
            format!("SELECT token.rotate_own_token('{}')", t.token),
            format!("SELECT token.revoke_token('{}')", t.id),
            "SELECT token.revoke_account_tokens('acme')".to_string(),
            "SELECT token.create_key_type('ro')".to_string(),
            "SELECT token.register_prefix('ro-', 'agent', 'dev')".to_string(),
            "SELECT token.unregister_prefix('tst-')".to_string(),
            "SELECT token.purge_events()".to_string(),
        ] {
            assert_fails(&sql, "25006", "in a read-only transaction");
        }
        assert_eq!(reason(&lit(&t.token)), None, "validation still works read-only");
    }
}
