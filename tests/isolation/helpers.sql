-- Loaded by run.sh into the isolation database before the specs run: what every spec shares.
--
-- Sessions act as the roles that use pg_token in production: `SET ROLE iso_app` (a
-- token_validator, like an application) and `SET ROLE iso_admin` (a token_admin). A session
-- that edits token.tokens directly stays superuser, and says so.
--
-- Tokens are random, so a spec keeps the ones it issues in iso.t and its steps read them by
-- name (iso.token('a')); the output shows verdicts and reasons, never a token or a token id.
-- Both tables are UNLOGGED: no plaintext token is written to the WAL, and run.sh drops the
-- whole database at the end, so none stays in a data file (tests/leakcheck.py searches them).
-- Autovacuum is off for them: an ANALYZE would copy sample values (tokens) into
-- pg_statistic, which is WAL-logged (seen on PostgreSQL 18 with the family specs).

SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pg_token;
CREATE SCHEMA iso;

-- Every token the specs received; run.sh copies them to $PGT_TOKENS for the leak check.
CREATE UNLOGGED TABLE iso.issued (token text NOT NULL) WITH (autovacuum_enabled = false);

-- The current permutation's tokens, by name.
CREATE UNLOGGED TABLE iso.t (name text PRIMARY KEY, id uuid NOT NULL, token text NOT NULL)
    WITH (autovacuum_enabled = false);

CREATE FUNCTION iso.token(label text) RETURNS text
LANGUAGE sql STABLE STRICT
RETURN (SELECT t.token FROM iso.t WHERE t.name = label);

CREATE FUNCTION iso.id(label text) RETURNS uuid
LANGUAGE sql STABLE STRICT
RETURN (SELECT t.id FROM iso.t WHERE t.name = label);

-- Issues a token and files it under `label`. Procedures, so that a spec's setup and
-- teardown print nothing.
CREATE PROCEDURE iso.issue(label text, for_account text, of_key_type text, with_scopes text[] DEFAULT '{}')
LANGUAGE sql
BEGIN ATOMIC
    INSERT INTO iso.t (name, id, token)
    SELECT label, g.token_id, g.token
    FROM token.generate_token(for_account, of_key_type, scopes => with_scopes) AS g;
    INSERT INTO iso.issued (token) SELECT t.token FROM iso.t WHERE t.name = label;
END;

CREATE FUNCTION iso.mask_ids(message text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT
RETURN pg_catalog.regexp_replace(message,
    '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<token id>', 'g');

-- Rotates the token filed under `label` and files its successor under `successor`. Errors
-- are re-raised with the same SQLSTATE and message, but with token ids (random) masked.
CREATE FUNCTION iso.rotate(label text, successor text, grace interval DEFAULT '1 hour')
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    state text;
    message text;
    hint text;
BEGIN
    INSERT INTO iso.t (name, id, token)
    SELECT successor, r.token_id, r.token
    FROM token.rotate_token(iso.id(label), grace) AS r;
    INSERT INTO iso.issued (token) SELECT t.token FROM iso.t WHERE t.name = successor;
    RETURN 'rotated';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT;
    IF hint = '' THEN
        RAISE EXCEPTION USING ERRCODE = state, MESSAGE = iso.mask_ids(message);
    END IF;
    RAISE EXCEPTION USING ERRCODE = state, MESSAGE = iso.mask_ids(message), HINT = iso.mask_ids(hint);
END
$$;

-- rotate_own_token: the holder presents the token filed under `label` (errors masked as above).
CREATE FUNCTION iso.rotate_own(label text, successor text, grace interval DEFAULT '1 hour')
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    state text;
    message text;
BEGIN
    INSERT INTO iso.t (name, id, token)
    SELECT successor, r.token_id, r.token
    FROM token.rotate_own_token(iso.token(label), grace) AS r;
    INSERT INTO iso.issued (token) SELECT t.token FROM iso.t WHERE t.name = successor;
    RETURN 'rotated';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
    RAISE EXCEPTION USING ERRCODE = state, MESSAGE = iso.mask_ids(message);
END
$$;

-- Every token of the permutation as its row says (no token is presented: presenting a token
-- rotated away would itself be a reuse), then the verdict of each token no rotation replaced.
CREATE FUNCTION iso.family_state()
RETURNS TABLE (name text, status text, family_revoked boolean, verdict text)
LANGUAGE sql AS $$
    SELECT t.name, l.status, l.family_revoked_at IS NOT NULL,
           CASE WHEN l.revoke_after IS NULL
                THEN (SELECT COALESCE(c.reason, 'valid') FROM token.check_token(t.token) AS c) END
      FROM iso.t AS t JOIN token.token_list AS l ON l.id = t.id
     ORDER BY t.name
$$;

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'iso_app') THEN
        CREATE ROLE iso_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'iso_admin') THEN
        CREATE ROLE iso_admin NOLOGIN;
    END IF;
END
$roles$;
GRANT token_validator TO iso_app;
GRANT token_admin TO iso_admin;
GRANT USAGE ON SCHEMA iso TO iso_app, iso_admin;
GRANT SELECT ON iso.t TO iso_app;
GRANT SELECT, INSERT ON iso.t, iso.issued TO iso_admin;

-- A spec's teardown: forget the permutation's tokens and registry (iso.issued is kept).
CREATE PROCEDURE iso.reset() LANGUAGE sql
BEGIN ATOMIC
    DELETE FROM iso.t;
    DELETE FROM token.tokens;
    DELETE FROM token.prefixes;
    DELETE FROM token.key_types;
END;
