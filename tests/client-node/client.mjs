// pg_token from a Node.js application's point of view: node-postgres (`pg`) over TCP with a
// SCRAM password, as ordinary roles: node_app (token_validator, and app_api's table rights for
// the row-level-security step) and node_admin (token_admin). Every value goes to the server as
// a bound parameter ($1), never spliced into SQL text; validations reuse a named prepared
// statement on one open connection, as an application's hot path would.
//
// It proves: generate (the token's shape, what the admin can see of it), validate (every
// identity field), check_token's refusal reasons, validate_token raising SQLSTATE 28000 with
// the reason in its message and no token anywhere in the error, rotation (both tokens valid
// during the grace), revocation (refused on the very next call, cache warm), authenticate +
// RLS in a transaction, and that the validator cannot read token.tokens (42501).
//
// Run by tests/client-node/run.sh (under scripts/test.sh or standalone). Every plaintext token
// it receives or makes up is appended to $PGT_TOKENS for the leak check; it prints hints only.
// Exits 1 on the first failure, saying what failed.

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import pg from 'pg';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');
const PASSWORD = 'node-e2e-password';
const ADMIN = 'node_admin';
const APP = 'node_app';
const DEV = 'nd-';
const MID = 'ndmid_';
const PROD = 'ndprd-';
const ALPHABET = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';

class Failure extends Error {}

const secrets = [];
let errorsChecked = 0;

function setting(name) {
  const value = process.env[name];
  if (!value) throw new Failure(`${name} is not set: run tests/client-node/run.sh`);
  return value;
}

const settings = {};

function say(step, line) {
  console.log(`[node] ${step.padEnd(8)} ${line}`);
}

// -------------------------------------------------------------------------------------------
// Secrets: recorded for the leak check, shown as hints only.

function record(token) {
  fs.appendFileSync(settings.tokens, token + '\n');
  secrets.push(token);
  return token;
}

function hint(token) {
  return token.length > 24 ? token.slice(0, token.length - 24) : '(short)';
}

function redact(text) {
  let out = String(text);
  for (const t of secrets) out = out.split(t.slice(-28, -6)).join('<token body>');
  return out;
}

function check(condition, what) {
  if (!condition) throw new Failure(redact(what));
}

function same(got, want, what) {
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  check(g === w, `${what}: expected ${w}, got ${g}`);
}

// No token, nor its random body, in anything an error carries.
function noSecretIn(err, what) {
  const texts = [err.message, err.detail, err.hint, err.where, err.internalQuery, err.stack, JSON.stringify(err)];
  for (const t of secrets) {
    for (const text of texts) {
      if (text && String(text).includes(t.slice(-28, -6))) {
        throw new Failure(`${what}: the error carries token ${hint(t)}...`);
      }
    }
  }
}

async function refused(client, query, sqlstate, what) {
  let result;
  try {
    result = await client.query(query);
  } catch (err) {
    if (err instanceof Failure) throw err;
    check(err.code === sqlstate, `${what}: expected SQLSTATE ${sqlstate}, got ${err.code} (${err.message})`);
    noSecretIn(err, what);
    errorsChecked += 1;
    return err;
  }
  throw new Failure(`${what}: expected SQLSTATE ${sqlstate}, got ${result.rowCount} rows`);
}

// -------------------------------------------------------------------------------------------
// Token syntax, as src/core/format.rs and the README define it: <prefix><22 base62><6 base62 CRC32>.

// CRC-32 (IEEE, as zlib): written out so that Node.js 18 (Debian 12's) needs no zlib.crc32.
const CRC_TABLE = Array.from({ length: 256 }, (_, i) => {
  let c = i;
  for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(text) {
  let c = 0xffffffff;
  for (const byte of Buffer.from(text, 'utf8')) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function checksum(prefix, body) {
  let n = crc32(prefix + body);
  let digits = '';
  for (let i = 0; i < 6; i += 1) {
    digits = ALPHABET[n % 62] + digits;
    n = Math.floor(n / 62);
  }
  return digits;
}

// A well-formed token (right checksum) that was never issued.
function compose(prefix) {
  let body = '';
  for (const b of crypto.randomBytes(22)) body += ALPHABET[b % 62];
  return record(prefix + body + checksum(prefix, body));
}

function checkShape(token, prefix) {
  check(token.startsWith(prefix), `token ${hint(token)} does not start with ${prefix}`);
  const rest = token.slice(prefix.length);
  check(/^[0-9A-Za-z]{28}$/.test(rest), `token ${hint(token)}: not 28 base62 characters after the prefix`);
  check(checksum(prefix, rest.slice(0, 22)) === rest.slice(22), `token ${hint(token)}: the checksum is not CRC32 in base62`);
}

// -------------------------------------------------------------------------------------------
// Connections.

// The server stores only this verifier, and it is all the SQL text carries, so
// log_statement = 'all' logs no password (CREATE ROLE takes no bound parameters).
function scramVerifier(password) {
  const salt = crypto.randomBytes(16);
  const iterations = 4096;
  const salted = crypto.pbkdf2Sync(password, salt, iterations, 32, 'sha256');
  const clientKey = crypto.createHmac('sha256', salted).update('Client Key').digest();
  const storedKey = crypto.createHash('sha256').update(clientKey).digest();
  const serverKey = crypto.createHmac('sha256', salted).update('Server Key').digest();
  return `SCRAM-SHA-256$${iterations}:${salt.toString('base64')}$${storedKey.toString('base64')}:${serverKey.toString('base64')}`;
}

async function connect(options) {
  const client = new pg.Client({
    port: settings.port,
    database: settings.database,
    application_name: 'pg_token-client-node',
    connectionTimeoutMillis: 15000,
    statement_timeout: 30000,
    ...options,
  });
  await client.connect();
  return client;
}

async function superuser() {
  return connect({ host: settings.socket, user: 'postgres' });
}

async function login(role, admin) {
  let bad;
  try {
    bad = await connect({ host: settings.host, user: role, password: 'not-the-password' });
  } catch (err) {
    check(err.code === '28P01', `${role} with a wrong password: expected SQLSTATE 28P01, got ${err.code}`);
    errorsChecked += 1;
  }
  if (bad) {
    await bad.end();
    throw new Failure(`${role} logged in with a wrong password`);
  }
  const client = await connect({ host: settings.host, user: role, password: PASSWORD });
  const row = (await client.query(`
    SELECT current_user::text AS who, r.rolsuper, r.rolbypassrls,
           pg_catalog.pg_has_role(current_user, 'token_admin', 'MEMBER') AS admin,
           pg_catalog.pg_has_role(current_user, 'token_validator', 'MEMBER') AS validator,
           pg_catalog.host(pg_catalog.inet_client_addr()) AS addr
      FROM pg_catalog.pg_roles r WHERE r.rolname = current_user`)).rows[0];
  same(row.who, role, 'current_user');
  check(!row.rolsuper && !row.rolbypassrls, `${role} must be neither superuser nor BYPASSRLS`);
  same(row.admin, admin, `${role} is a member of token_admin`);
  check(row.validator, `${role} must be a member of token_validator`);
  same(row.addr, settings.host, `${role}'s client address (TCP)`);
  return client;
}

// -------------------------------------------------------------------------------------------
// The steps.

async function setup(su) {
  const verifier = scramVerifier(PASSWORD);
  await su.query(`
    CREATE EXTENSION pg_token;
    SELECT token.create_key_type('agent', allowed_scopes => '{read,write}');
    SELECT token.create_key_type('mid', can_validate => '{agent}');
    SELECT token.register_prefix('${DEV}', 'agent', 'dev');
    SELECT token.register_prefix('${MID}', 'mid', 'dev');
    SELECT token.register_prefix('${PROD}', 'agent', 'prod');`);
  await su.query(fs.readFileSync(path.join(ROOT, 'sql', 'examples', 'multi_tenant.sql'), 'utf8'));
  await su.query(`
    DROP ROLE IF EXISTS ${ADMIN};
    DROP ROLE IF EXISTS ${APP};
    CREATE ROLE ${ADMIN} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD '${verifier}';
    CREATE ROLE ${APP} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD '${verifier}';
    GRANT token_admin TO ${ADMIN};
    GRANT token_validator TO ${APP};
    GRANT app_api TO ${APP};`);
  const env = (await su.query('SHOW token.environment')).rows[0]['token.environment'];
  same(env, 'dev', 'token.environment of the cluster');
  say('setup', `database ${settings.database}: key types agent{read,write} and mid (can validate agent), ` +
    `prefixes ${DEV} ${MID} (dev) ${PROD} (prod), sql/examples/multi_tenant.sql; roles ${ADMIN} (token_admin), ` +
    `${APP} (token_validator, app_api)`);
}

const GENERATE = 'SELECT token_id, token FROM token.generate_token($1, $2, name => $3, scopes => $4, expires_in => $5, metadata => $6)';

async function generate(admin, account, { keyType = 'agent', name = null, scopes = ['read'], expiresIn = null, metadata = {} } = {}) {
  const r = await admin.query({ text: GENERATE, values: [account, keyType, name, scopes, expiresIn, metadata] });
  same(r.rowCount, 1, 'rows from generate_token');
  const { token_id: id, token } = r.rows[0];
  record(token);
  return { id, token };
}

// Named prepared statements: parsed once per connection, then only bound and executed.
const VALIDATE = (token, caller = null, scope = null) => ({
  name: 'validate', text: 'SELECT * FROM token.validate_token($1, $2, $3)', values: [token, caller, scope],
});
const CHECK = (token, caller = null, scope = null) => ({
  name: 'check', text: 'SELECT valid, reason, account FROM token.check_token($1, $2, $3)', values: [token, caller, scope],
});

async function stepGenerate(admin) {
  const issued = await generate(admin, 'acme', { name: 'node-ci', scopes: ['read'], expiresIn: '30 days', metadata: { team: 'node' } });
  checkShape(issued.token, DEV);
  check(/^[0-9a-f-]{36}$/.test(issued.id), `token_id ${issued.id} is not a uuid`);
  const listed = await admin.query({
    text: 'SELECT hint, status, account, name, scopes FROM token.token_list WHERE id = $1',
    values: [issued.id],
  });
  same(listed.rowCount, 1, 'token_list rows for the new token');
  same(listed.rows[0], { hint: hint(issued.token), status: 'active', account: 'acme', name: 'node-ci', scopes: ['read'] },
    'the admin\'s view of the new token');
  say('generate', `acme/node-ci ${hint(issued.token)}... id ${issued.id}: prefix, 28 base62 characters, CRC32 checksum`);
  return issued;
}

async function stepValidate(app, issued) {
  const before = Date.now();
  const r = await app.query(VALIDATE(issued.token));
  same(r.rowCount, 1, 'rows from validate_token');
  const id = r.rows[0];
  same(Object.keys(id), ['token_id', 'account', 'key_type', 'environment', 'scopes', 'name', 'expires_at', 'revoke_after', 'metadata',
    'parent_id', 'uses_remaining', 'rate_limit', 'rate_remaining', 'rate_reset_at', 'deprecation', 'sunset_at'],
    'the identity\'s columns');
  same([id.token_id, id.account, id.key_type, id.environment, id.scopes, id.name, id.revoke_after, id.metadata],
    [issued.id, 'acme', 'agent', 'dev', ['read'], 'node-ci', null, { team: 'node' }], 'identity fields');
  const thirtyDays = 30 * 24 * 3600 * 1000;
  check(id.expires_at instanceof Date && Math.abs(id.expires_at.getTime() - before - thirtyDays) < 5 * 60 * 1000,
    `expires_at ${id.expires_at} is not 30 days from now`);
  const scoped = await app.query(VALIDATE(issued.token, null, 'read'));
  same(scoped.rows[0].account, 'acme', 'validate_token with required_scope read');
  say('validate', `${hint(issued.token)}...: token_id, account acme, key_type agent, environment dev, scopes {read}, ` +
    `name, expires_at in 30 days, revoke_after null, metadata`);
}

async function stepRefusals(admin, app, issued) {
  const revoked = await generate(admin, 'acme');
  same((await admin.query({ text: 'SELECT token.revoke_token($1, $2) AS done', values: [revoked.id, 'node test'] })).rows[0].done,
    true, 'revoke_token');
  const last = issued.token.at(-1);
  const typo = issued.token.slice(0, -1) + (last === 'A' ? 'B' : 'A');
  const mid = await generate(admin, 'globex', { keyType: 'mid', scopes: [] });
  const cases = [
    ['revoked', revoked.token, null, null],
    ['bad_checksum', typo, null, null],
    ['unknown_prefix', compose('zz-'), null, null],
    ['not_found', compose(DEV), null, null],
    ['insufficient_scope', issued.token, null, 'write'],
    ['environment_mismatch', compose(PROD), null, null],
    ['malformed', 'hello', null, null],
    ['caller_not_permitted', issued.token, issued.token, null], // agent may not validate agent
    ['cross_account', issued.token, mid.token, null],           // a globex mid key, an acme token
  ];
  for (const [reason, token, caller, scope] of cases) {
    const r = await app.query(CHECK(token, caller, scope));
    same([r.rows[0].valid, r.rows[0].reason], [false, reason], `check_token for a ${reason} token`);
  }
  const ok = await app.query(CHECK(issued.token));
  same([ok.rows[0].valid, ok.rows[0].reason, ok.rows[0].account], [true, null, 'acme'], 'check_token for a valid token');
  say('check', `check_token refuses without raising: ${cases.map((c) => c[0]).join(', ')}; a valid token passes`);

  for (const [reason, token, caller, scope] of cases) {
    const err = await refused(app, VALIDATE(token, caller, scope), '28000', `validate_token with a ${reason} token`);
    const message = reason === 'environment_mismatch'
      ? 'Token environment mismatch: prod token used in dev' : `token rejected: ${reason}`;
    same(err.message, message, `the message for ${reason}`);
  }
  say('raise', `validate_token raises 28000 'token rejected: <reason>' for each (environments: their own message); ` +
    `no error carries a token`);
  return revoked;
}

async function stepRotate(admin, app, issued) {
  const r = await admin.query({ text: 'SELECT token_id, token FROM token.rotate_token($1, grace => $2)', values: [issued.id, '1 hour'] });
  const successor = { id: r.rows[0].token_id, token: record(r.rows[0].token) };
  checkShape(successor.token, DEV);
  check(successor.id !== issued.id && successor.token !== issued.token, 'rotation issued the same token');
  const old = (await app.query(VALIDATE(issued.token))).rows[0];
  const next = (await app.query(VALIDATE(successor.token))).rows[0];
  same([old.account, next.account, next.name, next.scopes], ['acme', 'acme', 'node-ci', ['read']], 'both tokens in the grace window');
  check(old.revoke_after instanceof Date && Math.abs(old.revoke_after.getTime() - Date.now() - 3600 * 1000) < 5 * 60 * 1000,
    `the old token's revoke_after ${old.revoke_after} is not an hour away`);
  same(next.revoke_after, null, 'the successor\'s revoke_after');
  const again = await refused(admin, { text: 'SELECT * FROM token.rotate_token($1)', values: [issued.id] }, '55000',
    'rotating a token twice');
  check(again.message.length > 0, 'the second rotation says why');
  say('rotate', `${hint(issued.token)}... -> ${hint(successor.token)}...: both valid for the 1 hour grace; a second rotation is refused (55000)`);
  return successor;
}

async function stepRevoke(admin, app, successor) {
  for (let i = 0; i < 5; i += 1) { // the validation cache is warm
    same((await app.query(VALIDATE(successor.token))).rows[0].account, 'acme', 'validation before the revoke');
  }
  const done = await admin.query({ text: 'SELECT token.revoke_token($1, $2) AS done', values: [successor.id, 'node test'] });
  same(done.rows[0].done, true, 'revoke_token');
  const err = await refused(app, VALIDATE(successor.token), '28000', 'the very next validation after a revoke');
  same(err.message, 'token rejected: revoked', 'the message after a revoke');
  const again = await admin.query({ text: 'SELECT token.revoke_token($1, $2) AS done', values: [successor.id, 'again'] });
  same(again.rows[0].done, false, 'revoking a revoked token');
  say('revoke', `${hint(successor.token)}...: refused on the very next call on the same connection (cache warm)`);
}

async function tenantRows(app) {
  return (await app.query('SELECT tenant, name FROM app.projects ORDER BY name')).rows;
}

async function stepRls(admin, app, revoked) {
  const acme = await generate(admin, 'acme', { scopes: ['read'] });
  const globex = await generate(admin, 'globex', { scopes: ['read'] });
  for (const [who, want] of [[acme, 'acme'], [globex, 'globex']]) {
    await app.query('BEGIN');
    const r = await app.query({ text: 'SELECT account FROM token.authenticate($1)', values: [who.token] });
    same(r.rows[0].account, want, 'authenticate');
    const rows = await tenantRows(app);
    check(rows.length > 0, `${want} sees no rows`);
    same([...new Set(rows.map((x) => x.tenant))], [want], `tenants of the rows ${want} sees`);
    same((await app.query('SELECT token.current_account() AS a')).rows[0].a, want, 'current_account in the transaction');
    await app.query('COMMIT');
    same((await app.query('SELECT token.current_account() AS a')).rows[0].a, null, 'current_account after COMMIT');
    same(await tenantRows(app), [], `rows after ${want}'s transaction ended`);
  }
  await app.query('BEGIN');
  await refused(app, { text: 'SELECT token.authenticate($1)', values: [revoked.token] }, '28000', 'authenticate with a revoked token');
  await app.query('ROLLBACK');
  same(await tenantRows(app), [], 'rows after a refused authenticate');
  say('rls', 'BEGIN; authenticate($1); SELECT: acme and globex see only their rows; nothing after COMMIT or a refusal');
}

async function stepMany(admin, app) {
  const issued = [];
  for (let i = 0; i < 20; i += 1) issued.push({ account: i % 2 ? 'globex' : 'acme', ...(await generate(admin, i % 2 ? 'globex' : 'acme')) });
  for (let round = 0; round < 3; round += 1) {
    for (const t of issued) {
      const r = (await app.query(VALIDATE(t.token))).rows[0];
      same([r.token_id, r.account], [t.id, t.account], `validation ${round + 1} of ${hint(t.token)}...`);
    }
  }
  say('many', `20 tokens of two accounts, each validated 3 times through one prepared statement: every identity its own`);
}

async function stepDenied(app) {
  const denied = [
    ['read token.tokens', 'SELECT count(*) FROM token.tokens'],
    ['read token.token_list', 'SELECT count(*) FROM token.token_list'],
    ['generate', { text: 'SELECT * FROM token.generate_token($1, $2)', values: ['acme', 'agent'] }],
  ];
  for (const [what, query] of denied) await refused(app, query, '42501', `${APP} may not ${what}`);
  say('denied', `${APP} (token_validator) cannot ${denied.map((d) => d[0]).join(', ')}: 42501`);
}

async function main() {
  const started = Date.now();
  Object.assign(settings, {
    host: setting('PGT_HOST'), port: Number(setting('PGT_PORT')), socket: setting('PGT_SOCKET'),
    tokens: setting('PGT_TOKENS'), database: setting('PGT_DB'),
  });
  const clients = [];
  try {
    const su = await superuser();
    clients.push(su);
    await setup(su);
    const admin = await login(ADMIN, true);
    clients.push(admin);
    const app = await login(APP, false);
    clients.push(app);
    say('login', `${ADMIN} and ${APP} over TCP with SCRAM (a wrong password: 28P01); neither superuser nor BYPASSRLS`);
    const issued = await stepGenerate(admin);
    await stepValidate(app, issued);
    const revoked = await stepRefusals(admin, app, issued);
    const successor = await stepRotate(admin, app, issued);
    await stepRevoke(admin, app, successor);
    await stepRls(admin, app, revoked);
    await stepMany(admin, app);
    await stepDenied(app);
  } finally {
    await Promise.all(clients.map((c) => c.end().catch(() => {})));
  }
  say('pass', `${secrets.length} tokens recorded in $PGT_TOKENS, ${errorsChecked} expected errors checked, ` +
    `${((Date.now() - started) / 1000).toFixed(1)} s`);
}

main().catch((err) => {
  const what = err instanceof Failure ? err.message : `unexpected ${err.code ? `SQLSTATE ${err.code}: ` : ''}${err.message}`;
  console.error(`[node] FAIL ${redact(what)}`);
  process.exitCode = 1;
});
