-- The benchmark baseline: the token table and validation function a user would write with
-- plain SQL and pgcrypto instead of pg_token. Same tokens, same SHA-256, same checks
-- (revoked, past its grace deadline, expired), one inlinable SQL function.
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE SCHEMA IF NOT EXISTS plain;
CREATE TABLE plain.api_keys (
    id            uuid PRIMARY KEY,
    key_hash      bytea NOT NULL UNIQUE,
    account       text NOT NULL,
    scopes        text[] NOT NULL DEFAULT '{}',
    expires_at    timestamptz,
    revoke_after  timestamptz,
    revoked_at    timestamptz
);
CREATE FUNCTION plain.validate(api_key text)
RETURNS TABLE (id uuid, account text, scopes text[], expires_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT k.id, k.account, k.scopes, k.expires_at
      FROM plain.api_keys k
     WHERE k.key_hash = public.digest(api_key, 'sha256')
       AND k.revoked_at IS NULL
       AND (k.revoke_after IS NULL OR k.revoke_after > now())
       AND (k.expires_at IS NULL OR k.expires_at > now())
$$;
