//! Catalog-level promises: grants, pinned search paths, dump configuration, the invalidation
//! trigger's column list, event purging and the writer's status.

#[pgrx::pg_schema]
mod tests {
    use super::super::fixture::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn no_table_is_readable_by_public() {
        let readable = one::<i64>("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
            WHERE n.nspname = 'token' AND c.relkind IN ('r', 'v', 'S') AND has_table_privilege('public', c.oid, 'SELECT')");
        assert_eq!(readable, Some(0));
    }

    #[pg_test]
    fn every_security_definer_function_pins_its_search_path() {
        let definers = one::<String>("SELECT string_agg(proname, ',' ORDER BY proname) FROM pg_proc p \
            JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'token' AND p.prosecdef").unwrap_or_default();
        assert_eq!(definers, "alter_legacy_issuer,create_key_type,derive_own_token,derive_token,disable_token,drop_legacy_issuer,\
                              enable_token,exchange_legacy_jwt,generate_token,purge_events,register_legacy_issuer,register_prefix,\
                              report_leaked,restore_prefix_tokens,revoke_account_tokens,revoke_legacy_jwt,revoke_token,\
                              revoke_token_tree,rotate_own_token,rotate_token,scanner_patterns,token_uses,unregister_prefix,\
                              update_token");
        let unpinned = one::<String>("SELECT string_agg(proname, ',') FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
            WHERE n.nspname = 'token' AND p.prosecdef AND NOT coalesce(p.proconfig @> '{\"search_path=pg_catalog, pg_temp\"}', false)");
        assert_eq!(unpinned, None);
    }

    #[pg_test]
    fn nothing_is_executable_by_public_but_pure_functions_and_accessors() {
        let public = one::<String>("SELECT string_agg(proname, ',' ORDER BY proname) FROM pg_proc p \
            JOIN pg_namespace n ON n.oid = p.pronamespace \
            WHERE n.nspname = 'token' AND has_function_privilege('public', p.oid, 'EXECUTE')").unwrap_or_default();
        assert_eq!(public, "canonical_account,current_account,current_account_bigint,current_account_uuid,current_identity,\
current_key_type,current_scopes,current_token_id,has_scope,hash_token,reasons");
    }

    #[pg_test]
    fn tables_are_dumped_with_the_database() {
        let dumped = one::<String>("SELECT string_agg(c::regclass::text, ',' ORDER BY c::regclass::text) \
            FROM pg_extension e, unnest(e.extconfig) c WHERE e.extname = 'pg_token'");
        assert_eq!(dumped.as_deref(), Some("token.events,token.events_id_seq,token.key_types,token.legacy_exchanges,token.legacy_issuer_keys,\
                                             token.legacy_issuers,token.legacy_revocations,token.legacy_revocations_id_seq,\
                                             token.prefixes,token.tokens"));
    }

    #[pg_test]
    fn invalidation_trigger_covers_every_token_column_but_the_writer_s() {
        // The writer's columns: last_used_at, and the use reservations (uses_remaining,
        // refilled_at); an administrator's change of a cap bumps uses_version, which is listed.
        let missing = one::<String>("SELECT string_agg(a.attname, ',') FROM pg_attribute a \
            WHERE a.attrelid = 'token.tokens'::regclass AND a.attnum > 0 AND NOT a.attisdropped \
            AND a.attname NOT IN ('last_used_at', 'uses_remaining', 'refilled_at') AND NOT EXISTS ( \
              SELECT 1 FROM pg_trigger t WHERE t.tgrelid = a.attrelid \
              AND t.tgname = 'tokens_invalidate_caches' AND a.attnum = ANY (t.tgattr))");
        assert_eq!(missing, None, "columns whose changes would not empty the caches");
        let writers = one::<bool>("SELECT bool_or(a.attnum = ANY (t.tgattr)) FROM pg_attribute a, pg_trigger t \
            WHERE a.attrelid = 'token.tokens'::regclass AND a.attname IN ('last_used_at', 'uses_remaining', 'refilled_at') \
            AND t.tgname = 'tokens_invalidate_caches'");
        assert_eq!(writers, Some(false), "the writer's own updates must not empty the caches");
    }

    #[pg_test]
    fn purge_events_deletes_only_old_events() {
        run("INSERT INTO token.events (occurred_at, event, detail) VALUES (now() - interval '100 days', 'refused', 'tests-old'), \
             (now(), 'refused', 'tests-new')");
        assert!(one::<i64>("SELECT token.purge_events(interval '30 days')").unwrap_or(0) >= 1);
        assert_eq!(one::<String>("SELECT string_agg(detail, ',') FROM token.events WHERE detail LIKE 'tests-%'").as_deref(), Some("tests-new"));
        assert_fails("SELECT token.purge_events(interval '-1 day')", "22023", "must not be negative");
        assert!(one::<i64>("SELECT token.purge_events()").is_some(), "the default uses token.event_retention");
    }

    #[pg_test]
    fn writer_status_and_cache_stats_report() {
        reason("'tst-'");
        assert_eq!(one::<bool>("SELECT token.flush_events('5 seconds')"), Some(true));
        let status = "FROM token.worker_status() WHERE database = current_database()";
        assert_eq!(one::<i64>(&format!("SELECT refusals_pending + touches_queued {status}")), Some(0));
        assert!(one::<i64>(&format!("SELECT refusals_written {status}")).unwrap_or(0) >= 1);
        assert_eq!(one::<bool>(&format!("SELECT refusals = refusals_written + refusals_pending + refusals_dropped {status}")), Some(true));
        run("SET LOCAL token.cache_size = '64kB'");
        assert_eq!(one::<i64>("SELECT budget FROM token.cache_stats()"), Some(64 * 1024));
        // A token this transaction inserted is never cached (the insert may roll back), so two
        // validations of it are two misses.
        registry();
        let t = issue("acct-stats", "agent", "");
        let before = one::<i64>("SELECT misses FROM token.cache_stats()").unwrap_or(-1);
        for _ in 0..2 {
            run(&format!("SELECT token.validate_token('{}')", t.token));
        }
        assert_eq!(one::<i64>("SELECT misses FROM token.cache_stats()"), Some(before + 2));
        assert_eq!(one::<i64>("SELECT entries FROM token.cache_stats()"), Some(0));
    }
}
