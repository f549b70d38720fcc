-- The narrated lifecycle demo, run by scripts/demo.sh with psql against a throwaway cluster.
-- psql variables from the script: app_conninfo (TCP as the application role) and
-- admin_conninfo (the superuser over the unix socket).
\set ON_ERROR_STOP 1
\set QUIET 1
\pset footer off
\pset null '(null)'

\echo
\echo '== 1. A DBA registers key types and prefixes (the prefix names key type and environment)'
CREATE EXTENSION pg_token;
\o /dev/null
SELECT token.create_key_type('agent', description => 'machine keys of one account',
                             allowed_scopes => '{read,write}', max_ttl => '90 days');
SELECT token.create_key_type('mid', description => 'mid-tier keys that may validate agent keys',
                             can_validate => '{agent}');
SELECT token.register_prefix('cf-', 'agent', 'dev');
SELECT token.register_prefix('cfprd-', 'agent', 'prod');
SELECT token.register_prefix('cfmid_', 'mid', 'dev');
\o
SELECT prefix, key_type, environment FROM token.prefixes ORDER BY prefix;
SHOW token.environment;

\echo '== The example multi-tenant schema (sql/examples/multi_tenant.sql) and an application role'
\ir multi_tenant.sql
CREATE ROLE demo_app LOGIN PASSWORD 'demo-password' IN ROLE app_api;

\echo
\echo '== 2. generate: the plaintext is shown once; only its SHA-256 is stored'
SELECT token_id AS acme_id, token AS acme_token
  FROM token.generate_token('acme', 'agent', name => 'ci deploy', scopes => '{read,write}',
                            expires_in => '30 days') \gset
\echo 'token for acme:' :acme_token
SELECT hint, account, key_type, environment, scopes, status FROM token.token_list WHERE id = :'acme_id';
SELECT encode(token_hash, 'hex') AS stored_hash FROM token.tokens WHERE id = :'acme_id';

\echo
\echo '== 3. validate, as the application (TCP, a role that can validate and nothing else)'
\connect :app_conninfo
\set QUIET 1
SELECT token_id = :'acme_id' AS same_id, account, key_type, environment, scopes, name
  FROM token.validate_token(:'acme_token');
\echo 'the application may not read the token table:'
\set ON_ERROR_STOP 0
SELECT count(*) FROM token.tokens;
\set ON_ERROR_STOP 1

\echo
\echo '== 4. rotate: a successor with the same identity; the old token lives for the grace window'
\connect :admin_conninfo
\set QUIET 1
SELECT token_id AS new_id, token AS new_token FROM token.rotate_token(:'acme_id', grace => '24 hours') \gset
\echo 'successor:' :new_token
SELECT hint, status, revoke_after IS NOT NULL AS has_grace_deadline FROM token.token_list
 WHERE id IN (:'acme_id', :'new_id') ORDER BY created_at, hint;

\echo
\echo '== 5. both validate during the grace window'
\connect :app_conninfo
\set QUIET 1
SELECT 'old' AS which, valid, reason, account FROM token.check_token(:'acme_token')
UNION ALL
SELECT 'new', valid, reason, account FROM token.check_token(:'new_token');

\echo
\echo '== 6. revoke the successor; the very next validation fails, in every session'
\connect :admin_conninfo
\set QUIET 1
SELECT token.revoke_token(:'new_id', 'demo: leaked') AS revoked;
\connect :app_conninfo
\set QUIET 1
\set ON_ERROR_STOP 0
SELECT * FROM token.validate_token(:'new_token');
\set ON_ERROR_STOP 1
SELECT valid, reason FROM token.check_token(:'new_token');

\echo
\echo '== 7. trust boundaries: a dev token in a prod database, typos, a mid key of another account'
\connect :admin_conninfo
\set QUIET 1
SELECT token AS mid_globex FROM token.generate_token('globex', 'mid') \gset
SELECT token AS agent_acme FROM token.generate_token('acme', 'agent', scopes => '{read}') \gset
SELECT token AS mid_acme FROM token.generate_token('acme', 'mid') \gset
-- A second database serving prod, with the same prefix registry (normally another cluster).
CREATE DATABASE demo_prod;
ALTER DATABASE demo_prod SET token.environment = 'prod';
\connect :prod_admin_conninfo
\set QUIET 1
CREATE EXTENSION pg_token;
\o /dev/null
SELECT token.create_key_type('agent'), token.register_prefix('cf-', 'agent', 'dev'),
       token.register_prefix('cfprd-', 'agent', 'prod');
\o
\connect :prod_app_conninfo
\set QUIET 1
\echo 'the dev token presented to the prod database (the prefix decides, before any lookup):'
\set ON_ERROR_STOP 0
SELECT * FROM token.validate_token(:'agent_acme');
\set ON_ERROR_STOP 1
\connect :app_conninfo
\set QUIET 1
SELECT 'typo in the token' AS case, reason FROM token.check_token(left(:'agent_acme', -1) || 'x')
UNION ALL SELECT 'mid of acme validates agent of acme', coalesce(reason, 'valid')
  FROM token.check_token(:'agent_acme', caller_token => :'mid_acme')
UNION ALL SELECT 'mid of globex validates agent of acme', reason
  FROM token.check_token(:'agent_acme', caller_token => :'mid_globex')
UNION ALL SELECT 'agent of acme validates mid of acme', reason
  FROM token.check_token(:'mid_acme', caller_token => :'agent_acme')
UNION ALL SELECT 'agent key asks for write scope', reason
  FROM token.check_token(:'agent_acme', required_scope => 'write');

\echo '== 8. row-level security: authenticate binds the identity to the transaction'
\echo 'without a token the application sees no rows:'
SELECT count(*) AS visible_projects FROM app.projects;
BEGIN;
SELECT account FROM token.authenticate(:'agent_acme');
SELECT tenant, name FROM app.projects ORDER BY name;
\echo 'settings cannot forge an identity (it lives in backend memory, not in a GUC; token.* names'
\echo 'cannot even be set): a PostgREST-style claim setting changes nothing:'
SELECT set_config('request.jwt.claims', '{"sub": "globex"}', true) AS forged_setting,
       token.current_account() AS current_account;
COMMIT;
\echo 'after COMMIT the identity is gone:'
SELECT token.current_account() AS current_account, count(*) AS visible_projects FROM app.projects;

\echo
\echo '== 9. every refusal left a durable event (hint only, never the token)'
\connect :admin_conninfo
\set QUIET 1
SELECT token.flush_events() AS flushed;
SELECT event, reason, hint, account, environment, client_addr, db_user
  FROM token.events ORDER BY id;
\connect :prod_admin_conninfo
\set QUIET 1
SELECT token.flush_events() AS flushed;
\echo 'and in the prod database:'
SELECT event, reason, hint, environment, detail, db_user FROM token.events WHERE event = 'refused';
