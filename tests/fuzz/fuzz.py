"""Random input at the SQL surface: every function of schema token that token_validator,
token_gateway, token_reporter or token_admin may execute (found in pg_proc at run time, so a
new function cannot escape: the run fails if one has no entry in WEIGHTS), called with
random arguments of its types (tests/fuzz/gen.py) by the roles that may call it, and now and
then by one that may not.

Each case is one call in its own transaction, run server-side by the procedure fuzz.run()
over a table of generated cases (batches of BATCH cases per round trip, as the role over TCP),
which keeps the SQLSTATE, message, detail and hint of each in fuzz.results. A further DIRECT share of the cases
is sent one statement at a time from the client, so that errors also take the ordinary path
into the server log (log_statement = 'all' under scripts/test.sh) that the leak check reads.

Pass: every case succeeds or fails with a SQLSTATE in ALLOWED (each justified there); no
backend crashes (a lost connection); no error message, detail or hint carries the body of a
token-shaped argument; the tables keep the invariants in INVARIANTS; the server log written
during the run has no PANIC and no crashed backend. Timings are printed, never judged.

    FUZZ_CASES=100000 FUZZ_SEED=1234 python tests/fuzz/fuzz.py
Reads PGT_HOST, PGT_PORT, PGT_SOCKET, PGT_DATA, PGT_TOKENS (tests/fuzz/run.sh sets them).
"""

import collections
import os
import pathlib
import random
import re
import sys
import time

import jwt
import psycopg

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gen import Gen, M  # noqa: E402

DB = "pgt_fuzz"
PASSWORD = "fuzz-password"
ROUND = 2_000      # cases per round: fresh tokens, healed fixtures, one COPY
BATCH = 500        # cases per fuzz.run() call
DIRECT = 0.01      # share of the cases sent one statement at a time

# The SQLSTATEs a call may end with, and why each is legitimate.
ALLOWED = {
    # pg_token's own, from src/error.rs (README: SQL API reference, Reasons)
    "28000": "a refused token (validate_token, authenticate, exchange_legacy_jwt, *_own_token)",
    "22004": "a required argument is NULL",
    "22023": "an argument pg_token finds invalid (bad name, TTL, scope, account, network, limit, key)",
    "42704": "an unknown key type, prefix or issuer",
    "42710": "a key type, prefix or issuer that exists already",
    "55000": "wrong state: a revoked/rotated/disabled token, a family past max_ttl, no prefix here",
    "P0002": "no token with this id",
    "53400": "derive_token: token.max_token_depth / token.max_child_tokens reached",
    "42501": "the role may not execute the function (or purge_events below min_event_retention)",
    # Postgres' own, raised while casting an argument's text to its type (the runner passes
    # every argument as text and casts it, as a client's bind parameter would be parsed)
    "22P02": "invalid input syntax: uuid, bigint, integer, boolean, inet, array, composite, jsonb",
    "22007": "invalid datetime/interval syntax (and 'infinity' intervals before PostgreSQL 17)",
    "22008": "timestamptz or interval field out of range ('2024-02-30', '178000000 years')",
    "22015": "interval field overflow",
    "22009": "a timestamptz whose time zone displacement is out of range ('s+56D')",
    "22003": "bigint/integer out of range ('9223372036854775808', a rate limit of 2^31 requests)",
    "22021": "bytes that are not UTF-8 (convert_from), refused before any function sees them",
    "22P05": "jsonb refuses \\u0000 and lone surrogates",
    "2202E": "array subscript error: an array literal with bad dimensions",
    "54000": "program limit: an array or jsonb over Postgres' size limits",
    "54001": "stack depth: a jsonb nested deeper than max_stack_depth allows",
}

# Every function a role may call, with its share of the cases. A function found in pg_proc
# and missing here fails the run: give it a weight (and argument generators, below).
WEIGHTS = {
    "validate_token": 8, "check_token": 8, "authenticate": 5, "validate_token_from": 4,
    "check_token_from": 4, "authenticate_from": 3, "exchange_legacy_jwt": 3, "hash_token": 4,
    "canonical_account": 3, "has_scope": 1, "current_identity": 0.5, "current_account": 0.5,
    "current_account_uuid": 0.5, "current_account_bigint": 0.5, "current_token_id": 0.5,
    "current_key_type": 0.5, "current_scopes": 0.5, "reasons": 0.4, "cache_stats": 0.4,
    "report_leaked": 3, "scanner_patterns": 0.4, "create_key_type": 3, "register_prefix": 3,
    "unregister_prefix": 1.5, "restore_prefix_tokens": 1, "register_legacy_issuer": 3,
    "alter_legacy_issuer": 2, "drop_legacy_issuer": 0.5, "revoke_legacy_jwt": 1.5,
    "generate_token": 6, "rotate_token": 2, "rotate_own_token": 2, "derive_token": 2,
    "derive_own_token": 2, "update_token": 3, "disable_token": 1, "enable_token": 1,
    "token_uses": 1, "revoke_token": 1, "revoke_token_tree": 1, "revoke_account_tokens": 1,
    "purge_events": 0.5, "flush_events": 0.4, "metrics": 0.4, "refusal_metrics": 0.4,
    "worker_status": 0.4, "shared_cache_stats": 0.4,
}

# Argument generators by (function, argument), then by argument name, then by type.
BY_FUNCTION = {("flush_events", "timeout"): "timeout", ("create_key_type", "name"): "key_type",
               ("drop_legacy_issuer", "name"): "issuer_name_rare", ("unregister_prefix", "prefix"): "prefix_rare",
               ("revoke_account_tokens", "account"): "account_rare", ("alter_legacy_issuer", "name"): "issuer_name",
               ("register_legacy_issuer", "name"): "issuer_name", ("revoke_legacy_jwt", "issuer"): "issuer_name",
               ("register_legacy_issuer", "issuer"): "issuer_url"}
BY_NAME = {"token": "token", "caller_token": "token", "jwt": "jwt", "tokens": "leak_candidates",
           "account": "account", "key_type": "key_type", "prefix": "prefix", "environment": "environment",
           "can_validate": "key_type_array", "allowed_scopes": "scopes", "scopes": "scopes",
           "unset": "unset", "algorithms": "algorithms", "key": "key", "required_scope": "scope",
           "scope": "scope", "audience": "issuer_url"}
BY_TYPE = {"text": "text", "text[]": "text_array", "uuid": "uuid", "interval": "interval",
           "timestamp with time zone": "timestamptz", "jsonb": "jsonb", "bigint": "bigint",
           "boolean": "boolean", "inet": "inet", "inet[]": "inet_array", "token.rate_limit[]": "rate_limits"}

# flush_events waits up to its timeout, 10 s when it is left out or NULL: always given here,
# short (gen.timeout), so a case costs milliseconds.
ALWAYS_GIVEN = {("flush_events", "timeout")}

LOGIN = {"token_admin": "fuzz_admin", "token_validator": "fuzz_app", "token_gateway": "fuzz_gateway",
         "token_reporter": "fuzz_reporter", None: "fuzz_nobody"}
GROUPS = ["token_validator", "token_gateway", "token_reporter", "token_admin"]

CORE_KEY_TYPES = [
    "SELECT token.create_key_type('fz_agent', allowed_scopes => '{read,write,admin}', max_ttl => '90 days', replace => true)",
    "SELECT token.create_key_type('fz_mid', can_validate => '{fz_agent}', replace => true)",
    "SELECT token.create_key_type('fz_fam', reuse_detection => true, conceal_cross_account => true, replace => true)",
    "SELECT token.create_key_type('fz_cap', rate_limits => '{\"(5,\\\"1 minute\\\")\"}', allowed_networks => '{127.0.0.0/8}', replace => true)",
]
CORE_PREFIXES = [("fz-", "fz_agent", "dev"), ("fzprd-", "fz_agent", "prod"), ("fzmid_", "fz_mid", "dev"),
                 ("fzfam-", "fz_fam", "dev"), ("fzcap-", "fz_cap", "dev")]
ACCOUNTS = ["acme", "42", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "globex"]
HS_SECRET = "fuzz-legacy-secret-0123456789abcdefghijklmnop"
ISSUER = ("fz_legacy", "https://legacy.fuzz.example")

# What the functions promise about the rows they write; each query returns the violations.
INVARIANTS = {
    "a live token's prefix is registered for its key type and environment":
        "SELECT t.id FROM token.tokens t WHERE t.revoked_at IS NULL AND NOT EXISTS (SELECT FROM token.prefixes p"
        " WHERE p.prefix = t.prefix AND p.key_type = t.key_type AND p.environment = t.environment)",
    "a token's hint is its prefix and 4 base62 characters":
        "SELECT id FROM token.tokens WHERE left(hint, length(prefix)) <> prefix"
        " OR substr(hint, length(prefix) + 1) !~ '^[0-9A-Za-z]{4}$'",
    "a token's account is stored in its one spelling":
        "SELECT id FROM token.tokens WHERE account <> token.canonical_account(account)",
    "metadata is a JSON object":
        "SELECT id FROM token.tokens WHERE jsonb_typeof(metadata) <> 'object'",
    "scopes carry no NULL":
        "SELECT id FROM token.tokens WHERE array_position(scopes, NULL) IS NOT NULL",
    "a rotated token's predecessor is revoked or has revoke_after":
        "SELECT t.id FROM token.tokens t JOIN token.tokens o ON o.id = t.rotated_from"
        " WHERE o.revoke_after IS NULL AND o.revoked_at IS NULL",
    "a derived token expires no later than its parent":
        "SELECT c.id FROM token.tokens c JOIN token.tokens p ON p.id = c.parent_id WHERE p.expires_at IS NOT NULL"
        " AND (c.expires_at IS NULL OR c.expires_at > p.expires_at) AND c.revoked_at IS NULL AND p.revoked_at IS NULL",
    "a derived token's scopes are within its parent's":
        "SELECT c.id FROM token.tokens c JOIN token.tokens p ON p.id = c.parent_id WHERE NOT c.scopes <@ p.scopes"
        " AND c.revoked_at IS NULL AND p.revoked_at IS NULL",
    "no registered prefix is a prefix of another":
        "SELECT a.prefix FROM token.prefixes a JOIN token.prefixes b ON a.prefix <> b.prefix"
        " AND starts_with(b.prefix, a.prefix)",
    "every legacy issuer has its key, and every key its issuer":
        "SELECT i.name FROM token.legacy_issuers i FULL JOIN token.legacy_issuer_keys k USING (name)"
        " WHERE i.name IS NULL OR k.name IS NULL",
    "a key type's default_ttl is within its max_ttl":
        "SELECT name FROM token.key_types WHERE default_ttl > max_ttl",
}

RUNNER_SQL = r"""
DROP SCHEMA IF EXISTS fuzz CASCADE;
CREATE SCHEMA fuzz;
CREATE TABLE fuzz.functions (fn int PRIMARY KEY, sql text NOT NULL, arrays int[] NOT NULL);
CREATE TABLE fuzz.cases (id int PRIMARY KEY, fn int NOT NULL, who name NOT NULL, args text[] NOT NULL);
-- A marker (tests/fuzz/gen.py) becomes a real token, a mutation of one, an id or raw bytes.
CREATE FUNCTION fuzz.resolve_one(v text, tokens text[], ids text[]) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE k text; body text; i int; rest text;
BEGIN
  IF v IS NULL OR left(v, 1) <> chr(1) THEN RETURN v; END IF;
  k := substr(v, 2, 1); body := substr(v, 3);
  IF k = 'B' THEN RETURN convert_from(decode(body, 'hex'), 'UTF8'); END IF;
  i := split_part(body, ',', 1)::int;
  rest := substr(body, length(split_part(body, ',', 1)) + 2);
  IF k = 'I' THEN RETURN ids[i]; END IF;
  CASE k
    WHEN 'T' THEN RETURN tokens[i];
    WHEN 'U' THEN RETURN upper(tokens[i]);
    WHEN 'C' THEN RETURN left(tokens[i], rest::int);
    WHEN 'S' THEN RETURN tokens[i] || rest;
    WHEN 'R' THEN RETURN rest || tokens[i];
    WHEN 'F' THEN RETURN overlay(tokens[i] PLACING substr(rest, length(split_part(rest, ',', 1)) + 2)
                                 FROM least(split_part(rest, ',', 1)::int, length(tokens[i]) + 1) FOR 1);
  END CASE;
  RETURN v;
END $$;
CREATE FUNCTION fuzz.resolve(args text[], arrays int[], tokens text[], ids text[]) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE out text[] := args; j int;
BEGIN
  FOR j IN 1 .. coalesce(array_length(args, 1), 0) LOOP
    IF position(chr(1) IN coalesce(args[j], '')) = 0 THEN CONTINUE; END IF;
    IF j = ANY (arrays) THEN
      out[j] := (SELECT array_agg(fuzz.resolve_one(e, tokens, ids) ORDER BY o)
                 FROM unnest(args[j]::text[]) WITH ORDINALITY AS u(e, o))::text;
    ELSE
      out[j] := fuzz.resolve_one(args[j], tokens, ids);
    END IF;
  END LOOP;
  RETURN out;
END $$;
-- Each case its own call in its own transaction, as an application makes it; what it ended
-- with goes to fuzz.results.
CREATE TABLE fuzz.results (id int PRIMARY KEY, state text, message text, detail text, hint text, us bigint);
CREATE PROCEDURE fuzz.run(lo int, hi int, tokens text[], ids text[])
LANGUAGE plpgsql AS $$
DECLARE c record; a text[]; n bigint; t timestamptz;
        st text; msg text; det text; hin text;
BEGIN
  FOR c IN SELECT k.id, f.sql, f.arrays, k.args FROM fuzz.cases k JOIN fuzz.functions f USING (fn)
           WHERE k.id >= lo AND k.id < hi AND k.who = session_user ORDER BY k.id LOOP
    st := '00000'; msg := NULL; det := NULL; hin := NULL; t := clock_timestamp();
    BEGIN
      a := fuzz.resolve(c.args, c.arrays, tokens, ids);
      EXECUTE c.sql INTO n USING a;
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
                              det = PG_EXCEPTION_DETAIL, hin = PG_EXCEPTION_HINT;
    END;
    INSERT INTO fuzz.results VALUES (c.id, st, msg, det, hin,
                                     (extract(epoch FROM clock_timestamp() - t) * 1e6)::bigint);
    COMMIT;
  END LOOP;
END $$;
CREATE FUNCTION fuzz.resolve_args(args text[], arrays int[], tokens text[], ids text[]) RETURNS text[]
LANGUAGE sql AS $$ SELECT fuzz.resolve(args, arrays, tokens, ids) $$;
GRANT USAGE ON SCHEMA fuzz TO PUBLIC;
GRANT SELECT ON fuzz.functions, fuzz.cases TO PUBLIC;
GRANT SELECT, INSERT, DELETE ON fuzz.results TO PUBLIC;
"""

TOKEN_SHAPE = re.compile(r"[A-Za-z0-9][_-]([0-9A-Za-z]{22})")


def env(name, default=None):
    v = os.environ.get(name, default)
    if v is None:
        sys.exit(f"fuzz: {name} is not set (run tests/fuzz/run.sh)")
    return v


class Fuzz:
    def __init__(self):
        self.host, self.port, self.socket = env("PGT_HOST"), int(env("PGT_PORT")), env("PGT_SOCKET")
        self.tokens_file = env("PGT_TOKENS")
        self.log = pathlib.Path(env("PGT_DATA")) / "server.log"
        self.cases = int(os.environ.get("FUZZ_CASES", "100000"))
        self.seed = int(os.environ.get("FUZZ_SEED") or random.SystemRandom().randrange(2**32))
        self.rng = random.Random(self.seed)
        self.by_fn = collections.defaultdict(collections.Counter)
        self.by_state = collections.Counter()
        self.failures = []
        self.crashes = 0
        self.slow = []
        self.huge = 0
        self.time_fn = collections.Counter()  # server time per function: printed, never judged
        self.conns = {}

    # -- connections ------------------------------------------------------------------------
    def su(self, dbname=DB):
        return psycopg.connect(host=self.socket, port=self.port, user="postgres", dbname=dbname, autocommit=True)

    def login(self, role):
        c = self.conns.get(role)
        if c is None or c.closed or c.broken:
            c = psycopg.connect(host=self.host, port=self.port, user=role, password=PASSWORD, dbname=DB,
                                autocommit=True, application_name="pg_token-fuzz")
            self.conns[role] = c
        return c

    def record(self, token):
        with open(self.tokens_file, "a") as f:
            f.write(token + "\n")

    def record_jwt(self, token):
        """As tests/e2e/conftest.py records a JWT: a 22-character fingerprint the leak check
        can search for (its signature's letters and digits)."""
        _, claims, sig = token.split(".")
        runs = re.findall(r"[0-9A-Za-z]{22,}", sig) or re.findall(r"[0-9A-Za-z]{22,}", claims)
        if runs:
            self.record(runs[-1][-22:] + "jwtfp0")

    # -- set-up ------------------------------------------------------------------------------
    def setup(self):
        with self.su("postgres") as c:
            c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
            c.execute(f"CREATE DATABASE {DB}")
            for role in LOGIN.values():
                if c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                    c.execute(f"DROP ROLE {role}")
            for group, role in LOGIN.items():
                c.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{PASSWORD}'")
        with self.su() as c:
            c.execute("CREATE EXTENSION pg_token")
            for group, role in LOGIN.items():
                if group:
                    c.execute(f"GRANT {group} TO {role}")
            c.execute(RUNNER_SQL)
            self.functions = self.enumerate(c)
            self.pem = self.rsa_pem()
            self.heal(c)

    def rsa_pem(self):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        k = ec.generate_private_key(ec.SECP256R1())
        return k.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def enumerate(self, c):
        rows = c.execute("""
            SELECT p.proname, p.oid::regprocedure::text, p.pronargs, p.pronargdefaults,
                   coalesce(p.proargnames, '{}'), coalesce(p.proargmodes::text[], '{}'),
                   array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) WITH ORDINALITY u(t, o) ORDER BY o),
                   array(SELECT g FROM unnest(%s::text[]) g WHERE has_function_privilege(g, p.oid, 'EXECUTE'))
            FROM pg_proc p WHERE p.pronamespace = 'token'::regnamespace AND p.prorettype <> 'trigger'::regtype
            ORDER BY 1""", (GROUPS,)).fetchall()
        fns, missing = [], []
        for name, sig, nargs, ndef, names, modes, types, roles in rows:
            if not roles:
                continue
            innames = [n for n, m in zip(names, modes or ["i"] * len(names)) if m in ("i", "b", "v")] or names
            innames = innames[:nargs]
            gens = []
            for an, at in zip(innames, types):
                g = BY_FUNCTION.get((name, an)) or BY_NAME.get(an) or BY_TYPE.get(at)
                if g == "text_array":
                    g = "scopes"
                if g is None:
                    missing.append(f"{sig}: argument {an} {at}")
                gens.append(g)
            if name not in WEIGHTS:
                missing.append(f"{sig}: no weight in WEIGHTS")
            fns.append(dict(name=name, sig=sig, argnames=innames, nargs=nargs, ndef=ndef, types=types, gens=gens,
                            roles=roles, arrays=[j + 1 for j, t in enumerate(types) if t.endswith("[]")]))
        if missing:
            sys.exit("fuzz: functions a role may call without a generator:\n  " + "\n  ".join(missing))
        extra = set(WEIGHTS) - {f["name"] for f in fns}
        if extra:
            sys.exit(f"fuzz: WEIGHTS names functions no role may call: {sorted(extra)}")
        for i, f in enumerate(fns):
            f["fn"] = i
        # Each case leaves out 0..ndef trailing defaults: one statement per argument count.
        self.sqls = {}
        k = 0
        rows = []
        for f in fns:
            for n in range(f["nargs"] - f["ndef"], f["nargs"] + 1):
                casts = ", ".join(f"$1[{j + 1}]::{f['types'][j]}" for j in range(n))
                self.sqls[(f["fn"], n)] = k
                rows.append((k, f"SELECT count(*) FROM token.{f['name']}({casts})",
                             "{" + ",".join(str(a) for a in f["arrays"] if a <= n) + "}"))
                k += 1
        with c.cursor().copy("COPY fuzz.functions (fn, sql, arrays) FROM STDIN") as cp:
            for r in rows:
                cp.write_row(r)
        print(f"fuzz: {len(fns)} functions callable by {', '.join(GROUPS)} (from pg_proc), "
              f"{len(INVARIANTS)} invariants")
        return fns

    def heal(self, c):
        """Puts the fixtures back that the previous round's random calls may have removed."""
        for q in CORE_KEY_TYPES:
            c.execute(q)
        for p, kt, e in CORE_PREFIXES:
            if not c.execute("SELECT 1 FROM token.prefixes WHERE prefix = %s AND key_type = %s AND environment = %s",
                             (p, kt, e)).fetchone():
                c.execute("SELECT token.unregister_prefix(prefix) FROM token.prefixes"
                          " WHERE starts_with(%s, prefix) OR starts_with(prefix, %s)", (p, p))
                c.execute("SELECT token.register_prefix(%s, %s, %s)", (p, kt, e))
        c.execute("DELETE FROM token.legacy_issuers WHERE issuer = %s AND name <> %s", (ISSUER[1], ISSUER[0]))
        c.execute("SELECT token.drop_legacy_issuer(%s)", (ISSUER[0],))
        c.execute("SELECT token.register_legacy_issuer(%s, '{HS256}', %s, 'fz_agent', 'dev', now() + interval '10 years',"
                  " 'use fz- tokens', issuer => %s)", (ISSUER[0], HS_SECRET, ISSUER[1]))

    def round_tokens(self):
        """Fresh tokens for a round (the previous round revoked, rotated and spent many), and
        validly signed JWTs with random claims. All go to the leak check's list."""
        a = self.login("fuzz_admin")
        tokens, ids = [], []

        def gen(sql, params):
            tid, tok = a.execute(sql, params).fetchone()
            self.record(tok)
            tokens.append(tok)
            ids.append(str(tid))
            return tid, tok
        for acct in ACCOUNTS:
            gen("SELECT * FROM token.generate_token(%s, 'fz_agent', scopes => '{read,write}', expires_in => '30 days', prefix => 'fz-')", (acct,))
            gen("SELECT * FROM token.generate_token(%s, 'fz_mid', prefix => 'fzmid_')", (acct,))
        pid, _ = gen("SELECT * FROM token.generate_token(%s, 'fz_agent', scopes => '{read}', expires_in => '1 day', uses => 3, refill_uses => 3, refill_interval => '1 hour', prefix => 'fz-')", ("acme",))
        gen("SELECT * FROM token.derive_token(%s, scopes => '{read}')", (pid,))
        gen("SELECT * FROM token.generate_token('acme', 'fz_fam', prefix => 'fzfam-')", ())
        gen("SELECT * FROM token.generate_token('acme', 'fz_cap', uses => 2, prefix => 'fzcap-')", ())
        fid, _ = gen("SELECT * FROM token.generate_token('globex', 'fz_fam', prefix => 'fzfam-')", ())
        gen("SELECT * FROM token.rotate_token(%s, interval '0')", (fid,))
        rid, _ = gen("SELECT * FROM token.generate_token('acme', 'fz_agent', prefix => 'fz-')", ())
        a.execute("SELECT token.revoke_token(%s)", (rid,))
        # A few existing ids of any state, for the uuid arguments.
        with self.su() as c:
            ids += [str(r[0]) for r in c.execute("SELECT id FROM token.tokens ORDER BY random() LIMIT 8")]
        now = int(time.time())
        for _ in range(6):
            claims = {"iss": ISSUER[1], "sub": self.rng.choice(ACCOUNTS + ["", "x" * 300]),
                      "exp": now + self.rng.choice([-3600, 3600, 86400 * 400]), "iat": now - 10,
                      "jti": f"j{self.rng.randrange(10**9)}", "scope": self.rng.choice(["read", "read write", "", "admin"])}
            for k in self.rng.sample(["sub", "exp", "jti", "scope", "iat"], self.rng.randrange(3)):
                claims.pop(k, None)
            if self.rng.random() < 0.3:
                claims["nbf"] = now + 3600
            t = jwt.encode(claims, HS_SECRET, algorithm="HS256")
            self.record_jwt(t)
            tokens.append(t)
        return tokens, ids

    # -- cases -------------------------------------------------------------------------------
    def make_cases(self, n, base, world, huge_at):
        g = Gen(self.rng, world)
        fns = self.functions
        weights = [WEIGHTS[f["name"]] for f in fns]
        cases = collections.defaultdict(list)  # login role -> [(id, fn, nargs, args)]
        for i in range(n):
            f = self.rng.choices(fns, weights)[0]
            if self.rng.random() < 0.9:
                role = LOGIN[self.rng.choice(f["roles"])]
            else:
                role = self.rng.choice(list(LOGIN.values()))
            fewest = f["nargs"] - f["ndef"]
            while fewest < f["nargs"] and (f["name"], f["argnames"][fewest]) in ALWAYS_GIVEN:
                fewest += 1
            nargs = self.rng.randint(fewest, f["nargs"])
            args = []
            for j in range(nargs):
                if self.rng.random() < 0.06 and (f["name"], f["argnames"][j]) not in ALWAYS_GIVEN:
                    args.append(None)
                else:
                    gen = f["gens"][j]
                    args.append(getattr(g, gen)())
            if i in huge_at and nargs:
                text_args = [j for j in range(nargs) if f["types"][j] == "text"] or [0]
                args[self.rng.choice(text_args)] = g.huge()
                self.huge += 1
            cases[role].append((base + i, f, nargs, args))
        return cases

    def run_round(self, su, cases, tokens, ids):
        rows = []
        direct = []
        for role, cs in cases.items():
            for cid, f, nargs, args in cs:
                if self.rng.random() < DIRECT:
                    direct.append((role, cid, f, nargs, args))
                rows.append((cid, self.sqls[(f["fn"], nargs)], role, args))
        su.execute("TRUNCATE fuzz.cases, fuzz.results")
        with su.cursor().copy("COPY fuzz.cases (id, fn, who, args) FROM STDIN") as cp:
            for r in rows:
                cp.write_row(r)
        direct_ids = {d[1] for d in direct}
        # Chunks in case order, each split by role, so that the roles' calls interleave (the
        # administrators' revocations do not all come before the validations).
        info = {c[0]: (role, c) for role, cs in cases.items() for c in cs}
        order = sorted(cid for cid in info if cid not in direct_ids)
        for k in range(0, len(order), BATCH):
            by_role = collections.defaultdict(list)
            for cid in order[k:k + BATCH]:
                by_role[info[cid][0]].append(cid)
            for role, chunk in by_role.items():
                self.batch(role, chunk, {cid: info[cid][1] for cid in chunk}, tokens, ids)
        for role, cid, f, nargs, args in direct:
            self.direct(su, role, cid, f, nargs, args, tokens, ids)

    def batch(self, role, chunk, info, tokens, ids):
        want = set(chunk)
        try:
            c = self.login(role)
            c.execute("CALL fuzz.run(%s, %s, %s, %s)", (chunk[0], chunk[-1] + 1, tokens, ids))
            res = c.execute("DELETE FROM fuzz.results WHERE id = ANY(%s) RETURNING *", (chunk,)).fetchall()
        except psycopg.OperationalError as e:
            if e.sqlstate is not None:  # an error the server sent (OperationalError covers class 28 too)
                self.failures.append(f"batch as {role} from case {chunk[0]}: {e.sqlstate} {str(e)[:200]}")
                return
            if len(chunk) == 1:
                self.crash(info[chunk[0]], role, e)
                return
            # Lost the backend: find which case did it, one at a time.
            self.wait_for_server()
            for cid in chunk:
                self.batch(role, [cid], info, tokens, ids)
            return
        except psycopg.Error as e:
            # The runner's own statement failed (a case's error is caught inside it); say so.
            self.failures.append(f"batch as {role} from case {chunk[0]}: {e.sqlstate} {str(e)[:200]}")
            return
        for cid, state, msg, detail, hint, us in res:
            want.discard(cid)
            self.time_fn[info[cid][1]["name"]] += us / 1e6
            if us > 500_000:
                self.slow.append((us / 1e6, cid, info[cid][1]["name"], state))
            self.outcome(info[cid], role, state, msg, detail, hint, tokens, ids)
        for cid in want:
            self.failures.append(f"case {cid}: no result came back")

    def direct(self, su, role, cid, f, nargs, args, tokens, ids):
        """One case as an ordinary statement from the client: its error reaches the server log."""
        try:
            resolved = su.execute("SELECT fuzz.resolve_args(%s, %s, %s, %s)",
                                  (args, [a for a in f["arrays"] if a <= nargs], tokens, ids)).fetchone()[0]
        except psycopg.Error as e:
            self.outcome((cid, f, nargs, args), role, e.sqlstate, str(e), None, None, tokens, ids)
            return
        casts = ", ".join(f"%s::{f['types'][j]}" for j in range(nargs))
        try:
            c = self.login(role)
            c.execute(f"SELECT count(*) FROM token.{f['name']}({casts})", resolved)
            state, msg, detail, hint = "00000", None, None, None
        except psycopg.Error as e:
            if e.sqlstate is None:  # no SQLSTATE: the connection itself was lost
                self.crash((cid, f, nargs, args), role, e)
                return
            state, msg = e.sqlstate, e.diag.message_primary
            detail, hint = e.diag.message_detail, e.diag.message_hint
        self.outcome((cid, f, nargs, args), role, state or "?", msg, detail, hint, tokens, ids)

    def outcome(self, case, role, state, msg, detail, hint, tokens, ids):
        cid, f, nargs, args = case
        self.by_fn[f["name"]][state] += 1
        self.by_state[state] += 1
        if state != "00000" and state not in ALLOWED:
            self.failures.append(f"case {cid} {f['name']} as {role}: SQLSTATE {state}: {(msg or '')[:200]}"
                                 f" | args {self.show(args)}")
        said = " ".join(x for x in (msg, detail, hint) if x)
        # Postgres' own input functions quote the rejected text back to the caller that sent it
        # ('invalid input syntax for type uuid: "..."'), before any pg_token code runs; random
        # noise can hold a token-shaped run of characters (seed 1315915679, case 27382, found
        # such a run in a 100-character uuid argument). Only what pg_token itself says is judged.
        if state == "22P02" and (msg or "").startswith("invalid input syntax for type "):
            said = " ".join(x for x in (detail, hint) if x)
        if said:
            for body in self.bodies(args, tokens):
                if body in said:
                    # What was said and with which arguments, every token body masked (the
                    # failure goes to the log, which the leak check reads).
                    def masked(x):
                        for b in self.bodies(args, tokens):
                            x = x.replace(b, "<body>")
                        return x
                    shown = [None if a is None else masked(a) for a in self.show(args)]
                    self.failures.append(f"case {cid} {f['name']}: the error repeats a token body ({body[:4]}...): "
                                         f"{masked(said)[:300]} | args {shown}")

    def bodies(self, args, tokens):
        """The 22-character bodies of token-shaped arguments (markers resolved as the server does)."""
        out = set()
        for a in args:
            if a is None or len(a) > 4096:
                continue
            for v in ([a] if M not in a else [a] + tokens):
                for m in TOKEN_SHAPE.finditer(v):
                    out.add(m.group(1))
        return out

    @staticmethod
    def show(args):
        return [None if a is None else (a[:60] + f"...({len(a)} chars)" if len(a) > 60 else a) for a in args]

    def crash(self, case, role, e):
        cid, f, nargs, args = case
        self.crashes += 1
        self.by_fn[f["name"]]["lost connection"] += 1
        self.by_state["lost connection"] += 1
        self.failures.append(f"case {cid} {f['name']} as {role}: LOST CONNECTION ({str(e)[:200]}) | args {self.show(args)}")
        self.wait_for_server()

    def wait_for_server(self):
        self.conns.clear()
        for _ in range(60):
            try:
                self.su().close()
                return
            except psycopg.Error:
                time.sleep(1)
        sys.exit("fuzz: the server did not come back after a lost connection")

    # -- after the run -----------------------------------------------------------------------
    def check_invariants(self, c):
        bad = 0
        for what, q in INVARIANTS.items():
            rows = c.execute(q).fetchall()
            if rows:
                bad += 1
                self.failures.append(f"invariant broken: {what}: {len(rows)} rows, e.g. {rows[:3]}")
        counts = c.execute("SELECT (SELECT count(*) FROM token.tokens), (SELECT count(*) FROM token.key_types),"
                           " (SELECT count(*) FROM token.prefixes), (SELECT count(*) FROM token.legacy_issuers)").fetchone()
        print(f"fuzz: after the run: {counts[0]} tokens, {counts[1]} key types, {counts[2]} prefixes, "
              f"{counts[3]} legacy issuers; {len(INVARIANTS) - bad} of {len(INVARIANTS)} invariants hold")

    def check_log(self, offset):
        if not self.log.exists():
            self.failures.append(f"server log {self.log} not found")
            return
        with open(self.log, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
        for pat in (rb"PANIC:", rb"was terminated by signal", rb"terminating any other active server processes",
                    rb"server process \(PID \d+\) exited with exit code", rb"TRAP:"):
            for m in re.finditer(pat, data):
                line = data[max(0, data.rfind(b"\n", 0, m.start())):data.find(b"\n", m.end())]
                self.failures.append(f"server log: {line.strip()[:200].decode(errors='replace')}")
        print(f"fuzz: server log: {len(data) / 1e6:.1f} MB written during the run, searched for PANIC and crashed backends")

    def main(self):
        t0 = time.time()
        print(f"fuzz: seed {self.seed} (FUZZ_SEED={self.seed} FUZZ_CASES={self.cases} replays this run)")
        log_offset = self.log.stat().st_size if self.log.exists() else 0
        self.setup()
        world = dict(prefixes=[p for p, _, _ in CORE_PREFIXES], key_types=["fz_agent", "fz_mid", "fz_fam", "fz_cap"],
                     accounts=ACCOUNTS, issuers=[ISSUER[1]], issuer_names=[ISSUER[0]], pem_keys=[self.pem])
        rounds = max(1, (self.cases + ROUND - 1) // ROUND)
        huge = set(self.rng.sample(range(self.cases), min(6, self.cases)))
        done = 0
        with self.su() as su:
            for r in range(rounds):
                n = min(ROUND, self.cases - done)
                if r:
                    self.heal(su)
                tokens, ids = self.round_tokens()
                world.update(ntokens=len(tokens), nids=len(ids), jwts=(len(tokens) - 5, len(tokens)))
                cases = self.make_cases(n, done, world, {h - done for h in huge if done <= h < done + n})
                self.run_round(su, cases, tokens, ids)
                done += n
                print(f"fuzz: round {r + 1}/{rounds}: {done} cases, {time.time() - t0:.0f} s", flush=True)
            su.execute("SELECT token.flush_events('10 s')")
            self.check_invariants(su)
        for c in self.conns.values():
            c.close()
        self.check_log(log_offset)
        took = time.time() - t0
        self.report(took)
        if self.failures:
            print(f"\nfuzz: {len(self.failures)} failures (seed {self.seed}):")
            for f in self.failures[:50]:
                print("  " + f)
            sys.exit(1)
        print(f"fuzz: passed: {sum(self.by_state.values())} cases, no crash, no internal error, "
              f"only documented SQLSTATEs, invariants hold (seed {self.seed})")

    def report(self, took):
        total = sum(self.by_state.values())
        print(f"\nfuzz: {total} cases in {took:.1f} s ({total / took:.0f}/s), {self.crashes} lost connections, "
              f"{self.huge} with a 1-10 MB argument")
        print("fuzz: per SQLSTATE: " + ", ".join(f"{s} {n}" for s, n in self.by_state.most_common()))
        print("fuzz: per function (cases: SQLSTATE counts):")
        for name in sorted(self.by_fn):
            c = self.by_fn[name]
            print(f"  {name:24} {sum(c.values()):6}: " + ", ".join(f"{s} {n}" for s, n in c.most_common()))
        slow = ", ".join(f"{n} {t:.1f} s" for n, t in self.time_fn.most_common(5))
        print(f"fuzz: server time inside the calls: {sum(self.time_fn.values()):.1f} s; most: {slow}")
        if self.slow:
            print(f"fuzz: {len(self.slow)} calls over 0.5 s, e.g. " + ", ".join(
                f"case {c} {n} {s} {t:.1f} s" for t, c, n, s in sorted(self.slow, reverse=True)[:5]))


if __name__ == "__main__":
    Fuzz().main()
