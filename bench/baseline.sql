-- The benchmark baseline: what a user would write instead of pg_token, with plain SQL and
-- pgcrypto. Its own table of SHA-256 hashes made with pgcrypto's digest(), and one SQL
-- function doing the same checks as validate_token's hot path: the hash exists, not revoked,
-- not past a rotation's grace deadline, not expired. It is inlined into the calling query
-- (LANGUAGE sql, STABLE, one SELECT), so it costs one index scan and no function call.
-- No format or checksum check, no prefix/environment registry, no cache, no last-use
-- tracking, no events: it does less than pg_token.
CREATE EXTENSION pgcrypto;
CREATE SCHEMA baseline;
CREATE TABLE baseline.api_keys (
    id            uuid PRIMARY KEY,
    key_hash      bytea NOT NULL UNIQUE,
    account       text NOT NULL,
    scopes        text[] NOT NULL DEFAULT '{}',
    expires_at    timestamptz,
    revoke_after  timestamptz,
    revoked_at    timestamptz
);
CREATE FUNCTION baseline.validate(api_key text)
RETURNS TABLE (id uuid, account text, scopes text[], expires_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT k.id, k.account, k.scopes, k.expires_at
      FROM baseline.api_keys k
     WHERE k.key_hash = public.digest(api_key, 'sha256')
       AND k.revoked_at IS NULL
       AND (k.revoke_after IS NULL OR k.revoke_after > now())
       AND (k.expires_at IS NULL OR k.expires_at > now())
$$;
-- Filled by bench/run.sh from bench.plain, hashing each token with digest().
