-- The bench database's own objects, next to pg_token's: the key type and prefix of the
-- generated tokens, the side table pgbench draws them from, and the row-level-security
-- fixture. Loaded by bench/run.sh into a throwaway cluster; never part of the extension.
CREATE EXTENSION pg_token;
SELECT token.create_key_type('bench', description => 'make bench tokens');
SELECT token.register_prefix('bench-', 'bench', 'dev');

CREATE SCHEMA bench;

-- The n-th generated token in clear, and its row's id: pgbench can only draw integers.
-- Token n belongs to account 'account-' || n % 100000 (see bench.py).
CREATE TABLE bench.plain (
    n      integer PRIMARY KEY,
    id     uuid NOT NULL,
    token  text NOT NULL
);

-- authenticate + RLS: five rows for each account of the hot set (tokens 1..1000), read by a
-- role that neither owns the table nor bypasses RLS.
CREATE TABLE bench.docs (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant  text NOT NULL,
    body    text NOT NULL
);
INSERT INTO bench.docs (tenant, body)
SELECT 'account-' || a, 'document ' || d || ' of account ' || a
  FROM generate_series(1, 1000) a, generate_series(1, 5) d;
CREATE INDEX docs_tenant_idx ON bench.docs (tenant);
ALTER TABLE bench.docs ENABLE ROW LEVEL SECURITY;
CREATE POLICY docs_tenant ON bench.docs USING (tenant = token.current_account());
VACUUM ANALYZE bench.docs;

CREATE ROLE bench_app LOGIN IN ROLE token_validator;
GRANT USAGE ON SCHEMA bench TO bench_app;
GRANT SELECT ON bench.docs TO bench_app;
