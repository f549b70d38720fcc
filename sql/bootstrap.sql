-- pg_token: tables, types, views and roles. Loaded before any function is created.
--
-- pg_token reads and writes text as UTF-8 (account ids, scopes, names); refuse any other
-- database encoding up front rather than fail on the first non-ASCII value.
DO $encoding$
BEGIN
    IF pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.<>) 'UTF8' THEN
        RAISE EXCEPTION 'pg_token requires a UTF8 database'
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = pg_catalog.format('This database''s encoding is %s.', pg_catalog.getdatabaseencoding()),
                  HINT = 'Create the database with ENCODING ''UTF8''.';
    END IF;
END
$encoding$;
--
-- Nothing here is readable by PUBLIC. Applications validate through functions granted to
-- token_validator; DBAs manage through functions granted to token_admin and read the
-- token_list view and the events table.

-- A rate limit: at most `requests` accepted validations per `per` (fixed windows, counted
-- across the server). Tokens and key types hold a list of them.
CREATE TYPE token.rate_limit AS (
    requests  integer,
    per       interval
);
COMMENT ON TYPE token.rate_limit IS
    'A rate limit: at most requests accepted validations per window (per), counted across every backend of the server';

CREATE TABLE token.key_types (
    name            text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    description     text,
    can_validate    text[] NOT NULL DEFAULT '{}',
    default_ttl     interval CHECK (default_ttl > interval '0'),
    max_ttl         interval CHECK (max_ttl > interval '0'),
    allowed_scopes  text[],
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CHECK (default_ttl IS NULL OR max_ttl IS NULL OR default_ttl <= max_ttl),
    -- What its tokens inherit unless they carry their own: the networks they may be used
    -- from (NULL: anywhere) and their rate limits. And whether a caller token of another
    -- account is told not_found instead of cross_account.
    allowed_networks       cidr[],
    rate_limits            token.rate_limit[],
    conceal_cross_account  boolean NOT NULL DEFAULT false,
    -- Token families: a token rotated away and presented after its grace window revokes its
    -- whole rotation family (refresh-token reuse detection, RFC 9700 4.14.2).
    reuse_detection        boolean NOT NULL DEFAULT false
);
COMMENT ON TABLE token.key_types IS
    'Kinds of keys: which other kinds they may validate, their TTL bounds and allowed scopes';

CREATE TABLE token.prefixes (
    prefix       text PRIMARY KEY
                 CHECK (prefix ~ '^[A-Za-z0-9_-]{1,31}[_-]$' AND prefix ~ '[A-Za-z0-9]'),
    key_type     text NOT NULL REFERENCES token.key_types (name),
    environment  text NOT NULL CHECK (environment ~ '^[a-z][a-z0-9_]{0,31}$'),
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX prefixes_key_type_environment_idx ON token.prefixes (key_type, environment);
COMMENT ON TABLE token.prefixes IS
    'Registered token prefixes; the prefix names the key type and the environment';

CREATE TABLE token.tokens (
    id              uuid PRIMARY KEY DEFAULT pg_catalog.gen_random_uuid(),
    token_hash      bytea NOT NULL CHECK (pg_catalog.octet_length(token_hash) = 32),
    hint            text NOT NULL,
    prefix          text NOT NULL,
    account         text NOT NULL CHECK (pg_catalog.length(account) BETWEEN 1 AND 256),
    key_type        text NOT NULL REFERENCES token.key_types (name),
    environment     text NOT NULL,
    name            text,
    scopes          text[] NOT NULL DEFAULT '{}',
    metadata        jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    expires_at      timestamptz,
    revoke_after    timestamptz,
    revoked_at      timestamptz,
    revoked_reason  text,
    last_used_at    timestamptz,
    rotated_from    uuid REFERENCES token.tokens (id) ON DELETE SET NULL,
    -- The rotation family: the id of the token the lineage started with, and when it was
    -- issued (rotation never carries a family past that plus its key type's max_ttl).
    family_id         uuid NOT NULL,
    family_issued_at  timestamptz NOT NULL,
    -- disable_token / enable_token: reversible, unlike revocation.
    disabled_at       timestamptz,
    disabled_reason   text,
    -- derive_token: the token this one was derived from; removing a parent removes its
    -- descendants (they would be refused anyway).
    parent_id         uuid REFERENCES token.tokens (id) ON DELETE CASCADE,
    -- The token's own networks and rate limits (NULL: its key type's).
    allowed_networks  cidr[],
    rate_limits       token.rate_limit[],
    -- The usage cap: uses not yet reserved (NULL: uncapped), refilled to refill_uses every
    -- refill_interval. The event writer reserves uses in blocks for the server's backends;
    -- uses_version changes with every administrative change of the cap.
    uses_remaining    bigint CHECK (uses_remaining >= 0),
    uses_version      bigint NOT NULL DEFAULT 0,
    refill_uses       bigint CHECK (refill_uses > 0),
    refill_interval   interval CHECK (refill_interval > interval '0'),
    refilled_at       timestamptz,
    -- When the token's rotation family was revoked because a rotated-away member was reused
    -- (set on every member, with revoked_at; such tokens are refused as family_revoked).
    family_revoked_at timestamptz,
    CONSTRAINT tokens_refill_check CHECK ((refill_uses IS NULL) = (refill_interval IS NULL)
                                          AND (refill_uses IS NULL OR uses_remaining IS NOT NULL)),
    -- Unique through a hash index: validation looks a token up by its hash and nothing else,
    -- and a hash index finds it in one bucket page however large the table grows, where a
    -- B-tree over 32-byte keys gains a level each time the table grows a few hundredfold.
    CONSTRAINT tokens_token_hash_excl EXCLUDE USING hash (token_hash WITH OPERATOR(pg_catalog.=))
) WITH (fillfactor = 90);  -- room for HOT updates of last_used_at
CREATE INDEX tokens_account_idx ON token.tokens (account);
CREATE INDEX tokens_rotated_from_idx ON token.tokens (rotated_from) WHERE rotated_from IS NOT NULL;
CREATE INDEX tokens_family_id_idx ON token.tokens (family_id);
CREATE INDEX tokens_parent_id_idx ON token.tokens (parent_id) WHERE parent_id IS NOT NULL;
COMMENT ON TABLE token.tokens IS
    'Issued tokens. Only the SHA-256 hash of a token is stored, never the token';

CREATE SEQUENCE token.events_id_seq;
CREATE TABLE token.events (
    id                bigint PRIMARY KEY DEFAULT pg_catalog.nextval('token.events_id_seq'),
    occurred_at       timestamptz NOT NULL,
    event             text NOT NULL,
    reason            text,
    token_id          uuid,
    account           text,
    prefix            text,
    hint              text,
    environment       text,
    caller_token_id   uuid,
    detail            text,
    client_addr       text,
    application_name  text,
    db_user           text,
    backend_pid       integer,
    -- Refusals are counted, not listed: one row per key (reason, prefix, environment, client,
    -- user, application, hint) and window, with how many refusals it stands for and when the
    -- last one came (occurred_at is the first). folded says how the key was coarsened: 'hints'
    -- (the source made too many distinct hints: hint left out), 'rate' (beyond
    -- token.max_event_rows: only the reason kept). Lifecycle events have count 1.
    count             bigint NOT NULL DEFAULT 1,
    last_at           timestamptz,
    folded            text
);
ALTER SEQUENCE token.events_id_seq OWNED BY token.events.id;
CREATE INDEX events_occurred_at_idx ON token.events (occurred_at);
CREATE INDEX events_token_id_idx ON token.events (token_id) WHERE token_id IS NOT NULL;
CREATE INDEX events_last_at_idx ON token.events (last_at) WHERE last_at IS NOT NULL;
COMMENT ON TABLE token.events IS
    'Security events: refusals (counted per key and window), generate, rotate, revoke. Refusals survive the caller''s rollback';

-- The validation caches' signal. pg_token's triggers send a relcache invalidation for this
-- type's relation whenever tokens, key types or prefixes change, and every backend empties its
-- cache when it arrives. A composite type, so that nothing else ever invalidates it: the
-- tables themselves are invalidated by every VACUUM and ANALYZE too.
CREATE TYPE token.cache_signal AS ();
COMMENT ON TYPE token.cache_signal IS
    'pg_token: invalidated by the cache triggers to empty every backend''s validation cache; holds nothing';

-- What validate_token returns and what token.current_identity() reads.
CREATE TYPE token.identity AS (
    token_id      uuid,
    account       text,
    key_type      text,
    environment   text,
    scopes        text[],
    name          text,
    expires_at    timestamptz,
    revoke_after  timestamptz,
    metadata      jsonb,
    parent_id       uuid,
    -- Per call: uses left after this one, and the binding rate limit's state (for
    -- RateLimit-Limit / -Remaining / -Reset headers). NULL when the token has none.
    uses_remaining  bigint,
    rate_limit      integer,
    rate_remaining  integer,
    rate_reset_at   timestamptz,
    -- A legacy JWT (migrating from JWTs): why it is deprecated and when it stops working
    -- (its issuer's cut-off), for X-Auth-Deprecation and Sunset headers. NULL for tokens.
    deprecation     text,
    sunset_at       timestamptz
);

-- What check_token returns: the verdict and, when valid, the identity.
CREATE TYPE token.verdict AS (
    valid         boolean,
    reason        text,
    token_id      uuid,
    account       text,
    key_type      text,
    environment   text,
    scopes        text[],
    name          text,
    expires_at    timestamptz,
    revoke_after  timestamptz,
    metadata      jsonb,
    parent_id       uuid,
    uses_remaining  bigint,
    rate_limit      integer,
    rate_remaining  integer,
    rate_reset_at   timestamptz,
    deprecation     text,
    sunset_at       timestamptz
);

CREATE VIEW token.token_list AS
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
COMMENT ON VIEW token.token_list IS 'Every token with everything but its hash, and its status now';

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

-- Configuration and tokens travel with pg_dump; events too (they are the audit trail).
SELECT pg_catalog.pg_extension_config_dump('token.key_types', '');
SELECT pg_catalog.pg_extension_config_dump('token.prefixes', '');
SELECT pg_catalog.pg_extension_config_dump('token.tokens', '');
SELECT pg_catalog.pg_extension_config_dump('token.events', '');
SELECT pg_catalog.pg_extension_config_dump('token.events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('token.legacy_issuers', '');
SELECT pg_catalog.pg_extension_config_dump('token.legacy_issuer_keys', '');
SELECT pg_catalog.pg_extension_config_dump('token.legacy_revocations', '');
SELECT pg_catalog.pg_extension_config_dump('token.legacy_revocations_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('token.legacy_exchanges', '');

-- Roles are cluster-wide: create them once, keep them when the extension is dropped.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'token_validator') THEN
        CREATE ROLE token_validator NOLOGIN;
        COMMENT ON ROLE token_validator IS 'pg_token: may validate, check and authenticate tokens; nothing else';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'token_admin') THEN
        CREATE ROLE token_admin NOLOGIN;
        COMMENT ON ROLE token_admin IS 'pg_token: manages key types, prefixes and tokens; reads events';
    END IF;
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

REVOKE ALL ON ALL TABLES IN SCHEMA token FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA token FROM PUBLIC;
-- Policies call token.current_account() as the querying user, so the schema is usable.
GRANT USAGE ON SCHEMA token TO PUBLIC;
GRANT SELECT ON token.token_list, token.events, token.key_types, token.prefixes, token.legacy_issuers,
    token.legacy_revocations, token.legacy_exchanges TO token_admin;
