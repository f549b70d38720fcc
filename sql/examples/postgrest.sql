-- Example: PostgREST in front of pg_token. A db-pre-request function authenticates every
-- request with the API key the client sent, so the row-level-security policies of
-- sql/examples/multi_tenant.sql (tenant = token.current_account()) decide what PostgREST's
-- queries see and change.
--
-- Run as a superuser, after sql/examples/multi_tenant.sql, in the database PostgREST serves.
-- Then set the authenticator's password (ALTER ROLE authenticator PASSWORD '...') and:
--
--   # postgrest.conf
--   db-uri         = "postgres://authenticator:<password>@<host>/<database>"
--   db-schemas     = "app"
--   db-anon-role   = "web_api"
--   db-pre-request = "api_auth.pre_request"
--
-- Clients send `X-API-Key: <token>`. Send pg_token tokens in X-API-Key to PostgREST itself:
-- PostgREST reads `Authorization: Bearer ...` as a JWT before any SQL runs and refuses an
-- opaque token there (PGRST301, or PGRST300 when no jwt-secret is configured), so the Bearer
-- branch below only serves PostgREST-compatible servers that leave that header to the
-- database. This function refuses every request without a valid pg_token token, so it
-- replaces PostgREST's JWT authentication rather than adding to it.
--
-- Per request PostgREST runs, as the authenticator, one transaction:
--   BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY;      -- READ WRITE for POST/PATCH/...
--   SELECT set_config('search_path', ..., true), set_config('role', 'web_api', true),
--          set_config('request.jwt.claims', ..., true), set_config('request.method', ..., true),
--          set_config('request.path', ..., true), set_config('request.headers', <json>, true),
--          set_config('request.cookies', ..., true);
--   SELECT "api_auth"."pre_request"();                    -- raises 28000: no rows, nothing done
--   <the query for the request>;
--   COMMIT;
-- The identity pg_token binds belongs to that transaction: the next request on the same
-- pooled connection starts unauthenticated (tests/e2e/test_postgrest.py drives exactly this).
-- PostgREST answers SQLSTATE 28000 with HTTP 403 and the error's message and detail (the
-- reason, and the token's prefix and 4 characters at most).

-- The roles PostgREST uses, created only if missing.
DO $$
BEGIN
    -- Logs in, may do nothing itself but become web_api (NOINHERIT).
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticator') THEN
        CREATE ROLE authenticator LOGIN NOINHERIT NOCREATEDB NOCREATEROLE NOSUPERUSER NOBYPASSRLS;
    END IF;
    -- What every request runs as: table privileges, subject to the policies.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'web_api') THEN
        CREATE ROLE web_api NOLOGIN NOSUPERUSER NOBYPASSRLS;
    END IF;
    -- Owns the pre-request function and alone holds token_validator: web_api, which any
    -- HTTP client reaches, gets no pg_token function but this one.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'api_token_auth') THEN
        CREATE ROLE api_token_auth NOLOGIN NOSUPERUSER NOBYPASSRLS;
    END IF;
END
$$;
GRANT web_api TO authenticator;
GRANT token_validator TO api_token_auth;

GRANT USAGE ON SCHEMA app TO web_api;
GRANT SELECT, INSERT, UPDATE, DELETE ON app.projects TO web_api;

-- Not in db-schemas: PostgREST does not expose it as /rpc/pre_request.
CREATE SCHEMA IF NOT EXISTS api_auth;
GRANT USAGE ON SCHEMA api_auth TO web_api;

-- SECURITY DEFINER with a pinned search_path, and every name qualified anyway (operators
-- included), so a search_path or object planted by a caller changes nothing.
CREATE OR REPLACE FUNCTION api_auth.pre_request() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    raw           pg_catalog.text := pg_catalog.current_setting('request.headers', true);
    headers       pg_catalog.json;
    auth_header   pg_catalog.text;
    presented     pg_catalog.text;
BEGIN
    -- Unset in a session that never had it, '' after a transaction that set it ended.
    IF raw IS NOT NULL AND raw OPERATOR(pg_catalog.<>) '' THEN
        headers := CAST(raw AS pg_catalog.json);
    END IF;
    -- PostgREST lower-cases header names.
    presented := headers OPERATOR(pg_catalog.->>) 'x-api-key';
    IF presented IS NULL THEN
        auth_header := headers OPERATOR(pg_catalog.->>) 'authorization';
        IF pg_catalog.lower(pg_catalog.substr(auth_header, 1, 7)) OPERATOR(pg_catalog.=) 'bearer ' THEN
            presented := pg_catalog.btrim(pg_catalog.substr(auth_header, 8));
        END IF;
    END IF;
    -- No key at all is refused like a bad one (SQLSTATE 28000, 'token rejected: malformed'),
    -- and recorded as a refusal event.
    PERFORM token.authenticate(presented);
END
$$;
ALTER FUNCTION api_auth.pre_request() OWNER TO api_token_auth;
REVOKE ALL ON FUNCTION api_auth.pre_request() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION api_auth.pre_request() TO web_api;
