-- pg_token: triggers and privileges, after every function exists.

-- Any change to what decides a verdict drops the changed token from every backend's validation
-- cache (a row trigger names it in the shared-memory change log; see src/store/changes.rs); a
-- truncation drops everything. The worker's writes are left out on purpose (they would drop
-- entries constantly): last_used_at, and uses_remaining / refilled_at (use reservations; an
-- administrator's change of a cap bumps uses_version, which is listed). pgrx-tests checks that
-- every other column is listed. The row trigger fires in origin mode; under
-- session_replication_role = replica (logical replication's apply worker, restores) the
-- replica triggers below do its work.
CREATE TRIGGER tokens_invalidate_caches
    AFTER UPDATE OF id, token_hash, hint, prefix, account, key_type, environment, name, scopes,
                    metadata, created_at, expires_at, revoke_after, revoked_at, revoked_reason,
                    rotated_from, family_id, family_issued_at, disabled_at, disabled_reason,
                    parent_id, allowed_networks, rate_limits, uses_version, refill_uses,
                    refill_interval, family_revoked_at
       OR DELETE ON token.tokens
    FOR EACH ROW EXECUTE FUNCTION token.note_token_change();
CREATE TRIGGER tokens_truncate_invalidate_caches
    AFTER TRUNCATE ON token.tokens
    FOR EACH STATEMENT EXECUTE FUNCTION token.invalidate_caches();
CREATE TRIGGER key_types_invalidate_caches
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON token.key_types
    FOR EACH STATEMENT EXECUTE FUNCTION token.invalidate_caches();
CREATE TRIGGER prefixes_invalidate_caches
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON token.prefixes
    FOR EACH STATEMENT EXECUTE FUNCTION token.invalidate_caches();
CREATE TRIGGER legacy_issuers_invalidate_caches
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON token.legacy_issuers
    FOR EACH STATEMENT EXECUTE FUNCTION token.invalidate_caches();
CREATE TRIGGER legacy_issuer_keys_invalidate_caches
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON token.legacy_issuer_keys
    FOR EACH STATEMENT EXECUTE FUNCTION token.invalidate_caches();
CREATE TRIGGER legacy_revocations_invalidate_caches
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON token.legacy_revocations
    FOR EACH STATEMENT EXECUTE FUNCTION token.invalidate_caches();
-- ALWAYS: also under session_replication_role = replica, so that a change loaded by a data-only
-- restore still empties the caches (logical replication: the row triggers below).
ALTER TABLE token.tokens ENABLE ALWAYS TRIGGER tokens_truncate_invalidate_caches;
ALTER TABLE token.key_types ENABLE ALWAYS TRIGGER key_types_invalidate_caches;
ALTER TABLE token.prefixes ENABLE ALWAYS TRIGGER prefixes_invalidate_caches;
ALTER TABLE token.legacy_issuers ENABLE ALWAYS TRIGGER legacy_issuers_invalidate_caches;
ALTER TABLE token.legacy_issuer_keys ENABLE ALWAYS TRIGGER legacy_issuer_keys_invalidate_caches;
ALTER TABLE token.legacy_revocations ENABLE ALWAYS TRIGGER legacy_revocations_invalidate_caches;
-- Logical replication: the apply worker fires row triggers that are ENABLE REPLICA or ALWAYS,
-- never statement triggers (TRUNCATE aside), so the statement triggers above miss every
-- replicated change. These row triggers fire only there (and under session_replication_role
-- = replica, where the statement triggers fire too: one transaction's identical invalidations
-- are sent once). The apply worker marks every replicated column as updated, so a column list
-- cannot leave the writer's columns out; the WHEN clause compares the statement trigger's
-- columns instead (a row comparison: about 3 us per applied row, where comparing to_jsonb of
-- the rows cost 25 us), and a replicated last-use update or use reservation leaves the caches
-- alone. tests/e2e/test_cache.py checks that it lists every column but the writer's.
CREATE TRIGGER tokens_invalidate_caches_replica_update
    AFTER UPDATE ON token.tokens
    FOR EACH ROW
    WHEN (ROW(OLD.id, OLD.token_hash, OLD.hint, OLD.prefix, OLD.account, OLD.key_type,
              OLD.environment, OLD.name, OLD.scopes, OLD.metadata, OLD.created_at, OLD.expires_at,
              OLD.revoke_after, OLD.revoked_at, OLD.revoked_reason, OLD.rotated_from, OLD.family_id,
              OLD.family_issued_at, OLD.disabled_at, OLD.disabled_reason, OLD.parent_id,
              OLD.allowed_networks, OLD.rate_limits, OLD.uses_version, OLD.refill_uses,
              OLD.refill_interval, OLD.family_revoked_at)
          IS DISTINCT FROM
          ROW(NEW.id, NEW.token_hash, NEW.hint, NEW.prefix, NEW.account, NEW.key_type,
              NEW.environment, NEW.name, NEW.scopes, NEW.metadata, NEW.created_at, NEW.expires_at,
              NEW.revoke_after, NEW.revoked_at, NEW.revoked_reason, NEW.rotated_from, NEW.family_id,
              NEW.family_issued_at, NEW.disabled_at, NEW.disabled_reason, NEW.parent_id,
              NEW.allowed_networks, NEW.rate_limits, NEW.uses_version, NEW.refill_uses,
              NEW.refill_interval, NEW.family_revoked_at))
    EXECUTE FUNCTION token.note_token_change();
CREATE TRIGGER tokens_invalidate_caches_replica_delete
    AFTER DELETE ON token.tokens
    FOR EACH ROW EXECUTE FUNCTION token.note_token_change();
CREATE TRIGGER key_types_invalidate_caches_replica
    AFTER INSERT OR UPDATE OR DELETE ON token.key_types
    FOR EACH ROW EXECUTE FUNCTION token.invalidate_caches();
CREATE TRIGGER prefixes_invalidate_caches_replica
    AFTER INSERT OR UPDATE OR DELETE ON token.prefixes
    FOR EACH ROW EXECUTE FUNCTION token.invalidate_caches();
CREATE TRIGGER legacy_issuers_invalidate_caches_replica
    AFTER INSERT OR UPDATE OR DELETE ON token.legacy_issuers
    FOR EACH ROW EXECUTE FUNCTION token.invalidate_caches();
CREATE TRIGGER legacy_issuer_keys_invalidate_caches_replica
    AFTER INSERT OR UPDATE OR DELETE ON token.legacy_issuer_keys
    FOR EACH ROW EXECUTE FUNCTION token.invalidate_caches();
CREATE TRIGGER legacy_revocations_invalidate_caches_replica
    AFTER INSERT OR UPDATE OR DELETE ON token.legacy_revocations
    FOR EACH ROW EXECUTE FUNCTION token.invalidate_caches();
ALTER TABLE token.tokens ENABLE REPLICA TRIGGER tokens_invalidate_caches_replica_update;
ALTER TABLE token.tokens ENABLE REPLICA TRIGGER tokens_invalidate_caches_replica_delete;
ALTER TABLE token.key_types ENABLE REPLICA TRIGGER key_types_invalidate_caches_replica;
ALTER TABLE token.prefixes ENABLE REPLICA TRIGGER prefixes_invalidate_caches_replica;
ALTER TABLE token.legacy_issuers ENABLE REPLICA TRIGGER legacy_issuers_invalidate_caches_replica;
ALTER TABLE token.legacy_issuer_keys ENABLE REPLICA TRIGGER legacy_issuer_keys_invalidate_caches_replica;
ALTER TABLE token.legacy_revocations ENABLE REPLICA TRIGGER legacy_revocations_invalidate_caches_replica;

-- Nothing is callable by PUBLIC unless listed here.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA token FROM PUBLIC;

-- Readable by anyone: pure functions and the caller's own identity (for policies).
GRANT EXECUTE ON FUNCTION
    token.hash_token(text),
    token.reasons(),
    token.current_account(),
    token.current_account_uuid(),
    token.current_account_bigint(),
    token.current_token_id(),
    token.current_key_type(),
    token.current_scopes(),
    token.has_scope(text),
    token.current_identity(),
    token.canonical_account(text)
TO PUBLIC;

GRANT EXECUTE ON FUNCTION
    token.validate_token(text, text, text),
    token.check_token(text, text, text),
    token.authenticate(text, text, text),
    token.cache_stats()
TO token_validator;
-- A client migrates itself from a legacy JWT with one call.
GRANT EXECUTE ON FUNCTION token.exchange_legacy_jwt(text, text) TO token_validator;

-- A gateway validates like an application and may state the end client's address.
GRANT token_validator TO token_gateway;
GRANT EXECUTE ON FUNCTION
    token.validate_token_from(inet, text, text, text),
    token.check_token_from(inet, text, text, text),
    token.authenticate_from(inet, text, text, text)
TO token_gateway;

-- A secret-scanning service reports leaks and reads the patterns; nothing else.
GRANT EXECUTE ON FUNCTION token.report_leaked(text[]), token.scanner_patterns() TO token_reporter;

GRANT token_validator TO token_admin;
GRANT EXECUTE ON FUNCTION
    token.create_key_type(text, text, text[], interval, interval, text[], boolean, inet[], token.rate_limit[], boolean, boolean),
    token.register_prefix(text, text, text),
    token.unregister_prefix(text),
    token.generate_token(text, text, text, text[], interval, jsonb, text, bigint, bigint, interval, token.rate_limit[], inet[]),
    token.derive_token(uuid, text, text[], interval, jsonb, bigint, token.rate_limit[], inet[]),
    token.derive_own_token(text, text, text[], interval, jsonb, bigint, token.rate_limit[], inet[]),
    token.update_token(uuid, text, text[], jsonb, timestamptz, bigint, bigint, interval, token.rate_limit[], inet[], text[]),
    token.disable_token(uuid, text),
    token.enable_token(uuid),
    token.report_leaked(text[]),
    token.scanner_patterns(),
    token.token_uses(uuid),
    token.register_legacy_issuer(text, text[], text, text, text, timestamptz, text, text, text, text, text, interval),
    token.alter_legacy_issuer(text, timestamptz, text, text[], text),
    token.drop_legacy_issuer(text),
    token.revoke_legacy_jwt(text, text, text),
    token.rotate_token(uuid, interval),
    token.rotate_own_token(text, interval),
    token.revoke_token(uuid, text),
    token.revoke_token_tree(uuid, text),
    token.revoke_account_tokens(text, text),
    token.restore_prefix_tokens(text),
    token.purge_events(interval),
    token.flush_events(interval),
    token.worker_status(),
    token.metrics(),
    token.refusal_metrics()
TO token_admin;

-- The gateway functions are granted to token_gateway alone; token_admin can grant that role.
GRANT token_gateway, token_reporter TO token_admin WITH ADMIN OPTION;

-- Monitoring roles read the counters too (postgres_exporter connects as one).
GRANT EXECUTE ON FUNCTION token.metrics(), token.refusal_metrics() TO pg_monitor;
GRANT EXECUTE ON FUNCTION token.shared_cache_stats() TO token_admin, pg_monitor;
