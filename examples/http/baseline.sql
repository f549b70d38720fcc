-- The comparison variant of the HTTP example (PG_TOKEN_HTTP_BACKEND=baseline): the rows the
-- plain SQL + pgcrypto approach serves, with the policy such an application writes.
--
-- Run as a superuser after sql/examples/multi_tenant.sql (for the app_api role) and
-- bench/baseline.sql (pgcrypto, baseline.api_keys, baseline.validate). tests/http loads it.
--
-- The service looks the key's hash up with baseline.validate() and then sets
-- `app.tenant` for the transaction (set_config(..., true)); the policy compares with it.
-- The weakness pg_token removes: app.tenant is an ordinary setting, so any SQL the
-- application runs (or an injection into it) can SET it to another tenant; and the role
-- must be able to read every key hash, since the inlined SQL function runs with its rights.

CREATE TABLE baseline.projects (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant  text NOT NULL,
    name    text NOT NULL
);
CREATE INDEX projects_tenant_idx ON baseline.projects (tenant);
ALTER TABLE baseline.projects ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON baseline.projects
    USING (tenant = pg_catalog.current_setting('app.tenant', true))
    WITH CHECK (tenant = pg_catalog.current_setting('app.tenant', true));

GRANT USAGE ON SCHEMA baseline TO app_api;
GRANT SELECT ON baseline.api_keys TO app_api;
GRANT SELECT, INSERT ON baseline.projects TO app_api;

-- The same sample rows as app.projects.
INSERT INTO baseline.projects (tenant, name) VALUES
    ('acme', 'acme-website'), ('acme', 'acme-billing'),
    ('globex', 'globex-research'), ('globex', 'globex-hr'), ('globex', 'globex-ops');
