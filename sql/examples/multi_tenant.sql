-- Example: a multi-tenant schema whose rows only the holder of a valid token can see.
--
-- Run as a superuser (or the schema owner) in a database where `CREATE EXTENSION pg_token`
-- has been done. The demo (scripts/demo.sh) and the end-to-end tests (tests/e2e) load it.
--
-- The pattern:
--   * the application connects as a role that owns nothing, holds token_validator and the
--     table privileges it needs, and is neither superuser nor BYPASSRLS;
--   * every transaction starts with `SELECT token.authenticate($1)`;
--   * policies compare the tenant column with a token.current_account*() accessor, which
--     is NULL outside an authenticated transaction, so an unauthenticated query sees nothing;
--   * the accessors are STABLE, so `tenant = token.current_account()` is an index condition.

CREATE SCHEMA IF NOT EXISTS app;

-- Tenants keyed by text (e.g. slugs): the plain accessor.
CREATE TABLE app.projects (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant  text NOT NULL,
    name    text NOT NULL
);
CREATE INDEX projects_tenant_idx ON app.projects (tenant);

-- Tenants keyed by uuid and by bigint: typed accessors, no casts in the policy, index use kept.
-- (They return NULL, so deny, when the account id is not a uuid / bigint.)
CREATE TABLE app.invoices (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant  uuid NOT NULL,
    amount  numeric(12, 2) NOT NULL
);
CREATE INDEX invoices_tenant_idx ON app.invoices (tenant);

CREATE TABLE app.usage (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant  bigint NOT NULL,
    units   integer NOT NULL
);
CREATE INDEX usage_tenant_idx ON app.usage (tenant);

ALTER TABLE app.projects ENABLE ROW LEVEL SECURITY;
ALTER TABLE app.invoices ENABLE ROW LEVEL SECURITY;
ALTER TABLE app.usage    ENABLE ROW LEVEL SECURITY;

-- A tenant reads and writes its own rows only ...
CREATE POLICY tenant_rows ON app.projects
    USING (tenant = token.current_account())
    WITH CHECK (tenant = token.current_account());
CREATE POLICY tenant_rows ON app.invoices
    USING (tenant = token.current_account_uuid())
    WITH CHECK (tenant = token.current_account_uuid());
CREATE POLICY tenant_rows ON app.usage
    USING (tenant = token.current_account_bigint())
    WITH CHECK (tenant = token.current_account_bigint());

-- ... and changes them only with a token carrying the 'write' scope (restrictive: ANDed).
CREATE POLICY writes_need_scope ON app.projects AS RESTRICTIVE FOR INSERT
    WITH CHECK (token.has_scope('write'));
CREATE POLICY updates_need_scope ON app.projects AS RESTRICTIVE FOR UPDATE
    USING (token.has_scope('write'));
CREATE POLICY deletes_need_scope ON app.projects AS RESTRICTIVE FOR DELETE
    USING (token.has_scope('write'));

-- The application's group role: validate tokens, use the tables, own nothing.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'app_api') THEN
        CREATE ROLE app_api NOLOGIN NOSUPERUSER NOBYPASSRLS;
    END IF;
END
$$;
GRANT token_validator TO app_api;
GRANT USAGE ON SCHEMA app TO app_api;
GRANT SELECT, INSERT, UPDATE, DELETE ON app.projects, app.invoices, app.usage TO app_api;

-- Sample data: two text tenants, one uuid tenant, one bigint tenant each.
INSERT INTO app.projects (tenant, name) VALUES
    ('acme', 'acme-website'), ('acme', 'acme-billing'),
    ('globex', 'globex-research'), ('globex', 'globex-hr'), ('globex', 'globex-ops');
INSERT INTO app.invoices (tenant, amount) VALUES
    ('6f1c1e1a-1111-4c3e-9d1a-aaaaaaaaaaaa', 120.00),
    ('6f1c1e1a-2222-4c3e-9d1a-bbbbbbbbbbbb', 999.99);
INSERT INTO app.usage (tenant, units) VALUES (1001, 5), (1001, 7), (2002, 11);
