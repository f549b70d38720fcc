-- pg_token 0.1.0 -> 0.2.0. Run by ALTER EXTENSION pg_token UPDATE (TO '0.2.0').
--
-- 0.2.0 is not released yet: until it is, every schema change lands here, in the same commit
-- as its code and tests, and tests/e2e/test_upgrade.py proves that a database upgraded from
-- 0.1.0 has exactly the catalog of a fresh 0.2.0 install. Once 0.2.0 is released this file is
-- frozen like sql/pg_token--0.1.0.sql. The README's UPDATING section says what each part
-- changes for users.
\echo Use "ALTER EXTENSION pg_token UPDATE" to load this file. \quit

-- Accounts have one spelling ('42', never '042'; lowercase uuids). The function is new in
-- 0.2.0; the library that runs this script already has it.
CREATE FUNCTION token.canonical_account(
	"account" TEXT
) RETURNS TEXT
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'canonical_account_wrapper';
GRANT EXECUTE ON FUNCTION token.canonical_account(text) TO PUBLIC;
UPDATE token.tokens SET account = token.canonical_account(account)
 WHERE account IS DISTINCT FROM token.canonical_account(account);

-- Rotation families: each token records the token its lineage started with and when that was
-- issued. A 0.1.0 token's family is found by following rotated_from back to its root.
ALTER TABLE token.tokens ADD COLUMN family_id uuid, ADD COLUMN family_issued_at timestamptz;
WITH RECURSIVE lineage AS (
    SELECT t.id, t.id AS root, t.created_at AS root_issued FROM token.tokens t WHERE t.rotated_from IS NULL
    UNION ALL
    SELECT t.id, l.root, l.root_issued FROM token.tokens t JOIN lineage l ON t.rotated_from = l.id
)
UPDATE token.tokens t SET family_id = l.root, family_issued_at = l.root_issued
  FROM lineage l WHERE l.id = t.id;
ALTER TABLE token.tokens ALTER COLUMN family_id SET NOT NULL, ALTER COLUMN family_issued_at SET NOT NULL;
CREATE INDEX tokens_family_id_idx ON token.tokens (family_id);

-- Unregistering a prefix is final for its tokens (0.2.0 revokes them when it happens; a 0.1.0
-- database may hold tokens whose prefix was unregistered, or registered again for another key
-- type or environment, which 0.1.0 would bring back): revoke those now, as 0.2.0 would have.
UPDATE token.tokens t SET revoked_at = pg_catalog.clock_timestamp(), revoked_reason = 'pg_token: prefix unregistered'
 WHERE t.revoked_at IS NULL
   AND NOT EXISTS (SELECT 1 FROM token.prefixes p
                    WHERE p.prefix = t.prefix AND p.key_type = t.key_type AND p.environment = t.environment);

-- Incident response: a token and every token rotated from it, at once.
CREATE FUNCTION token.revoke_token_tree(
	"token_id" uuid,
	"reason" TEXT DEFAULT NULL
) RETURNS bigint
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'revoke_token_tree_wrapper';
REVOKE EXECUTE ON FUNCTION token.revoke_token_tree(uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION token.revoke_token_tree(uuid, text) TO token_admin;

-- Bringing back, on purpose, the tokens an unregistration revoked.
CREATE FUNCTION token.restore_prefix_tokens(
	"prefix" TEXT
) RETURNS bigint
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'restore_prefix_tokens_wrapper';
REVOKE EXECUTE ON FUNCTION token.restore_prefix_tokens(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION token.restore_prefix_tokens(text) TO token_admin;

-- Refusals are counted, not listed (bounded, aggregated security events): a refusal row
-- stands for every refusal of its key in a window. 0.1.0's rows each stood for one.
ALTER TABLE token.events ADD COLUMN count bigint NOT NULL DEFAULT 1,
                         ADD COLUMN last_at timestamptz,
                         ADD COLUMN folded text;
CREATE INDEX events_last_at_idx ON token.events (last_at) WHERE last_at IS NOT NULL;
COMMENT ON TABLE token.events IS
    'Security events: refusals (counted per key and window), generate, rotate, revoke. Refusals survive the caller''s rollback';

-- worker_status reports the refusal counts instead of a queue of records. (The library keeps
-- 0.1.0's symbol, worker_status_wrapper, with its eight columns, for databases not yet updated.)
DROP FUNCTION token.worker_status();
CREATE FUNCTION token.worker_status() RETURNS TABLE (
	"database" TEXT,
	"worker_pid" INT,
	"refusals" bigint,
	"refusals_written" bigint,
	"refusals_pending" bigint,
	"refusals_folded" bigint,
	"refusals_dropped" bigint,
	"event_rows" bigint,
	"event_keys" bigint,
	"touches_queued" bigint,
	"touches_written" bigint,
	"touches_dropped" bigint
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'worker_status_v2_wrapper';
REVOKE EXECUTE ON FUNCTION token.worker_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION token.worker_status() TO token_admin;

-- Counters for monitoring (token.metrics, token.refusal_metrics), read by token_admin and by
-- pg_monitor, the role postgres_exporter connects as.
CREATE FUNCTION token.metrics() RETURNS TABLE (
	"validations_total" bigint,
	"refusals_total" bigint,
	"cache_hits_total" bigint,
	"cache_misses_total" bigint,
	"refusals_pending" bigint,
	"refusals_dropped_total" bigint,
	"event_rows_total" bigint,
	"touches_queued" bigint,
	"touches_dropped_total" bigint,
	"writer_running" bool,
	"writer_lag_seconds" double precision,
	"rate_limit_untracked_total" bigint
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'metrics_wrapper';
CREATE FUNCTION token.refusal_metrics() RETURNS TABLE (
	"reason" TEXT,
	"refusals_total" bigint
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'refusal_metrics_wrapper';
REVOKE EXECUTE ON FUNCTION token.metrics(), token.refusal_metrics() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION token.metrics(), token.refusal_metrics() TO token_admin, pg_monitor;

-- Key management (issue 15): disable/enable, update, usage caps, rate limits, bound networks,
-- child tokens, leak reports, concealed cross-account refusals.
CREATE TYPE token.rate_limit AS (
    requests  integer,
    per       interval
);
COMMENT ON TYPE token.rate_limit IS
    'A rate limit: at most requests accepted validations per window (per), counted across every backend of the server';
ALTER TABLE token.key_types
    ADD COLUMN allowed_networks cidr[],
    ADD COLUMN rate_limits token.rate_limit[],
    ADD COLUMN conceal_cross_account boolean NOT NULL DEFAULT false;
ALTER TABLE token.tokens
    ADD COLUMN disabled_at timestamptz,
    ADD COLUMN disabled_reason text,
    ADD COLUMN parent_id uuid REFERENCES token.tokens (id) ON DELETE CASCADE,
    ADD COLUMN allowed_networks cidr[],
    ADD COLUMN rate_limits token.rate_limit[],
    ADD COLUMN uses_remaining bigint CHECK (uses_remaining >= 0),
    ADD COLUMN uses_version bigint NOT NULL DEFAULT 0,
    ADD COLUMN refill_uses bigint CHECK (refill_uses > 0),
    ADD COLUMN refill_interval interval CHECK (refill_interval > interval '0'),
    ADD COLUMN refilled_at timestamptz,
    ADD CONSTRAINT tokens_refill_check CHECK ((refill_uses IS NULL) = (refill_interval IS NULL)
                                              AND (refill_uses IS NULL OR uses_remaining IS NOT NULL));
-- Token families (issue 14): reuse detection on a key type; a family revoked for a reuse.
ALTER TABLE token.key_types ADD COLUMN reuse_detection boolean NOT NULL DEFAULT false;
ALTER TABLE token.tokens ADD COLUMN family_revoked_at timestamptz;
CREATE INDEX tokens_parent_id_idx ON token.tokens (parent_id) WHERE parent_id IS NOT NULL;
ALTER TYPE token.identity
    ADD ATTRIBUTE parent_id uuid,
    ADD ATTRIBUTE uses_remaining bigint,
    ADD ATTRIBUTE rate_limit integer,
    ADD ATTRIBUTE rate_remaining integer,
    ADD ATTRIBUTE rate_reset_at timestamptz;
ALTER TYPE token.verdict
    ADD ATTRIBUTE parent_id uuid,
    ADD ATTRIBUTE uses_remaining bigint,
    ADD ATTRIBUTE rate_limit integer,
    ADD ATTRIBUTE rate_remaining integer,
    ADD ATTRIBUTE rate_reset_at timestamptz;
CREATE OR REPLACE VIEW token.token_list AS
SELECT id, hint, prefix, account, key_type, environment, name, scopes, metadata,
       created_at, expires_at, revoke_after, revoked_at, revoked_reason, last_used_at,
       rotated_from,
       CASE
           WHEN revoked_at IS NOT NULL THEN 'revoked'
           WHEN revoke_after IS NOT NULL AND revoke_after <= pg_catalog.clock_timestamp() THEN 'revoked'
           WHEN expires_at IS NOT NULL AND expires_at <= pg_catalog.clock_timestamp() THEN 'expired'
           WHEN disabled_at IS NOT NULL THEN 'disabled'
           WHEN revoke_after IS NOT NULL THEN 'rotating'
           ELSE 'active'
       END AS status,
       disabled_at, disabled_reason, parent_id, uses_remaining, refill_uses, refill_interval,
       rate_limits, allowed_networks, family_revoked_at
FROM token.tokens;

-- The cache trigger watches the columns 0.2.0 added (not the writer's: uses_remaining and
-- refilled_at are use reservations; an administrator's change of a cap bumps uses_version).
-- A row trigger names each changed token in the shared-memory change log (src/store/changes.rs).
CREATE FUNCTION token.note_token_change()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', 'note_token_change_wrapper';
REVOKE EXECUTE ON FUNCTION token.note_token_change() FROM PUBLIC;
DROP TRIGGER tokens_invalidate_caches ON token.tokens;
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
ALTER TABLE token.tokens ENABLE ALWAYS TRIGGER tokens_truncate_invalidate_caches;

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'token_reporter') THEN
        CREATE ROLE token_reporter NOLOGIN;
        COMMENT ON ROLE token_reporter IS 'pg_token: may report leaked tokens (report_leaked) and read scanner_patterns; nothing else';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'token_gateway') THEN
        CREATE ROLE token_gateway NOLOGIN;
        COMMENT ON ROLE token_gateway IS 'pg_token: a trusted gateway that may state the end client''s address (validate_token_from and friends)';
    END IF;
END
$roles$;
GRANT token_validator TO token_gateway;
GRANT token_gateway, token_reporter TO token_admin WITH ADMIN OPTION;

-- generate_token and create_key_type take the new options (the library keeps 0.1.0's symbols
-- for databases not yet updated).
DROP FUNCTION token.generate_token(text, text, text, text[], interval, jsonb, text);
DROP FUNCTION token.create_key_type(text, text, text[], interval, interval, text[], boolean);
CREATE FUNCTION token.generate_token(
	"account" TEXT,
	"key_type" TEXT,
	"name" TEXT DEFAULT NULL,
	"scopes" TEXT[] DEFAULT '{}',
	"expires_in" interval DEFAULT NULL,
	"metadata" jsonb DEFAULT '{}',
	"prefix" TEXT DEFAULT NULL,
	"uses" bigint DEFAULT NULL,
	"refill_uses" bigint DEFAULT NULL,
	"refill_interval" interval DEFAULT NULL,
	"rate_limits" token.rate_limit[] DEFAULT NULL,
	"allowed_networks" inet[] DEFAULT NULL
) RETURNS TABLE (
	"token_id" uuid,
	"token" TEXT
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'generate_token_v2_wrapper';

CREATE FUNCTION token.derive_token(
	"parent_id" uuid,
	"name" TEXT DEFAULT NULL,
	"scopes" TEXT[] DEFAULT NULL,
	"expires_in" interval DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL,
	"uses" bigint DEFAULT NULL,
	"rate_limits" token.rate_limit[] DEFAULT NULL,
	"allowed_networks" inet[] DEFAULT NULL
) RETURNS TABLE (
	"token_id" uuid,
	"token" TEXT
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'derive_token_wrapper';

CREATE FUNCTION token.derive_own_token(
	"token" TEXT,
	"name" TEXT DEFAULT NULL,
	"scopes" TEXT[] DEFAULT NULL,
	"expires_in" interval DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL,
	"uses" bigint DEFAULT NULL,
	"rate_limits" token.rate_limit[] DEFAULT NULL,
	"allowed_networks" inet[] DEFAULT NULL
) RETURNS TABLE (
	"token_id" uuid,
	"token" TEXT
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'derive_own_token_wrapper';

CREATE FUNCTION token.update_token(
	"token_id" uuid,
	"name" TEXT DEFAULT NULL,
	"scopes" TEXT[] DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL,
	"expires_at" timestamp with time zone DEFAULT NULL,
	"uses" bigint DEFAULT NULL,
	"refill_uses" bigint DEFAULT NULL,
	"refill_interval" interval DEFAULT NULL,
	"rate_limits" token.rate_limit[] DEFAULT NULL,
	"allowed_networks" inet[] DEFAULT NULL,
	"unset" TEXT[] DEFAULT '{}'
) RETURNS void
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'update_token_wrapper';

CREATE FUNCTION token.disable_token(
	"token_id" uuid,
	"reason" TEXT DEFAULT NULL
) RETURNS bool
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'disable_token_wrapper';

CREATE FUNCTION token.enable_token(
	"token_id" uuid
) RETURNS bool
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'enable_token_wrapper';

CREATE FUNCTION token.report_leaked(
	"tokens" TEXT[]
) RETURNS TABLE (
	"hint" TEXT,
	"outcome" TEXT
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'report_leaked_wrapper';

CREATE FUNCTION token.scanner_patterns() RETURNS TABLE (
	"prefix" TEXT,
	"key_type" TEXT,
	"environment" TEXT,
	"pattern" TEXT,
	"bounded_pattern" TEXT
)
STRICT STABLE SECURITY DEFINER PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'scanner_patterns_wrapper';

CREATE FUNCTION token.token_uses(
	"token_id" uuid
) RETURNS TABLE (
	"uses_remaining" bigint,
	"reserved" bigint,
	"in_table" bigint,
	"refill_uses" bigint,
	"refill_interval" interval,
	"next_refill_at" timestamp with time zone
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'token_uses_wrapper';

CREATE FUNCTION token.create_key_type(
	"name" TEXT,
	"description" TEXT DEFAULT NULL,
	"can_validate" TEXT[] DEFAULT '{}',
	"default_ttl" interval DEFAULT NULL,
	"max_ttl" interval DEFAULT NULL,
	"allowed_scopes" TEXT[] DEFAULT NULL,
	"replace" bool DEFAULT false,
	"allowed_networks" inet[] DEFAULT NULL,
	"rate_limits" token.rate_limit[] DEFAULT NULL,
	"conceal_cross_account" bool DEFAULT false,
	"reuse_detection" bool DEFAULT false
) RETURNS void
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'create_key_type_v2_wrapper';

CREATE FUNCTION token.validate_token_from(
    client_addr     inet,
    token           text,
    caller_token    text DEFAULT NULL,
    required_scope  text DEFAULT NULL
) RETURNS token.identity
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pg_token_validate_token_from';
COMMENT ON FUNCTION token.validate_token_from(inet, text, text, text) IS
    'validate_token judged as if the client connected from client_addr (token_gateway)';

CREATE FUNCTION token.check_token_from(
    client_addr     inet,
    token           text,
    caller_token    text DEFAULT NULL,
    required_scope  text DEFAULT NULL
) RETURNS token.verdict
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pg_token_check_token_from';
COMMENT ON FUNCTION token.check_token_from(inet, text, text, text) IS
    'check_token judged as if the client connected from client_addr (token_gateway)';

CREATE FUNCTION token.authenticate_from(
    client_addr     inet,
    token           text,
    caller_token    text DEFAULT NULL,
    required_scope  text DEFAULT NULL
) RETURNS token.identity
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pg_token_authenticate_from';
COMMENT ON FUNCTION token.authenticate_from(inet, text, text, text) IS
    'authenticate judged as if the client connected from client_addr (token_gateway)';

REVOKE EXECUTE ON FUNCTION
    token.generate_token(text, text, text, text[], interval, jsonb, text, bigint, bigint, interval, token.rate_limit[], inet[]),
    token.create_key_type(text, text, text[], interval, interval, text[], boolean, inet[], token.rate_limit[], boolean, boolean),
    token.derive_token(uuid, text, text[], interval, jsonb, bigint, token.rate_limit[], inet[]),
    token.derive_own_token(text, text, text[], interval, jsonb, bigint, token.rate_limit[], inet[]),
    token.update_token(uuid, text, text[], jsonb, timestamptz, bigint, bigint, interval, token.rate_limit[], inet[], text[]),
    token.disable_token(uuid, text),
    token.enable_token(uuid),
    token.report_leaked(text[]),
    token.scanner_patterns(),
    token.token_uses(uuid),
    token.validate_token_from(inet, text, text, text),
    token.check_token_from(inet, text, text, text),
    token.authenticate_from(inet, text, text, text)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    token.validate_token_from(inet, text, text, text),
    token.check_token_from(inet, text, text, text),
    token.authenticate_from(inet, text, text, text)
TO token_gateway;
GRANT EXECUTE ON FUNCTION token.report_leaked(text[]), token.scanner_patterns() TO token_reporter;
GRANT EXECUTE ON FUNCTION
    token.generate_token(text, text, text, text[], interval, jsonb, text, bigint, bigint, interval, token.rate_limit[], inet[]),
    token.create_key_type(text, text, text[], interval, interval, text[], boolean, inet[], token.rate_limit[], boolean, boolean),
    token.derive_token(uuid, text, text[], interval, jsonb, bigint, token.rate_limit[], inet[]),
    token.derive_own_token(text, text, text[], interval, jsonb, bigint, token.rate_limit[], inet[]),
    token.update_token(uuid, text, text[], jsonb, timestamptz, bigint, bigint, interval, token.rate_limit[], inet[], text[]),
    token.disable_token(uuid, text),
    token.enable_token(uuid),
    token.report_leaked(text[]),
    token.scanner_patterns(),
    token.token_uses(uuid)
TO token_admin;

-- Migrating from JWTs (issue 14): legacy JWT issuers, revocation by jti, exchange.
-- Legacy JWT issuers (migrating from JWTs): what a DBA registered with
-- token.register_legacy_issuer. JWTs of an issuer validate until cutoff_at, then are refused
-- as legacy_token_retired with migration_message. The keys are in legacy_issuer_keys, which
-- no role but the extension's owner can read (an HS256 secret is a shared secret).
CREATE TABLE token.legacy_issuers (
    name               text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,30}$'),
    algorithms         text[] NOT NULL CHECK (algorithms <@ ARRAY['HS256', 'RS256', 'ES256']
                                              AND pg_catalog.cardinality(algorithms) > 0),
    key_type           text NOT NULL REFERENCES token.key_types (name),
    environment        text NOT NULL CHECK (pg_catalog.length(environment) BETWEEN 1 AND 31),
    cutoff_at          timestamptz NOT NULL,
    migration_message  text CHECK (pg_catalog.length(migration_message) <= 1000),
    issuer             text UNIQUE CHECK (pg_catalog.length(issuer) BETWEEN 1 AND 1024),
    audience           text CHECK (pg_catalog.length(audience) BETWEEN 1 AND 1024),
    account_claim      text NOT NULL DEFAULT 'sub' CHECK (pg_catalog.length(account_claim) BETWEEN 1 AND 128),
    scopes_claim       text NOT NULL DEFAULT 'scope' CHECK (pg_catalog.length(scopes_claim) BETWEEN 1 AND 128),
    exchange_ttl       interval CHECK (exchange_ttl > interval '0'),
    created_at         timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE token.legacy_issuers IS
    'Legacy JWT issuers whose JWTs validate until their cut-off (keys in token.legacy_issuer_keys, owner-only)';
CREATE TABLE token.legacy_issuer_keys (
    name  text PRIMARY KEY REFERENCES token.legacy_issuers (name) ON DELETE CASCADE,
    key   text NOT NULL CHECK (pg_catalog.octet_length(key) <= 65536)
);
COMMENT ON TABLE token.legacy_issuer_keys IS
    'Key material of the legacy JWT issuers: HS256 secrets and public keys; readable by the extension owner only';
-- Revoked legacy JWTs: one by (issuer, jti), or every JWT of an account issued (iat) before
-- revoked_at (revoke_account_tokens writes those).
CREATE TABLE token.legacy_revocations (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    issuer      text REFERENCES token.legacy_issuers (name) ON DELETE CASCADE,
    jti         text CHECK (pg_catalog.length(jti) <= 128),
    account     text CHECK (pg_catalog.length(account) BETWEEN 1 AND 256),
    revoked_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    reason      text,
    CHECK ((jti IS NOT NULL AND issuer IS NOT NULL AND account IS NULL)
           OR (jti IS NULL AND issuer IS NULL AND account IS NOT NULL))
);
CREATE UNIQUE INDEX legacy_revocations_jti_idx ON token.legacy_revocations (issuer, jti) WHERE jti IS NOT NULL;
COMMENT ON TABLE token.legacy_revocations IS
    'Revoked legacy JWTs: by issuer and jti, or every JWT of an account issued before revoked_at';
-- What exchange_legacy_jwt issued: at most one token per JWT (its jti, or its hash without one).
CREATE TABLE token.legacy_exchanges (
    issuer        text NOT NULL REFERENCES token.legacy_issuers (name) ON DELETE CASCADE,
    jwt_key       text NOT NULL,
    token_id      uuid REFERENCES token.tokens (id) ON DELETE SET NULL,
    exchanged_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (issuer, jwt_key)
);
COMMENT ON TABLE token.legacy_exchanges IS
    'The opaque token exchange_legacy_jwt issued for each legacy JWT (by issuer and jti, or the JWT''s hash)';
SELECT pg_catalog.pg_extension_config_dump('token.legacy_issuers', '');
SELECT pg_catalog.pg_extension_config_dump('token.legacy_issuer_keys', '');
SELECT pg_catalog.pg_extension_config_dump('token.legacy_revocations', '');
SELECT pg_catalog.pg_extension_config_dump('token.legacy_revocations_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('token.legacy_exchanges', '');
REVOKE ALL ON token.legacy_issuers, token.legacy_issuer_keys, token.legacy_revocations, token.legacy_exchanges FROM PUBLIC;
REVOKE ALL ON SEQUENCE token.legacy_revocations_id_seq FROM PUBLIC;
GRANT SELECT ON token.legacy_issuers, token.legacy_revocations, token.legacy_exchanges TO token_admin;
ALTER TYPE token.identity ADD ATTRIBUTE deprecation text, ADD ATTRIBUTE sunset_at timestamptz;
ALTER TYPE token.verdict ADD ATTRIBUTE deprecation text, ADD ATTRIBUTE sunset_at timestamptz;
CREATE TRIGGER legacy_issuers_invalidate_caches
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON token.legacy_issuers
    FOR EACH STATEMENT EXECUTE FUNCTION token.invalidate_caches();
CREATE TRIGGER legacy_issuer_keys_invalidate_caches
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON token.legacy_issuer_keys
    FOR EACH STATEMENT EXECUTE FUNCTION token.invalidate_caches();
CREATE TRIGGER legacy_revocations_invalidate_caches
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON token.legacy_revocations
    FOR EACH STATEMENT EXECUTE FUNCTION token.invalidate_caches();
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

CREATE FUNCTION token.register_legacy_issuer(
	"name" TEXT,
	"algorithms" TEXT[],
	"key" TEXT,
	"key_type" TEXT,
	"environment" TEXT,
	"cutoff_at" timestamp with time zone,
	"migration_message" TEXT DEFAULT NULL,
	"issuer" TEXT DEFAULT NULL,
	"audience" TEXT DEFAULT NULL,
	"account_claim" TEXT DEFAULT 'sub',
	"scopes_claim" TEXT DEFAULT 'scope',
	"exchange_ttl" interval DEFAULT NULL
) RETURNS void
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'register_legacy_issuer_wrapper';

CREATE FUNCTION token.alter_legacy_issuer(
	"name" TEXT,
	"cutoff_at" timestamp with time zone DEFAULT NULL,
	"migration_message" TEXT DEFAULT NULL,
	"algorithms" TEXT[] DEFAULT NULL,
	"key" TEXT DEFAULT NULL
) RETURNS void
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'alter_legacy_issuer_wrapper';

CREATE FUNCTION token.drop_legacy_issuer(
	"name" TEXT
) RETURNS bool
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'drop_legacy_issuer_wrapper';

CREATE FUNCTION token.revoke_legacy_jwt(
	"issuer" TEXT,
	"jti" TEXT,
	"reason" TEXT DEFAULT NULL
) RETURNS bool
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'revoke_legacy_jwt_wrapper';

CREATE FUNCTION token.exchange_legacy_jwt(
	"jwt" TEXT,
	"name" TEXT DEFAULT NULL
) RETURNS TABLE (
	"token" TEXT, 
	"token_id" uuid, 
	"expires_at" timestamp with time zone, 
	"first_exchange" bool 
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'exchange_legacy_jwt_wrapper';

REVOKE EXECUTE ON FUNCTION
    token.register_legacy_issuer(text, text[], text, text, text, timestamptz, text, text, text, text, text, interval),
    token.alter_legacy_issuer(text, timestamptz, text, text[], text),
    token.drop_legacy_issuer(text),
    token.revoke_legacy_jwt(text, text, text),
    token.exchange_legacy_jwt(text, text)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION token.exchange_legacy_jwt(text, text) TO token_validator;
GRANT EXECUTE ON FUNCTION
    token.register_legacy_issuer(text, text[], text, text, text, timestamptz, text, text, text, text, text, interval),
    token.alter_legacy_issuer(text, timestamptz, text, text[], text),
    token.drop_legacy_issuer(text),
    token.revoke_legacy_jwt(text, text, text)
TO token_admin;

-- A comment on every function and type (sql/comments.sql, repeated here).
COMMENT ON TYPE token.identity IS
    'What validate_token and authenticate return and current_identity reads: the token''s id, account, key type, environment, scopes, name, expiry, end of grace and metadata';
COMMENT ON TYPE token.verdict IS
    'What check_token returns: valid, the refusal reason, and the identity columns when valid';

COMMENT ON FUNCTION token.create_key_type(text, text, text[], interval, interval, text[], boolean, inet[], token.rate_limit[], boolean, boolean) IS
    'Defines a kind of key: which key types its tokens may validate, TTLs, allowed scopes, networks, rate limits, whether cross_account is concealed, whether reuse of a rotated-away token revokes its family (token_admin)';
COMMENT ON FUNCTION token.register_prefix(text, text, text) IS
    'Registers a token prefix for a key type in an environment; no prefix may start another (token_admin)';
COMMENT ON FUNCTION token.unregister_prefix(text) IS
    'Removes a prefix and revokes every token that carries it (token_admin)';
COMMENT ON FUNCTION token.restore_prefix_tokens(text) IS
    'Brings back the tokens unregister_prefix revoked, under the prefix''s current registration (token_admin)';
COMMENT ON FUNCTION token.generate_token(text, text, text, text[], interval, jsonb, text, bigint, bigint, interval, token.rate_limit[], inet[]) IS
    'Issues a token for an account under a key type, optionally capped, rate-limited or bound to networks; returns its id and the token, shown this once (token_admin)';
COMMENT ON FUNCTION token.derive_token(uuid, text, text[], interval, jsonb, bigint, token.rate_limit[], inet[]) IS
    'Issues a child of a token: at most its scopes, expiry and networks; refused once any ancestor is revoked, disabled or expired (token_admin)';
COMMENT ON FUNCTION token.derive_own_token(text, text, text[], interval, jsonb, bigint, token.rate_limit[], inet[]) IS
    'derive_token by presenting the parent token instead of its id (token_admin; grant it to let holders derive their own)';
COMMENT ON FUNCTION token.update_token(uuid, text, text[], jsonb, timestamptz, bigint, bigint, interval, token.rate_limit[], inet[], text[]) IS
    'Changes a live token in place: name, scopes, metadata, expiry, usage cap, rate limits, networks; unset names fields to clear (token_admin)';
COMMENT ON FUNCTION token.disable_token(uuid, text) IS
    'Refuses a token (disabled) from every session''s next call until enable_token; who and why are recorded (token_admin)';
COMMENT ON FUNCTION token.enable_token(uuid) IS
    'Lets a disabled token validate again (token_admin)';
COMMENT ON FUNCTION token.token_uses(uuid) IS
    'A capped token''s uses, exactly: left in the table plus reserved in shared memory, and its refill (token_admin)';
COMMENT ON FUNCTION token.report_leaked(text[]) IS
    'For secret scanners: revokes every reported token that exists here (reason leaked); one row per input with its hint and outcome (token_reporter, token_admin)';
COMMENT ON FUNCTION token.scanner_patterns() IS
    'Per registered prefix, a regular expression that finds its tokens in text (token_reporter, token_admin)';
COMMENT ON FUNCTION token.rotate_token(uuid, interval) IS
    'Issues a successor; the old token keeps validating for the grace period (token_admin)';
COMMENT ON FUNCTION token.rotate_own_token(text, interval) IS
    'Rotation by presenting the current token instead of its id (token_admin; grant it to let applications rotate their own)';
COMMENT ON FUNCTION token.revoke_token(uuid, text) IS
    'Revokes one token at once: refused by the very next validation in every session (token_admin)';
COMMENT ON FUNCTION token.revoke_token_tree(uuid, text) IS
    'Revokes a token and every token rotated from it, at once: the incident-response call (token_admin)';
COMMENT ON FUNCTION token.revoke_account_tokens(text, text) IS
    'Revokes every live token of an account, in any spelling of it (token_admin)';
COMMENT ON FUNCTION token.hash_token(text) IS
    'SHA-256 of a token: what token.tokens stores';
COMMENT ON FUNCTION token.reasons() IS
    'Every refusal reason with a one-line explanation';
COMMENT ON FUNCTION token.canonical_account(text) IS
    'An account id''s one spelling, as pg_token stores and compares it (''00042'' -> ''42'', uuids lowercase)';
COMMENT ON FUNCTION token.cache_stats() IS
    'This backend''s validation cache: entries, bytes, budget, hits and misses (token_validator)';
COMMENT ON FUNCTION token.current_account() IS
    'The account of the identity authenticate bound in this transaction, or NULL (for policies)';
COMMENT ON FUNCTION token.current_account_uuid() IS
    'current_account() as a uuid, or NULL when it is not one (for policies on uuid tenant keys)';
COMMENT ON FUNCTION token.current_account_bigint() IS
    'current_account() as a bigint, or NULL when it is not one (for policies on bigint tenant keys)';
COMMENT ON FUNCTION token.current_token_id() IS
    'The id of the token authenticate bound in this transaction, or NULL';
COMMENT ON FUNCTION token.current_key_type() IS
    'The key type of the token authenticate bound in this transaction, or NULL';
COMMENT ON FUNCTION token.current_scopes() IS
    'The scopes of the token authenticate bound in this transaction, or NULL';
COMMENT ON FUNCTION token.has_scope(text) IS
    'Whether the token authenticate bound in this transaction carries a scope; false when unauthenticated';
COMMENT ON FUNCTION token.purge_events(interval) IS
    'Deletes events older than an interval (default token.event_retention), recorded; below token.min_event_retention superuser only';
COMMENT ON FUNCTION token.flush_events(interval) IS
    'Waits until the event writer has written every refusal and last-use update queued so far in this database (token_admin)';
COMMENT ON FUNCTION token.worker_status() IS
    'The event writers per database: refusals counted, written, pending, folded, dropped; rows; last-use updates (token_admin)';
COMMENT ON FUNCTION token.metrics() IS
    'One row for monitoring: validations, refusals, cache hits and misses since server start, and this database''s event writer (token_admin, pg_monitor)';
COMMENT ON FUNCTION token.refusal_metrics() IS
    'Refusals by reason since server start, for monitoring (token_admin, pg_monitor)';
COMMENT ON FUNCTION token.invalidate_caches() IS
    'pg_token''s cache trigger: a change to tokens, key types or prefixes empties every backend''s validation cache';
COMMENT ON FUNCTION token.register_legacy_issuer(text, text[], text, text, text, timestamptz, text, text, text, text, text, interval) IS
    'Registers a legacy JWT issuer (HS256 secret, or RS256/ES256 public keys): its JWTs validate, marked deprecated, until cutoff_at (token_admin)';
COMMENT ON FUNCTION token.alter_legacy_issuer(text, timestamptz, text, text[], text) IS
    'Changes a legacy issuer''s cut-off, migration message, or algorithms and key; NULL leaves a field as it is (token_admin)';
COMMENT ON FUNCTION token.drop_legacy_issuer(text) IS
    'Removes a legacy issuer, its key and revocations: its JWTs are refused as unknown_issuer (token_admin)';
COMMENT ON FUNCTION token.revoke_legacy_jwt(text, text, text) IS
    'Revokes one legacy JWT by its issuer and jti, from every session''s next call (token_admin)';
COMMENT ON FUNCTION token.exchange_legacy_jwt(text, text) IS
    'Verifies a legacy JWT and issues an opaque token for its account and scopes, once per JWT (token_validator)';

-- Targeted cache invalidation: a changed token is dropped from every backend's cache through
-- the shared-memory change log, named by the row trigger above; a truncation empties them all.
COMMENT ON FUNCTION token.invalidate_caches() IS
    'pg_token''s cache trigger: a change to key types, prefixes or legacy issuers, or a truncation of tokens, empties every backend''s validation cache';
COMMENT ON FUNCTION token.note_token_change() IS
    'pg_token''s cache trigger on tokens: a changed or deleted token is dropped from every backend''s validation cache, and only it';

-- The validation cache all backends share (token.shared_cache_size): its counters.
CREATE FUNCTION token.shared_cache_stats() RETURNS TABLE (
	"capacity" bigint,
	"bytes" bigint,
	"enabled" bool,
	"hits_total" bigint,
	"fills_total" bigint
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'shared_cache_stats_wrapper';
REVOKE EXECUTE ON FUNCTION token.shared_cache_stats() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION token.shared_cache_stats() TO token_admin, pg_monitor;
COMMENT ON FUNCTION token.shared_cache_stats() IS
    'The validation cache all backends share: capacity, bytes, whether this session uses it, hits and fills since server start (token_admin, pg_monitor)';
