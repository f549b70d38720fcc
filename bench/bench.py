"""The Python half of `make bench` (bench/run.sh is the other): makes tokens, measures the
per-validation cost in one statement, writes the report.

  bench.py load --host DIR --port P --to N
      Grows the bench database to N tokens. Tokens are made here in the extension's exact
      format (src/core/format.rs: prefix, 22 base62 body characters, 6 base62 characters of the
      CRC32 of prefix+body) and COPYed straight into token.tokens with the columns
      generate_token writes (SHA-256 of the token, hint, prefix, account, key type,
      environment, scopes, expiry), and in clear into bench.plain for pgbench. Then checks
      that the extension agrees: a sample of the new tokens must validate to the right row,
      and one with a flipped character must be refused.

  bench.py check-suite --host DIR --port P --tokens N
      Checks what the pgbench rows rely on: the baseline validates the same tokens to the same
      rows, and bench_app sees its account's bench.docs rows only while authenticated.

  bench.py jwts --host DIR --port P --hs256 N --rs256 M
      Legacy JWTs (migrating from JWTs): registers two legacy issuers for the bench key type,
      bench_hs256 (a 40-byte secret) and bench_rs256 (a 2048-bit RSA key, as PEM), and makes N
      and M distinct JWTs with PyJWT (RS256 signed on every core) into bench.jwt_hs256 and
      bench.jwt_rs256 (n, token), for the rows that present each backend JWTs it has not seen;
      bench.jwt_one() returns one HS256 JWT, for the cached row. Then checks that the
      extension accepts a sample as the right account and refuses a tampered one.

  bench.py per-token --host DIR --port P --size N --lookups L --csv FILE
      The CPU cost of one validation inside one statement validating L tokens drawn
      uniformly from the N in the table, for a warm cache (hit) and no cache (miss). CPU time
      is the backend's own (/proc/PID/schedstat), the statement without the validations is
      measured the same way and subtracted; best of 3 fresh sessions. Appends CSV rows
      "size,kind,cpu_us,wall_us,cache_entry_bytes".

  bench.py report ...
      The markdown table (bench/results/latest.md) and the chart (latest.png).
"""

import argparse
import csv
import datetime
import glob
import hashlib
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import zlib

import numpy as np
import psycopg

PREFIX = "bench-"
KEY_TYPE = "bench"
ENVIRONMENT = "dev"
SCOPES = "{read,write}"
ACCOUNTS = 100_000
HOT = 1000
ALPHABET = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_LEN, CHECKSUM_LEN, HINT_BODY_CHARS = 22, 6, 4


def connect(args, **kw):
    return psycopg.connect(host=args.host, port=args.port, user="postgres", dbname="bench", **kw)


def account_of(n):
    return f"account-{n % ACCOUNTS}"


# ---- tokens ----

def checksum(prefix: bytes, body: bytes) -> bytes:
    """src/core/format.rs checksum_of: CRC32 (IEEE) of prefix+body, 6 base62 digits, MSD first."""
    value = zlib.crc32(body, zlib.crc32(prefix))
    out = bytearray(CHECKSUM_LEN)
    for i in range(CHECKSUM_LEN - 1, -1, -1):
        out[i] = ALPHABET[value % 62]
        value //= 62
    return bytes(out)


def make_tokens(rng, count):
    """`count` new tokens: (token bytes, uuid text, sha256 hex). Bodies are uniform base62."""
    prefix = PREFIX.encode()
    alphabet = np.frombuffer(ALPHABET, dtype=np.uint8)
    bodies = alphabet[rng.integers(0, 62, size=(count, BODY_LEN), dtype=np.uint8)].tobytes()
    prefix_crc = zlib.crc32(prefix)
    crcs = np.fromiter((zlib.crc32(bodies[i:i + BODY_LEN], prefix_crc) for i in range(0, BODY_LEN * count, BODY_LEN)),
                       dtype=np.uint64, count=count)
    digits = np.empty((count, CHECKSUM_LEN), dtype=np.uint8)
    for j in range(CHECKSUM_LEN - 1, -1, -1):
        digits[:, j] = alphabet[crcs % 62]
        crcs //= 62
    digits = digits.tobytes()
    ids = np.frombuffer(rng.bytes(16 * count), dtype=np.uint8).reshape(count, 16).copy()
    ids[:, 6] = (ids[:, 6] & 0x0F) | 0x40  # random (version 4) uuids, like gen_random_uuid()
    ids[:, 8] = (ids[:, 8] & 0x3F) | 0x80
    ids = ids.tobytes()
    out = []
    for i in range(count):
        token = prefix + bodies[BODY_LEN * i:BODY_LEN * (i + 1)] + digits[CHECKSUM_LEN * i:CHECKSUM_LEN * (i + 1)]
        h = ids[16 * i:16 * (i + 1)].hex()
        uid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        out.append((token, uid, hashlib.sha256(token).hexdigest()))
    return out


def load(args):
    rng = np.random.default_rng()
    with connect(args) as conn:
        have = conn.execute("SELECT coalesce(max(n), 0) FROM bench.plain").fetchone()[0]
        if have >= args.to:
            return
        expires, issued = conn.execute("SELECT (now() + interval '365 days')::text, now()::text").fetchone()
        print(f"bench: loading tokens {have + 1:,}..{args.to:,}", flush=True)
        started = time.monotonic()
        # Skip the key-type foreign key check per row (every row names key type 'bench',
        # which exists); this is how a restore loads the table too.
        conn.execute("SET session_replication_role = replica")
        n = have
        while n < args.to:
            count = min(250_000, args.to - n)
            rows = make_tokens(rng, count)
            token_lines, plain_lines = [], []
            for i, (token, uid, h) in enumerate(rows, start=n + 1):
                t = token.decode()
                hint = t[:len(PREFIX) + HINT_BODY_CHARS]
                token_lines.append(f"{uid}\t\\\\x{h}\t{hint}\t{PREFIX}\t{account_of(i)}\t{KEY_TYPE}\t{ENVIRONMENT}\t{SCOPES}\t{expires}"
                                   f"\t{uid}\t{issued}\n")
                plain_lines.append(f"{i}\t{uid}\t{t}\n")
            with conn.cursor() as cur:
                with cur.copy("COPY token.tokens (id, token_hash, hint, prefix, account, key_type, environment, scopes, "
                              "expires_at, family_id, family_issued_at) FROM STDIN") as cp:
                    cp.write("".join(token_lines))
                with cur.copy("COPY bench.plain (n, id, token) FROM STDIN") as cp:
                    cp.write("".join(plain_lines))
            conn.commit()
            n += count
        conn.execute("RESET session_replication_role")
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE token.tokens")
        conn.execute("VACUUM ANALYZE bench.plain")
        elapsed = time.monotonic() - started
        print(f"bench: loaded in {elapsed:.0f} s", flush=True)
        if args.timings:
            with open(args.timings, "a") as f:
                f.write(f"{args.to},{elapsed:.1f}\n")
        check_loaded(conn, have + 1, args.to)


def check_loaded(conn, first, last):
    """The extension must accept the generated tokens as its own, and refuse a damaged one."""
    rng = np.random.default_rng()
    sample = sorted({first, last, *(int(x) for x in rng.integers(first, last + 1, size=200))})
    rows = conn.execute(
        "SELECT p.n, p.id, v.valid, v.reason, v.token_id, v.account, v.key_type, v.scopes, "
        "       token.hash_token(p.token) = t.token_hash "
        "  FROM bench.plain p JOIN token.tokens t ON t.id = p.id, LATERAL token.check_token(p.token) v "
        " WHERE p.n = ANY(%s)", (sample,)).fetchall()
    assert len(rows) == len(sample), f"bench: {len(sample) - len(rows)} sampled tokens have no row"
    for n, id_, valid, reason, token_id, account, key_type, scopes, hash_ok in rows:
        assert valid, f"bench: generated token {n} is refused by the extension: {reason}"
        assert token_id == id_ and account == account_of(n) and key_type == KEY_TYPE, f"bench: token {n} validates to the wrong row"
        assert scopes == ["read", "write"], f"bench: token {n} has scopes {scopes}"
        assert hash_ok, f"bench: token {n}'s stored hash is not token.hash_token of it"
    # One character changed in the body: the checksum must catch it (so ours is the same CRC).
    reason = conn.execute(
        "SELECT (token.check_token(overlay(token placing CASE WHEN substr(token, 8, 1) = 'A' THEN 'B' ELSE 'A' END "
        "                                   from 8 for 1))).reason FROM bench.plain WHERE n = %s", (first,)).fetchone()[0]
    assert reason == "bad_checksum", f"bench: a damaged token was refused with {reason}, not bad_checksum"
    # And the same checksum as the extension's own: a token generate_token makes checks out here.
    with conn.transaction(force_rollback=True):  # leave nothing behind
        real = conn.execute("SELECT token FROM token.generate_token('format-check', 'bench')").fetchone()[0]
    body = real[len(PREFIX):len(PREFIX) + BODY_LEN].encode()
    assert real.startswith(PREFIX) and len(real) == len(PREFIX) + BODY_LEN + CHECKSUM_LEN
    assert checksum(PREFIX.encode(), body) == real[-CHECKSUM_LEN:].encode(), "bench: our CRC32 checksum differs from generate_token's"
    print(f"bench: {len(sample)} sampled tokens validate; checksum agrees with generate_token", flush=True)


def check_suite(args):
    """What the pgbench rows rely on: the baseline finds the same rows as pg_token, and the
    RLS fixture shows a non-owner role its own account's rows only while authenticated."""
    rng = np.random.default_rng()
    sample = sorted({1, HOT, args.tokens, *(int(x) for x in rng.integers(1, args.tokens + 1, size=200))})
    with connect(args, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT p.n, p.id, v.id, v.account FROM bench.plain p LEFT JOIN LATERAL baseline.validate(p.token) v ON true "
            " WHERE p.n = ANY(%s)", (sample,)).fetchall()
        assert len(rows) == len(sample), "bench: the baseline finds a token twice or not at all"
        for n, id_, found, account in rows:
            assert found == id_ and account == account_of(n), f"bench: the baseline does not validate token {n}"
        token = conn.execute("SELECT token FROM bench.plain WHERE n = 7").fetchone()[0]
    with psycopg.connect(host=args.host, port=args.port, user="bench_app", dbname="bench", autocommit=True) as app:
        role = app.execute("SELECT rolsuper, rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user").fetchone()
        assert role == (False, False), "bench: bench_app must be subject to RLS"
        assert app.execute("SELECT count(*) FROM bench.docs").fetchone()[0] == 0, "bench: RLS shows rows to nobody"
        with app.transaction():
            account = app.execute("SELECT account FROM token.authenticate(%s)", (token,)).fetchone()[0]
            tenants = [t for (t,) in app.execute("SELECT tenant FROM bench.docs")]
        assert account == account_of(7) and tenants == [account] * 5, "bench: RLS does not show the account's 5 rows"
        assert app.execute("SELECT count(*) FROM bench.docs").fetchone()[0] == 0, "bench: the identity outlived its transaction"
    print(f"bench: the baseline validates {len(sample)} sampled tokens; RLS shows bench_app its account's rows only", flush=True)


# ---- legacy JWTs ----

JWT_SCOPE = "read write"
JWT_ISSUERS = {"hs256": "https://bench-hs256.example", "rs256": "https://bench-rs256.example"}
_signing_key = None


def _rs256_init(pem):
    global _signing_key
    from cryptography.hazmat.primitives import serialization
    _signing_key = serialization.load_pem_private_key(pem, password=None)


def _rs256_batch(args):
    import jwt
    first, last, exp, iat = args
    return [jwt.encode(jwt_claims("rs256", n, exp, iat), _signing_key, algorithm="RS256") for n in range(first, last + 1)]


def jwt_claims(alg, n, exp, iat):
    return {"sub": account_of(n), "scope": JWT_SCOPE, "iss": JWT_ISSUERS[alg], "exp": exp, "iat": iat, "jti": f"{alg}-{n}"}


def jwts(args):
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    secret = os.urandom(30).hex()  # 60 bytes, never written anywhere but this throwaway cluster
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    iat = int(time.time())
    exp = iat + 365 * 86400
    started = time.monotonic()
    with connect(args, autocommit=True) as conn:
        for name, alg, material in (("bench_hs256", "HS256", secret), ("bench_rs256", "RS256", public)):
            conn.execute("SELECT token.drop_legacy_issuer(%s)", (name,))
            conn.execute("SELECT token.register_legacy_issuer(%s, %s, %s, %s, current_setting('token.environment'), "
                         "now() + interval '1 year', 'bench: move to pg_token keys', issuer => %s)",
                         (name, [alg], material, KEY_TYPE, JWT_ISSUERS[alg.lower()]))
        print(f"bench: making {args.hs256:,} HS256 and {args.rs256:,} RS256 JWTs", flush=True)
        hs = [jwt.encode(jwt_claims("hs256", n, exp, iat), secret, algorithm="HS256") for n in range(1, args.hs256 + 1)]
        step = 2_000
        batches = [(f, min(f + step - 1, args.rs256), exp, iat) for f in range(1, args.rs256 + 1, step)]
        with multiprocessing.Pool(os.cpu_count(), initializer=_rs256_init, initargs=(pem,)) as pool:
            rs = [t for batch in pool.map(_rs256_batch, batches) for t in batch]
        for table, tokens in (("bench.jwt_hs256", hs), ("bench.jwt_rs256", rs)):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"CREATE TABLE {table} (n integer PRIMARY KEY, token text NOT NULL)")
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} (n, token) FROM STDIN") as cp:
                    cp.write("".join(f"{n}\t{t}\n" for n, t in enumerate(tokens, start=1)))
            conn.execute(f"VACUUM ANALYZE {table}")
        # The cached row's one JWT, handed to a statement like bench.hot(n) hands a hot token.
        conn.execute("DROP FUNCTION IF EXISTS bench.jwt_one()")
        conn.execute(f"CREATE FUNCTION bench.jwt_one() RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS "
                     f"$$ SELECT '{hs[0]}'::text $$")
        check_jwts(conn, args)
    print(f"bench: JWTs made and loaded in {time.monotonic() - started:.0f} s", flush=True)


def check_jwts(conn, args):
    """The extension must accept the bench JWTs as their accounts' and refuse a tampered one."""
    rng = np.random.default_rng()
    conn.execute("SET token.legacy_notice = off")
    for table, count, issuer in (("bench.jwt_hs256", args.hs256, "bench_hs256"), ("bench.jwt_rs256", args.rs256, "bench_rs256")):
        sample = sorted({1, count, *(int(x) for x in rng.integers(1, count + 1, size=100))})
        rows = conn.execute(
            f"SELECT j.n, v.valid, v.reason, v.account, v.key_type, v.scopes, v.metadata -> 'legacy_jwt' ->> 'issuer', "
            f"       v.deprecation IS NOT NULL AND v.sunset_at IS NOT NULL "
            f"  FROM {table} j, LATERAL token.check_token(j.token) v WHERE j.n = ANY(%s)", (sample,)).fetchall()
        assert len(rows) == len(sample), f"bench: {table} lacks sampled rows"
        for n, valid, reason, account, key_type, scopes, iss, deprecated in rows:
            assert valid, f"bench: JWT {n} of {table} is refused: {reason}"
            assert (account, key_type, scopes, iss, deprecated) == (account_of(n), KEY_TYPE, ["read", "write"], issuer, True), \
                f"bench: JWT {n} of {table} validates to the wrong identity"
        # The payload's last character changed: the signature no longer matches.
        reason = conn.execute(
            f"SELECT (token.check_token(split_part(token, '.', 1) || '.' || "
            f"        overlay(split_part(token, '.', 2) placing CASE WHEN substr(split_part(token, '.', 2), 10, 1) = 'A' "
            f"                THEN 'B' ELSE 'A' END from 10 for 1) || '.' || split_part(token, '.', 3))).reason "
            f"  FROM {table} WHERE n = 1").fetchone()[0]
        assert reason in ("bad_signature", "malformed"), f"bench: a tampered JWT of {table} was refused with {reason}"
    conn.execute("RESET token.legacy_notice")
    print(f"bench: sampled JWTs validate to their accounts; tampered ones are refused", flush=True)


# ---- per-validation cost in one statement ----

def cpu_ns(pid):
    """CPU time of a process in ns (first field of /proc/PID/schedstat), or None."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def timed(conn, pid, sql):
    c0, w0 = cpu_ns(pid), time.perf_counter_ns()
    conn.execute(sql).fetchone()
    w1, c1 = time.perf_counter_ns(), cpu_ns(pid)
    return (c1 - c0 if c0 is not None and c1 is not None else w1 - w0), w1 - w0


BASE = "SELECT count(s.token) FROM bench.sample s"
VALIDATE = "SELECT count(token.validate_token(s.token)) FROM bench.sample s"


def per_token(args):
    with connect(args, autocommit=True) as conn:
        # L tokens drawn uniformly (with replacement) from the N, in random order.
        conn.execute("DROP TABLE IF EXISTS bench.sample")
        conn.execute(
            "CREATE TABLE bench.sample AS SELECT p.token FROM "
            "(SELECT 1 + floor(random() * %s)::int AS n, random() AS r FROM generate_series(1, %s)) d "
            "JOIN bench.plain p USING (n) ORDER BY d.r", (args.size, args.lookups))
        conn.execute("VACUUM ANALYZE bench.sample")
        distinct = conn.execute("SELECT count(DISTINCT token) FROM bench.sample").fetchone()[0]
    results = {}
    # hit: this backend's cache, warmed. shared: no cache of its own, the shared cache warmed by
    # another session. miss: neither, every call reads the table.
    for kind, cache, shared in (("hit", "1GB", "on"), ("shared", "0", "on"), ("miss", "0", "off")):
        best = None
        if kind == "shared":
            with connect(args, autocommit=True) as w:
                w.execute("SET token.cache_size = 0")
                w.execute("SET token.last_used_interval = -1")
                w.execute(VALIDATE).fetchone()
        for _ in range(3):
            # A fresh backend each time: nothing cached from an earlier pass.
            with connect(args, autocommit=True) as c:
                pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
                # Validation only: last-use updates are left to the pgbench rows.
                c.execute("SET token.last_used_interval = -1")
                c.execute(f"SET token.cache_size = '{cache}'")
                c.execute(f"SET token.shared_cache = {shared}")
                c.execute("SET jit = off")
                base = min((timed(c, pid, BASE) for _ in range(2)), key=lambda x: x[0])
                if kind == "hit":
                    c.execute(VALIDATE).fetchone()  # warm: every drawn token is now cached
                    entries, used = c.execute("SELECT entries, bytes FROM token.cache_stats()").fetchone()
                    assert entries == distinct, f"bench: the cache holds {entries} of {distinct} tokens"
                    entry_bytes = used // entries
                shared0 = c.execute("SELECT hits_total FROM token.shared_cache_stats()").fetchone()[0]
                cpu, wall = timed(c, pid, VALIDATE)
                shared_hits = c.execute("SELECT hits_total FROM token.shared_cache_stats()").fetchone()[0] - shared0
                if kind != "hit":
                    entries = c.execute("SELECT entries FROM token.cache_stats()").fetchone()[0]
                    assert entries == 0, "bench: token.cache_size = 0 still cached tokens"
                if kind == "shared":
                    # A bucket that drew more tokens than it holds evicts one now and then.
                    assert shared_hits >= 0.99 * args.lookups, f"bench: {shared_hits} of {args.lookups} were shared hits"
                    shared_share = shared_hits / args.lookups
                if kind == "miss":
                    assert shared_hits == 0, "bench: token.shared_cache = off still used the shared cache"
                per = ((cpu - base[0]) / args.lookups / 1000, (wall - base[1]) / args.lookups / 1000)
                best = per if best is None or per[0] < best[0] else best
        results[kind] = best
    with open(args.csv, "a") as f:
        for kind in ("hit", "shared", "miss"):
            f.write(f"{args.size},{kind},{results[kind][0]:.3f},{results[kind][1]:.3f},{entry_bytes}\n")
    print(f"bench: {args.size:>10,} tokens: cache hit {results['hit'][0]:.2f} us, shared cache {results['shared'][0]:.2f} us "
          f"({shared_share:.3%} shared hits), "
          f"table {results['miss'][0]:.2f} us (CPU per validation, {args.lookups:,} in one statement)", flush=True)


# ---- report ----

def machine():
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    pg = subprocess.run(["/usr/lib/postgresql/15/bin/postgres", "--version"], capture_output=True,
                        text=True).stdout.strip()
    return f"{cpu}, {os.cpu_count()} cores, {mem_kb / 1024 / 1024:.0f} GiB RAM, {platform.system()} {platform.release()}; {pg}"


# key: (label, settings shown in the table)
ROWS = {
    "select1": ("`SELECT 1` (the floor)", ""),
    "pick_hot": ("harness: pick a hot-set token, no validation", ""),
    "hash_hot": ("call shape: `SELECT * FROM token.hash_token(…)` on a hot-set token", ""),
    "identity_constant": ("output shape: the identity's sixteen columns as constants, no call", ""),
    "pick_uniform": ("harness: pick a token from `bench.plain`, no validation", ""),
    "pk_lookup": ("primary-key lookup of a token row (`SELECT *`), uniform", ""),
    "baseline_hot": ("plain SQL + pgcrypto validation (bench/baseline.sql), hot set", ""),
    "baseline_uniform": ("plain SQL + pgcrypto validation (bench/baseline.sql), uniform", ""),
    "validate_hot": ("`token.validate_token`, hot set of 1,000 tokens", "defaults"),
    "validate_hot_narrow": ("the same, `SELECT account, scopes` instead of `SELECT *`", "defaults"),
    "validate_hot_limited": ("`token.validate_token`, hot set, each token rate-limited (1e9/s and 2e9/h, never reached)", "defaults"),
    "validate_hot_capped": ("`token.validate_token`, hot set, each token capped (1e12 uses, never spent)", "defaults"),
    "validate_uniform": ("`token.validate_token`, uniform over all tokens", "defaults"),
    "validate_uniform_no_touch": ("the same, `token.last_used_interval = -1`", "no last-use updates"),
    "pk_lookup_steady": ("primary-key lookup, in the steady-state rounds", ""),
    "validate_uniform_steady": ("`token.validate_token`, uniform, last-use updates in steady state", "defaults"),
    "authenticate_rls": ("`token.authenticate` + RLS-filtered select, one transaction, hot set", "defaults, as `bench_app`"),
    "one_token": ("4 sessions validating one token", "defaults"),
    "four_tokens": ("4 sessions validating 4 different tokens", "defaults"),
    "validate_jwt_cached": ("legacy JWT: 4 sessions validating one HS256 JWT (cached verdict)", "legacy notice off"),
    "validate_jwt_first_hs256": ("legacy JWT: a HS256 JWT the session has not seen, from `bench.jwt_hs256`",
                                 "legacy notice off"),
    "validate_jwt_first_rs256": ("legacy JWT: a RS256 JWT the session has not seen, from `bench.jwt_rs256`",
                                 "legacy notice off"),
}


def jwt_notes(args, runs, tps):
    """What the legacy-JWT rows compare with, and whether a first-presentation row repeated JWTs."""
    if not any(k.startswith("validate_jwt") for k in runs):
        return []
    counts = dict(kv.split("=") for kv in (args.jwt_counts or "").split(",") if "=" in kv)
    notes = ["", "Legacy JWT rows (`token.legacy_notice = off`, else each call sends a NOTICE to pgbench):"]
    if "validate_jwt_cached" in tps and "one_token" in tps:
        notes.append(f"- one HS256 JWT over and over: {tps['validate_jwt_cached']:,.0f} TPS, "
                     f"{tps['validate_jwt_cached'] / tps['one_token']:.0%} of 4 sessions validating one opaque token.")
    base = "validate_uniform_no_touch" if "validate_uniform_no_touch" in tps else "validate_uniform"
    for alg in ("hs256", "rs256"):
        key = f"validate_jwt_first_{alg}"
        if key not in runs:
            continue
        line = f"- first presentation, {alg.upper()}: {tps[key]:,.0f} TPS"
        if base in tps:
            line += (f", {tps[key] / tps[base]:.0%} of `{base}` (an opaque token drawn the same way, one index lookup "
                     "in a side table per statement)")
        n = int(counts.get(alg, 0))
        per_run = runs[key]["tps_max"] * args.seconds
        if n and per_run > n:
            line += (f". **Repeats:** its best round made {per_run:,.0f} validations against {n:,} JWTs, so some sessions "
                     f"met a JWT again (a cached verdict); raise BENCH_JWT_{alg.upper()}")
        elif n:
            line += f"; no JWT presented twice by a session ({per_run:,.0f} validations at most per round, {n:,} JWTs)"
        notes.append(line + ".")
    return notes


def read_pgbench(path):
    """Each workload's rounds folded into one row: median TPS and latency, the lowest and
    highest TPS, and the last-use updates of all rounds."""
    rounds = {}
    for row in csv.DictReader(open(path)):
        rounds.setdefault(row["name"], []).append(row)
    out = {}
    for name, rows in rounds.items():
        tps = sorted(float(r["tps"]) for r in rows)
        out[name] = {
            "tps": float(np.median(tps)),
            "tps_min": tps[0],
            "tps_max": tps[-1],
            "rounds": len(rows),
            "latency_ms": float(np.median([float(r["latency_ms"]) for r in rows])),
            "touch_written": sum(int(r["touch_written"]) for r in rows),
            "touch_dropped": sum(int(r["touch_dropped"]) for r in rows),
        }
    return out


def report(args):
    runs = read_pgbench(args.pgbench)
    per = {}
    entry_bytes = 0
    for size, kind, cpu_us, wall_us, entry in csv.reader(open(args.per_token)):
        per[(int(size), kind)] = (float(cpu_us), float(wall_us))
        entry_bytes = max(entry_bytes, int(entry))
    tps = {k: float(v["tps"]) for k, v in runs.items()}
    floor = tps["select1"]
    when = args.date or f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
    lines = [
        "# make bench",
        "",
        f"Run {when} UTC on {machine()}.",
        f"pg_token {args.version}. Figures are from this one run; ratios are within it.",
        "",
        f"## Throughput: pgbench -M prepared -c 4 -j 2 -T {args.seconds}, {args.tokens:,} tokens",
        "",
        f"Every workload ran once in each of {args.rounds} rounds, the rounds one after the other; TPS and latency are",
        "the median of its rounds, the range its lowest and highest round.",
        "",
        f"Uniform rows draw a token (or id) from the {args.tokens:,}-row side table `bench.plain` in the same statement;",
        "hot-set rows get theirs from `bench.hot(n)`, a subscript into a constant array of 1,000 tokens. The harness",
        "rows show what that costs alone; the call-shape row what any function called as `SELECT * FROM f($1)` costs;",
        "the output-shape row what sending the identity's sixteen columns costs with no function called at all.",
        "Before the first round every token is validated once (without last-use updates), so the shared cache",
        "(`token.shared_cache_size`) holds them all, as it does in a server that has run for a minute: the uniform",
        "rows measure that steady state, not a server's first pass. Every token is then due a last-use update at its",
        "first use in a run (its last one is over a minute old). The two steady-state rows run in rounds of their own",
        f"after all the others, following {args.steady_warm} s of uniform traffic with last-use updates (unmeasured): as in a",
        "server that has served such traffic for a while, a token's use is written only when its interval (60 s) has run out.",
        "",
        "| workload | TPS | range | vs SELECT 1 | latency | pg_token settings | last-use updates written / dropped |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for key, (label, settings) in ROWS.items():
        if key not in runs:
            continue
        r = runs[key]
        touches = f"{int(r['touch_written']):,} / {int(r['touch_dropped']):,}" if settings else ""
        spread = f"{r['tps_min'] / 1000:,.1f}k–{r['tps_max'] / 1000:,.1f}k"
        lines.append(f"| {label} | {tps[key]:,.0f} | {spread} | {tps[key] / floor:.0%} | {r['latency_ms'] * 1000:.0f} µs | {settings} | {touches} |")
    lines += jwt_notes(args, runs, tps)
    sizes = sorted({s for s, _ in per})
    lines += [
        "",
        f"## CPU per validation, {args.lookups:,} validations in one statement",
        "",
        "`SELECT count(token.validate_token(token)) FROM bench.sample`, tokens drawn uniformly from the table,",
        "minus the same statement without the call; the backend's CPU time, best of 3 fresh sessions.",
        "Cache hit: `token.cache_size = '1GB'`, warmed by one pass. Shared cache: `token.cache_size = 0` (no cache",
        "of the backend's own), every token in the shared cache (`token.shared_cache_size`) from another session's",
        "pass: what a backend pays for a token it has not cached itself. Table: `token.cache_size = 0` and",
        "`token.shared_cache = off` (every call does the index scan). All with `token.last_used_interval = -1`",
        "(the cost of validating, not of queuing last-use updates; the pgbench rows include those).",
        "",
        "| tokens in the table | cache hit | shared cache | table read |",
        "|---:|---:|---:|---:|",
    ]
    for s in sizes:
        lines.append(f"| {s:,} | {per[(s, 'hit')][0]:.2f} µs | {per[(s, 'shared')][0]:.2f} µs | {per[(s, 'miss')][0]:.2f} µs |")
    small_pages = {}
    if args.small_pages and os.path.exists(args.small_pages):
        for size, kind, cpu_us, _wall, _entry in csv.reader(open(args.small_pages)):
            small_pages[(int(size), kind)] = float(cpu_us)
    for s in sorted({s for s, _ in small_pages}):
        lines.append(f"| {s:,}, 4 kB pages | {small_pages[(s, 'hit')]:.2f} µs | {small_pages[(s, 'shared')]:.2f} µs "
                     f"| {small_pages[(s, 'miss')]:.2f} µs |")
    lines += ["", (f"Shared memory in 2 MB huge pages (`huge_pages = on`), as a large shared_buffers "
                   "should be; the last row is the same table after a restart with 4 kB pages and `pg_prewarm`: a table "
                   "read touches two random pages of a multi-gigabyte table, and with small pages most of its cost is address "
                   "translation.") if args.huge_pages == "on" else
              "Shared memory in 4 kB pages (`BENCH_HUGE_PAGES=off`, or huge pages could not be reserved)."]

    def verdict(ok):
        return "met" if ok else "**missed**"

    targets = []
    if "validate_hot" in tps:
        r = tps["validate_hot"] / floor
        note = (f" (returning the identity's sixteen columns with no call at all: {tps['identity_constant'] / floor:.0%})"
                if "identity_constant" in tps else "")
        targets.append(("validate_token, hot set ≥ 85% of `SELECT 1` TPS", f"{r:.0%}{note}", verdict(r >= 0.85)))
    if "validate_uniform" in tps and "pk_lookup" in tps:
        r = tps["validate_uniform"] / tps["pk_lookup"]
        note = (f"; without last-use updates {tps['validate_uniform_no_touch'] / tps['pk_lookup']:.0%}"
                if "validate_uniform_no_touch" in tps else "")
        targets.append(("validate_token, uniform ≥ primary-key lookup TPS (every token due a last-use update)",
                        f"{tps['validate_uniform']:,.0f} vs {tps['pk_lookup']:,.0f} ({r:.0%}{note})", verdict(r >= 1.0)))
    if "validate_uniform_steady" in tps and "pk_lookup_steady" in tps:
        r = tps["validate_uniform_steady"] / tps["pk_lookup_steady"]
        st = runs["validate_uniform_steady"]
        per_validation = st["touch_written"] / (st["tps"] * args.seconds * st["rounds"])
        targets.append((f"the same in steady state, after {args.steady_warm} s of uniform traffic (issue 18)",
                        f"{tps['validate_uniform_steady']:,.0f} vs {tps['pk_lookup_steady']:,.0f} ({r:.0%}; "
                        f"{per_validation:.2f} last-use updates per validation)", verdict(r >= 1.0)))
    if sizes:
        hit = max(per[(s, "hit")][0] for s in sizes)
        miss = max(per[(s, "miss")][0] for s in sizes)
        worst = lambda kind, v: next(s for s in sizes if per[(s, kind)][0] == v)
        targets.append(("≤ 1 µs per validation on cache hits (one statement, largest of all sizes)",
                        f"{hit:.2f} µs ({worst('hit', hit):,} tokens)", verdict(hit <= 1.0)))
        targets.append(("≤ 4 µs per validation reading the table (one statement, largest of all sizes)",
                        f"{miss:.2f} µs ({worst('miss', miss):,} tokens)", verdict(miss <= 4.0)))
        big, small = max(sizes), min(sizes)
        targets.append((f"≤ 3 µs per validation on misses of the backend's cache at {big:,} tokens, answered by "
                        "the shared cache (issue 18)",
                        f"{per[(big, 'shared')][0]:.2f} µs (reading the table: {per[(big, 'miss')][0]:.2f} µs)",
                        verdict(per[(big, 'shared')][0] <= 3.0)))
        if big != small:
            g = per[(big, "shared")][0] / per[(small, "shared")][0]
            t = per[(big, "miss")][0] / per[(small, "miss")][0]
            targets.append((f"those misses at {big:,} tokens ≤ 1.5× what {small:,} cost (issue 18)",
                            f"{g:.2f}× (reading the table: {t:.2f}×)", verdict(g <= 1.5)))
            for kind, plural in (("hit", "cache hits"), ("miss", "table reads")):
                g = per[(big, kind)][0] / per[(small, kind)][0]
                targets.append((f"{big:,} tokens cost ≤ 1.3× what {small:,} cost per validation ({plural})",
                                f"{g:.2f}×", verdict(g <= 1.3)))
    if "one_token" in tps and "four_tokens" in tps:
        r = tps["one_token"] / tps["four_tokens"]
        targets.append(("4 sessions on one token ≥ 90% of 4 sessions on 4 tokens", f"{r:.0%}", verdict(r >= 0.9)))
    if "validate_hot_limited" in tps and "validate_hot" in tps:
        targets.append(("a rate limit costs ≤ 10% of hot-set TPS",
                        f"{tps['validate_hot_limited'] / tps['validate_hot']:.0%} of `validate_hot`",
                        verdict(tps["validate_hot_limited"] >= 0.9 * tps["validate_hot"])))
    if "validate_hot_capped" in tps and "validate_hot" in tps:
        targets.append(("a usage cap costs ≤ 10% of hot-set TPS",
                        f"{tps['validate_hot_capped'] / tps['validate_hot']:.0%} of `validate_hot`",
                        verdict(tps["validate_hot_capped"] >= 0.9 * tps["validate_hot"])))
    if args.rate:
        ra = json.load(open(args.rate))
        targets.append(("a rate limit shared by 4 sessions holds within 1% (every full window)",
                        f"{ra['worst_pct']:.2f}% off at worst over {ra['windows']} windows",
                        verdict(ra["worst_pct"] <= 1.0)))
        lines += ["", "## A rate limit shared by 4 sessions", "",
                  f"One token limited to {ra['limit']:,} validations per second; 4 sessions call `token.check_token` on it "
                  f"as fast as they can for {ra['seconds']} s ({ra['calls']:,} calls, {ra['calls'] / ra['seconds']:,.0f} "
                  "per second). Each accepted call returns `rate_reset_at`, the end of the window it was counted in; the "
                  "table counts acceptances per window, leaving out the first and last (partly outside the run).", "",
                  "| | |", "|---|---:|",
                  f"| full windows | {ra['windows']} |",
                  f"| acceptances per window: least, most | {ra['min']:,}, {ra['max']:,} |",
                  f"| worst deviation from the limit | {ra['worst_pct']:.2f}% |",
                  f"| refused as rate_limited | {ra['refused']:,} |"]
    if args.last_use:
        lu = json.load(open(args.last_use))
        fpi = ("" if lu["fpi_bytes"] is None else
               f"| of which full-page images | {lu['fpi_bytes'] / lu['wal_bytes']:.0%} "
               f"({lu['wal_per_update_without_fpi']:,.0f} bytes per update without them) |")
        cpu = ("" if not lu["writer_cpu_s"] or not lu["updates"] else
               f"| the writer's CPU time per update | {lu['writer_cpu_s'] / lu['updates'] * 1e6:.1f} µs "
               f"({lu['writer_cpu_s']:.2f} s in all) |")
        lines += ["", "## Last-use updates", "",
                  f"`validate_uniform` once more ({lu['seconds']} s, after a CHECKPOINT), then `token.flush_events()`: "
                  "the WAL between the LSN before the run and after the writer applied everything it queued, per "
                  "row it updated (rows whose `last_used_at` moved into the run), and how many of those updates were "
                  "HOT (no index entry written; from `pg_walinspect` where installed, else pg_stat_user_tables). "
                  "Nothing else writes during the run: the WAL is the writer's (a row lock and an update per row) "
                  "and the pruning of the versions it leaves. The first change of each page after the CHECKPOINT "
                  "writes the whole page (full-page images; a server checkpointing every few minutes pays that "
                  "once per page per checkpoint).", "",
                  "| | |", "|---|---:|",
                  f"| validate_uniform | {lu['tps']:,.0f} tps |",
                  f"| rows updated | {lu['updates']:,} ({lu['updates'] / lu['seconds']:,.0f} per second; queued "
                  f"{lu['touch_written']:,}, dropped {lu['touch_dropped']:,}) |",
                  f"| **WAL per last-use update** | **{lu['wal_per_update']:,.0f} bytes** |"]
        lines += [x for x in (fpi, cpu) if x]
        lines.append(f"| HOT updates | {lu['hot_share']:.1%} ({lu['hot']:,} of {lu['hot'] + lu['cold']:,}) |")
    if args.flood:
        fl = json.load(open(args.flood))
        targets.append(("refusal flood: events + WAL + server log < 0.1 MB/s", f"{fl['total_mb_s']:.4f} MB/s",
                        verdict(fl["total_mb_s"] < 0.1)))
        targets.append(("refusal flood: good traffic keeps ≥ 80% of its TPS", f"{fl['good_kept']:.0%}",
                        verdict(fl["good_kept"] >= 0.8)))
        lines += ["", "## Refusal flood", "",
                  f"4 connections as `bench_app` (a token_validator) run `SELECT valid FROM token.check_token('hk_live_' || "
                  f"md5(random()::text))` for {fl['seconds']} s, every call a distinct garbage token; then 2 connections "
                  f"validating hot-set tokens run alone, beside 2 flooding ones, beside them with `token.flood_nice = 0`, "
                  f"and beside them with `token.max_refusal_rate = 0`, {len(fl['alone_runs'])} rounds "
                  "interleaved (median). Sizes are measured around the flood: `pg_total_relation_size('token.events')`, "
                  "`pg_wal_lsn_diff` (all WAL, not only the events'), and the server log's growth.", "",
                  f"The refusal tarpit in force: `token.max_refusal_rate = {fl.get('max_refusal_rate', 0)}` "
                  f"({cap_words(fl.get('max_refusal_rate', 0))}); every figure but the last row's is measured with it.",
                  "",
                  "| | |", "|---|---:|",
                  f"| refusals per second | {fl['refusals_per_s']:,.0f} |",
                  f"| refusal rows written per second | {fl['rows_per_s']:.2f} ({fl['rows']:,} rows for {fl['refusals']:,} refusals) |",
                  f"| token.events growth | {fl['events_mb_s']:.4f} MB/s |",
                  f"| WAL | {fl['wal_mb_s']:.4f} MB/s |",
                  f"| server log | {fl['log_mb_s']:.4f} MB/s |",
                  f"| **events + WAL + log** | **{fl['total_mb_s']:.4f} MB/s** |",
                  f"| good traffic alone (2 connections) | {fl['good_alone_tps']:,.0f} tps |",
                  f"| good traffic beside 2 flooding connections | {fl['good_beside_tps']:,.0f} tps ({fl['good_kept']:.0%}) |",
                  f"| the same with `token.flood_nice = 0` | {fl['good_beside_nice0_tps']:,.0f} tps ({fl['good_kept_nice0']:.0%}) |",
                  *([f"| the same with `token.max_refusal_rate = 0` (no tarpit) | {fl['good_beside_uncapped_tps']:,.0f} tps "
                     f"({fl['good_kept_uncapped']:.0%}) |"] if "good_beside_uncapped_tps" in fl else []),
                  "",
                  "The flood's pgbench runs at `nice 19`: it stands in for an attacker's client on another machine, so it must "
                  "not take the good clients' CPU on this 2-core one (the kernel shares CPU between sessions first). The "
                  "flooding backends lower their own priority to `token.flood_nice` after 1,000 refusals in a second (the "
                  "`flood_nice = 0` row turns that off), and wait before each refusal past `token.max_refusal_rate` a second "
                  "(the tarpit; the last row turns it off)."]
    if args.churn:
        ch = json.load(open(args.churn))
        for kind, what in (("revoke", "revocations"), ("rotate", "rotations")):
            targets.append((f"admin churn: the hot set keeps ≥ 90% of its TPS beside {ch['rate']} {what}/s (issue 18; "
                            "churn seconds against the quiet seconds between them)",
                            f"{ch[kind + '_alt_kept']:.0%} (separate runs: {ch[kind + '_kept']:.0%}; the control of "
                            f"trivial commits: {ch['commit_alt_kept']:.0%})", verdict(ch[kind + "_alt_kept"] >= 0.9)))
        lines += ["", "## Admin churn", "",
                  f"4 connections validate a hot set of 100 tokens (`bench/scripts/validate_hot_100.pgbench`) for "
                  f"{ch['seconds']} s: alone, while one session revokes {ch['rate']} other tokens a second "
                  f"(`token.revoke_token`, one transaction each), and while it rotates {ch['rate']} a second "
                  f"(`token.rotate_token`), and, as the control, while it commits {ch['rate']} trivial writes a second "
                  f"(`UPDATE` of a one-row table: what any client committing at that rate costs); {ch['rounds']} rounds "
                  "interleaved, each starting with another kind. TPS is each kind's median round; kept is the median over rounds of each round's ratio "
                  "to that round's run alone. A change drops only the changed token from the caches (the shared-memory "
                  "change log), so the hot set stays cached; the hit share is `token.metrics()` over each run. Separate "
                  "runs a few seconds apart drift on this machine by more than the effect measured, so each kind also "
                  f"runs once a round for {2 * ch['seconds']} s with the churn on in odd clock seconds only "
                  "(`pgbench -l --sampling-rate=0.1` logs a tenth of the transactions with the second each ended in; "
                  "the first and last second are left out): "
                  "*kept, alternating* is the TPS of the churn's seconds over that of the quiet seconds between them, "
                  "median of the rounds.", "",
                  "| | TPS | kept, separate runs | kept, alternating seconds | churn reached | cache hits | admin backend CPU |",
                  "|---|---:|---:|---:|---:|---:|---:|",
                  f"| hot set alone | {ch['alone_tps']:,.0f} | | | | {ch['alone_hit_share']:.2%} | |",
                  f"| beside trivial commits (control) | {ch['commit_tps']:,.0f} | {ch['commit_kept']:.0%} | "
                  f"{ch['commit_alt_kept']:.0%} | {ch['commit_rate']:.0f}/s | {ch['commit_hit_share']:.2%} | "
                  f"{ch['commit_admin_cpu']:.0%} of a core, {ch['commit_admin_us']:.0f} us per commit |",
                  f"| beside revocations | {ch['revoke_tps']:,.0f} | {ch['revoke_kept']:.0%} | {ch['revoke_alt_kept']:.0%} | "
                  f"{ch['revoke_rate']:.0f}/s | {ch['revoke_hit_share']:.2%} | {ch['revoke_admin_cpu']:.0%} of a core, "
                  f"{ch['revoke_admin_us']:.0f} us per revoke |",
                  f"| beside rotations | {ch['rotate_tps']:,.0f} | {ch['rotate_kept']:.0%} | {ch['rotate_alt_kept']:.0%} | "
                  f"{ch['rotate_rate']:.0f}/s | {ch['rotate_hit_share']:.2%} | {ch['rotate_admin_cpu']:.0%} of a core, "
                  f"{ch['rotate_admin_us']:.0f} us per rotation |",
                  "", f"What the hot set loses beside the churn is CPU: the machine has {os.cpu_count()} cores, which the 4 "
                  "validating connections already fill, and the administering backend (its CPU above, from "
                  "`/proc/PID/schedstat`), its client and the WAL writer take their share."]
    if args.loads:
        loads = [ln.strip().split(",") for ln in open(args.loads) if ln.strip()]
        if loads:
            lines += ["", "## Building the table", "",
                      "How long `bench.py load` took to grow `token.tokens` to each size: tokens and their SHA-256 made "
                      "in Python, `COPY` into the indexed table in batches of 250,000, then `VACUUM ANALYZE`; each step "
                      "adds to the table the step before left.", "",
                      "| tokens | seconds for this step |", "|---:|---:|"]
            lines += [f"| {int(n):,} | {float(t):,.0f} |" for n, t in loads]
    lines += ["", "## Targets (reported, not pass/fail)", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets]
    lines += ["", "## Settings", ""]
    settings = [f"- {s}" for s in args.setting]
    one_statement = [x for x in settings if x.startswith("- One statement")]
    lines += [x for x in settings if x not in one_statement]
    if entry_bytes and "validate_uniform" in runs:
        entries = args.cache_bytes // entry_bytes
        r = runs["validate_uniform"]
        lines.append(
            f"- Uniform: a backend's {args.cache_bytes // 1024 // 1024} MB cache holds about {entries:,} tokens "
            f"({entry_bytes} bytes each, measured), {min(entries / args.tokens, 1):.1%} of the {args.tokens:,}, so at most "
            "that share of validations can be cache hits; the others come from the shared cache "
            f"({args.shared_capacity:,} entries, so all {args.tokens:,} once warm) or an index scan, and each queues a last-use "
            "update unless the row was used less than a minute ago. The event writer collects them for up to 100 ms "
            f"and applies up to 2,048 in one UPDATE, on the same {os.cpu_count()} cores; over the {r['rounds']} rounds it "
            f"took {int(r['touch_written']):,} from its queue and dropped {int(r['touch_dropped']):,} for want of room "
            "(8,192 per database). The row with `token.last_used_interval = -1` shows what those updates cost.")
    lines += one_statement
    with open(args.md, "w") as f:
        f.write("\n".join(lines) + "\n")
    chart(args, runs, tps, floor, per, sizes)


def chart(args, runs, tps, floor, per, sizes):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    keys = [k for k in ROWS if k in runs]
    colors = ["#999" if k in ("select1", "pick_hot", "hash_hot", "identity_constant", "pick_uniform", "pk_lookup") else
              "#c84" if k.startswith("baseline") else "#2a7" for k in keys]
    ax1.barh(range(len(keys)), [tps[k] for k in keys], color=colors)
    ax1.set_yticks(range(len(keys)), [ROWS[k][0].replace("`", "") for k in keys], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel(f"transactions per second, median of {args.rounds} rounds (pgbench -M prepared -c 4 -j 2 -T {args.seconds})")
    ax1.set_title(f"{args.tokens:,} tokens; % of SELECT 1")
    for i, k in enumerate(keys):
        ax1.text(tps[k], i, f" {tps[k] / floor:.0%}", va="center", fontsize=8)
    ax1.set_xlim(right=max(tps.values()) * 1.12)
    for kind, style, color, label in (("hit", "o-", "#2a7", "cache hit"), ("shared", "^-", "#27a", "shared cache"),
                                      ("miss", "s-", "#c84", "table read")):
        xs = [s for s in sizes if (s, kind) in per]
        ax2.plot(xs, [per[(s, kind)][0] for s in xs], style, color=color, label=label)
        for x in xs:
            ax2.annotate(f"{per[(x, kind)][0]:.2f}", (x, per[(x, kind)][0]), textcoords="offset points", xytext=(0, 6),
                         ha="center", fontsize=8)
    ax2.axhline(1.0, color="#2a7", lw=0.8, ls="--", label="target, hit (1 µs)")
    ax2.axhline(3.0, color="#27a", lw=0.8, ls="--", label="target, backend cache miss (3 µs)")
    ax2.axhline(4.0, color="#c84", lw=0.8, ls="--", label="target, table read (4 µs)")
    ax2.set_xscale("log")
    ax2.set_xlabel("tokens in the table")
    ax2.set_ylabel("CPU µs per validation")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    ax2.set_title(f"{args.lookups:,} validations in one statement")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


def pgbench(args, script, clients, seconds, user, log, nice=0, extra=()):
    """Starts pgbench (prepared, over the socket); returns the process. `nice` runs the client
    itself at that priority: the flood's load generator stands in for a client on another
    machine, so it must not take the good clients' CPU on this one."""
    cmd = ["nice", "-n", str(nice), f"{args.pgbin}/pgbench", "-h", args.host, "-p", str(args.port), "-U", user, "-n", "-M", "prepared",
           "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds), "-f", f"{args.scripts}/{script}.pgbench",
           *extra, "bench"]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def tps_of(log):
    for line in open(log):
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise SystemExit(f"no tps in {log}:\n" + open(log).read())


def flood(args):
    """The refusal flood: 4 connections as a token_validator send distinct garbage for
    --seconds; what that costs in token.events, WAL and server log; and what 2 connections
    validating good tokens keep of their throughput while 2 others flood."""
    with connect(args, autocommit=True) as c:
        def state():
            return c.execute("SELECT pg_current_wal_lsn(), pg_total_relation_size('token.events'), "
                             "(SELECT count(*) FROM token.events WHERE event = 'refused'), "
                             "(SELECT coalesce(sum(refusals), 0)::bigint FROM token.worker_status())").fetchone()

        def settle():
            c.execute("SELECT token.flush_events('60 s')")
            c.execute("CHECKPOINT")

        settle()
        # The refusal tarpit's cap in force for bench_app (the default unless the settings
        # changed it): every figure below is measured with it, but the last row's.
        cap = int(c.execute("SELECT setting FROM pg_settings WHERE name = 'token.max_refusal_rate'").fetchone()[0])
        (lsn0, size0, rows0, refused0), log0 = state(), os.path.getsize(args.log)
        p = pgbench(args, "flood", 4, args.seconds, "bench_app", f"{args.out}/flood.log", nice=19)
        p.wait()
        c.execute("SELECT token.flush_events('60 s')")
        (lsn1, size1, rows1, refused1), log1 = state(), os.path.getsize(args.log)
        wal = c.execute("SELECT pg_wal_lsn_diff(%s, %s)", (lsn1, lsn0)).fetchone()[0]
        secs = args.seconds
        refusals = refused1 - refused0
        mb = lambda b: b / 1e6 / secs  # noqa: E731
        events_mb, wal_mb, log_mb = mb(size1 - size0), mb(float(wal)), mb(log1 - log0)
        # Good traffic alone, beside a flood, beside a flood with token.flood_nice = 0
        # (backends refusing floods keep their priority), and beside a flood with
        # token.max_refusal_rate = 0 (no tarpit), interleaved round by round.
        alone, beside, beside_plain, beside_uncapped = [], [], [], []

        def good_beside(r, tag):
            settle()
            g = pgbench(args, "validate_hot_2", 2, secs, "bench_app", f"{args.out}/good-{tag}-{r}.log")
            f = pgbench(args, "flood", 2, secs, "bench_app", f"{args.out}/flood-{tag}-{r}.log", nice=19)
            g.wait()
            f.wait()
            return tps_of(f"{args.out}/good-{tag}-{r}.log")

        for r in range(args.rounds):
            settle()
            g = pgbench(args, "validate_hot_2", 2, secs, "bench_app", f"{args.out}/good-alone-{r}.log")
            g.wait()
            alone.append(tps_of(f"{args.out}/good-alone-{r}.log"))
            beside.append(good_beside(r, "beside"))
            c.execute("ALTER SYSTEM SET token.flood_nice = 0")
            c.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)
            beside_plain.append(good_beside(r, "beside-nice0"))
            c.execute("ALTER SYSTEM RESET token.flood_nice")
            c.execute("ALTER SYSTEM SET token.max_refusal_rate = 0")
            c.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)
            beside_uncapped.append(good_beside(r, "beside-uncapped"))
            c.execute("ALTER SYSTEM RESET token.max_refusal_rate")
            c.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)
        c.execute("SELECT token.flush_events('60 s')")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    row = {
        "seconds": secs, "max_refusal_rate": cap, "refusals": refusals, "refusals_per_s": refusals / secs,
        "rows": rows1 - rows0, "rows_per_s": (rows1 - rows0) / secs,
        "events_mb_s": events_mb, "wal_mb_s": wal_mb, "log_mb_s": log_mb, "total_mb_s": events_mb + wal_mb + log_mb,
        "good_alone_tps": med(alone), "good_beside_tps": med(beside), "good_kept": med(beside) / med(alone),
        "good_beside_nice0_tps": med(beside_plain), "good_kept_nice0": med(beside_plain) / med(alone),
        "good_beside_uncapped_tps": med(beside_uncapped), "good_kept_uncapped": med(beside_uncapped) / med(alone),
        "alone_runs": alone, "beside_runs": beside, "beside_nice0_runs": beside_plain,
        "beside_uncapped_runs": beside_uncapped,
    }
    with open(args.json, "w") as f:
        json.dump(row, f)
    print(f"bench: flood with token.max_refusal_rate = {cap} ({cap_words(cap)}): {refusals / secs:,.0f} refusals/s -> "
          f"{(rows1 - rows0) / secs:.2f} rows/s, "
          f"{row['total_mb_s']:.4f} MB/s (events {events_mb:.4f}, WAL {wal_mb:.4f}, log {log_mb:.4f}); "
          f"good traffic {med(beside):,.0f} tps beside the flood vs {med(alone):,.0f} alone ({row['good_kept']:.0%}; "
          f"with token.flood_nice = 0: {row['good_kept_nice0']:.0%}; "
          f"with token.max_refusal_rate = 0: {row['good_kept_uncapped']:.0%})")


def cap_words(cap):
    """token.max_refusal_rate as a reader should take it."""
    return "no tarpit" if cap == 0 else f"each flooding backend held at {cap:,} refusals a second"


def churn(args):
    """Admin churn: 4 connections validate a hot set of 100 tokens alone, while one session
    commits --rate trivial writes a second (the control: what any client committing at that
    rate costs), while it revokes --rate tokens a second, and while it rotates --rate a second
    (each its own transaction), interleaved round by round. The revoked and rotated tokens are
    cold ones (never in the hot set). What the hot set keeps of its TPS (the median over rounds
    of each round's ratio to the same round's run alone: the machine drifts between rounds),
    the churn rate reached, and the cache hit share of the validations (token.metrics(), all
    backends). And, robust to that drift, the same within one run: the churn on in odd clock
    seconds only, the TPS of those seconds over that of the quiet ones (`alternate`)."""
    import threading
    secs, rate = args.seconds, args.rate
    with connect(args, autocommit=True) as c:
        need = rate * secs * args.rounds * 4 + 1000  # revokes and rotations, separate runs and alternating
        ids = [r[0] for r in c.execute(
            "SELECT p.id FROM bench.plain p JOIN token.tokens t USING (id) "
            "WHERE p.n > 3000 AND t.revoked_at IS NULL AND t.revoke_after IS NULL "
            "ORDER BY p.n DESC LIMIT %s", (need,)).fetchall()]
        if len(ids) < need:
            raise SystemExit(f"bench: churn needs {need} cold tokens, found {len(ids)}")
        c.execute("CREATE TABLE IF NOT EXISTS bench.churn_control (n bigint NOT NULL)")
        c.execute("TRUNCATE bench.churn_control")
        c.execute("INSERT INTO bench.churn_control VALUES (0)")

        def settle():
            c.execute("SELECT token.flush_events('60 s')")
            c.execute("CHECKPOINT")

        def cache_counts():
            return c.execute("SELECT cache_hits_total, cache_misses_total FROM token.metrics()").fetchone()

        def op(a, kind):
            if kind == "commit":
                a.execute("UPDATE bench.churn_control SET n = n + 1")
            elif kind == "revoke":
                a.execute("SELECT token.revoke_token(%s, 'bench churn')", (ids.pop(),))
            else:
                a.execute("SELECT token_id FROM token.rotate_token(%s)", (ids.pop(),))

        def run(kind, r):
            settle()
            stop, done, cpu = threading.Event(), [0], [0.0]

            def admin():
                with connect(args, autocommit=True) as a:
                    pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
                    c0 = cpu_ns(pid)
                    start = time.monotonic()
                    while not stop.is_set():
                        op(a, kind)
                        done[0] += 1
                        wait = start + done[0] / rate - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                    c1 = cpu_ns(pid)
                    if c0 is not None and c1 is not None:
                        cpu[0] = (c1 - c0) / 1e9 / (time.monotonic() - start)

            h0 = cache_counts()
            t = threading.Thread(target=admin) if kind != "alone" else None
            if t:
                t.start()
            started = time.monotonic()
            g = pgbench(args, "validate_hot_100", 4, secs, "postgres", f"{args.out}/churn-{kind}-{r}.log")
            g.wait()
            elapsed = time.monotonic() - started
            stop.set()
            if t:
                t.join()
            h1 = cache_counts()
            hits, misses = h1[0] - h0[0], h1[1] - h0[1]
            return (tps_of(f"{args.out}/churn-{kind}-{r}.log"), done[0] / elapsed, hits / max(hits + misses, 1),
                    cpu[0], 1e6 * cpu[0] / max(done[0] / elapsed, 1e-9))

        def alternate(kind, r):
            """One pgbench run of twice the seconds, the churn on in odd clock seconds only:
            what the hot set keeps is its TPS in the churn's seconds over its TPS in the quiet
            seconds around them, measured a second apart, so the machine's drift between runs
            does not enter it (the first and last second are left out)."""
            settle()
            stop, done, on_seconds = threading.Event(), [0], set()

            def admin():
                with connect(args, autocommit=True) as a:
                    while not stop.is_set():
                        now = time.time()
                        sec = int(now)
                        if sec % 2 == 0:
                            time.sleep(min(sec + 1 - now, 0.05))
                            continue
                        on_seconds.add(sec)
                        for i in range(rate):
                            if stop.is_set() or int(time.time()) != sec:
                                break
                            op(a, kind)
                            done[0] += 1
                            wait = sec + (i + 1) / rate - time.time()
                            if wait > 0:
                                time.sleep(wait)
                        while int(time.time()) == sec and not stop.is_set():
                            time.sleep(0.005)

            prefix = f"{args.out}/churn-alt-{kind}-{r}"
            for old in glob.glob(prefix + ".*"):
                os.remove(old)
            t = threading.Thread(target=admin)
            t.start()
            # A tenth of the transactions logged with the clock second they ended in (pgbench's
            # aggregate intervals start when its threads do, not on the second).
            g = pgbench(args, "validate_hot_100", 4, 2 * secs, "postgres", f"{prefix}.out",
                        extra=("-l", "--sampling-rate=0.1", f"--log-prefix={prefix}"))
            g.wait()
            stop.set()
            t.join()
            per = {}
            for fn in glob.glob(prefix + ".[0-9]*"):
                for line in open(fn):
                    f = line.split()
                    if len(f) >= 6:
                        per[int(f[4])] = per.get(int(f[4]), 0) + 1
            seconds = sorted(per)[1:-1]
            on = [per[x] for x in seconds if x % 2 == 1]
            off = [per[x] for x in seconds if x % 2 == 0]
            if not on or not off:
                raise SystemExit(f"bench: churn {kind}: no full seconds in {prefix}.*")
            return (sum(on) / len(on)) / (sum(off) / len(off)), done[0] / max(len(on_seconds), 1)

        runs = {"alone": [], "commit": [], "revoke": [], "rotate": []}
        alt = {"commit": [], "revoke": [], "rotate": []}
        kinds = list(runs)
        for r in range(args.rounds):
            # Each round starts with another kind, so that no kind always runs first.
            for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                runs[kind].append(run(kind, r))
                if kind in alt:
                    alt[kind].append(alternate(kind, r))
        settle()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    row = {"seconds": secs, "rate": rate, "rounds": args.rounds}
    for kind, xs in runs.items():
        row[f"{kind}_tps"] = med([x[0] for x in xs])
        row[f"{kind}_rate"] = med([x[1] for x in xs])
        row[f"{kind}_hit_share"] = med([x[2] for x in xs])
        row[f"{kind}_runs"] = [x[0] for x in xs]
        row[f"{kind}_admin_cpu"] = med([x[3] for x in xs])
        row[f"{kind}_admin_us"] = med([x[4] for x in xs])
    for kind in ("commit", "revoke", "rotate"):
        ratios = [x[0] / a[0] for x, a in zip(runs[kind], runs["alone"])]
        row[f"{kind}_ratios"] = ratios
        row[f"{kind}_kept"] = med(ratios)
        row[f"{kind}_alt_ratios"] = [x[0] for x in alt[kind]]
        row[f"{kind}_alt_kept"] = med([x[0] for x in alt[kind]])
        row[f"{kind}_alt_rate"] = med([x[1] for x in alt[kind]])
    with open(args.json, "w") as f:
        json.dump(row, f)
    print(f"bench: admin churn: hot set {row['alone_tps']:,.0f} tps alone, {row['commit_tps']:,.0f} beside "
          f"{row['commit_rate']:.0f} trivial commits/s ({row['commit_kept']:.0%}), {row['revoke_tps']:,.0f} beside "
          f"{row['revoke_rate']:.0f} revokes/s ({row['revoke_kept']:.0%}), {row['rotate_tps']:,.0f} beside "
          f"{row['rotate_rate']:.0f} rotations/s ({row['rotate_kept']:.0%}); alternating seconds: kept "
          f"{row['commit_alt_kept']:.0%} / {row['revoke_alt_kept']:.0%} / {row['rotate_alt_kept']:.0%}; cache hits "
          f"{row['alone_hit_share']:.2%} / {row['revoke_hit_share']:.2%} / {row['rotate_hit_share']:.2%}; admin backend "
          f"{row['revoke_admin_us']:.0f} us CPU per revoke, {row['rotate_admin_us']:.0f} per rotation")


def last_use(args):
    """What the event writer's last-use updates write: validate_uniform for --seconds (4 clients,
    as in the pgbench rows), then the WAL between the LSNs before the run and after the writer
    has applied everything it queued, per row it updated (rows whose last_used_at moved into the
    run; a token is updated at most once per 60 s interval, so once in a run), and the share of
    those updates that were HOT (no index entries written). Nothing else writes during the run,
    so all of that WAL is the writer's and the reads' pruning of what it left behind. With
    pg_walinspect (PostgreSQL 15+) the WAL records say how many updates were HOT and how much
    of the WAL was full-page images (the first change of each page after the CHECKPOINT that
    starts the run); else the table's statistics counters say it."""
    with connect(args, autocommit=True) as c:
        walinspect = c.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_walinspect'").fetchone()
        if walinspect:
            c.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")

        def counters():
            c.execute("SELECT pg_stat_clear_snapshot()")
            return c.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                             "WHERE relid = 'token.tokens'::regclass").fetchone()

        def queue():
            return c.execute("SELECT coalesce(sum(touches_written), 0)::bigint, coalesce(sum(touches_dropped), 0)::bigint "
                             "FROM token.worker_status()").fetchone()

        def writer_cpu():  # the writer's CPU time so far, by pid (it comes and goes with the work)
            pids = c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_token writer' "
                             "AND datname = current_database()").fetchall()
            return {pid: cpu_ns(pid) or 0 for (pid,) in pids}

        c.execute("SELECT token.flush_events('60 s')")
        c.execute("CHECKPOINT")
        stats0, queue0, cpu0 = counters(), queue(), writer_cpu()
        lsn0, started = c.execute("SELECT pg_current_wal_lsn(), clock_timestamp()").fetchone()
        log = f"{args.out}/last-use.log"
        subprocess.run([f"{args.pgbin}/pgbench", "-h", args.host, "-p", str(args.port), "-U", "postgres", "-n", "-M", "prepared",
                        "-c", "4", "-j", "2", "-T", str(args.seconds), "-D", f"ntokens={args.tokens}",
                        "-f", f"{args.scripts}/validate_uniform.pgbench", "bench"],
                       stdout=open(log, "w"), stderr=subprocess.STDOUT, check=True)
        c.execute("SELECT token.flush_events('60 s')")
        lsn1, ended = c.execute("SELECT pg_current_wal_lsn(), clock_timestamp()").fetchone()
        # Only writers still running are counted (under steady load the one writer never idles out).
        cpu1 = writer_cpu()
        writer_cpu_s = sum(t - cpu0.get(pid, 0) for pid, t in cpu1.items()) / 1e9 if cpu1 else None
        queue1 = queue()
        wal = int(c.execute("SELECT pg_wal_lsn_diff(%s, %s)", (lsn1, lsn0)).fetchone()[0])
        updates = c.execute("SELECT count(*) FROM token.tokens WHERE last_used_at BETWEEN %s AND %s",
                            (started, ended)).fetchone()[0]
        fpi_bytes = None
        if walinspect:
            # Per record type (an update that starts a new page is "Heap/UPDATE+INIT").
            # PostgreSQL 15 reads no further than the flushed WAL (the writer's last commit is).
            records = c.execute('SELECT "resource_manager/record_type", count, fpi_size FROM pg_get_wal_stats(%s, '
                                "LEAST(%s::pg_lsn, pg_current_wal_flush_lsn()), per_record => true)", (lsn0, lsn1)).fetchall()
            hot = sum(n for r, n, _ in records if r.startswith("Heap/HOT_UPDATE"))
            cold = sum(n for r, n, _ in records if r.startswith("Heap/UPDATE"))
            fpi_bytes = sum(fb for _, _, fb in records)
            with open(f"{args.out}/last-use-wal.txt", "w") as f:
                f.writelines(f"{r}\t{n}\t{fb}\n" for r, n, fb in sorted(records, key=lambda x: -x[1]))
        else:
            # The writer reports its statistics at most once a second and when it goes idle.
            deadline = time.monotonic() + 10
            while True:
                stats1 = counters()
                if stats1[0] - stats0[0] >= updates or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            hot, cold = stats1[1] - stats0[1], (stats1[0] - stats0[0]) - (stats1[1] - stats0[1])
    row = {
        "seconds": args.seconds, "tps": tps_of(log), "updates": updates, "wal_bytes": wal,
        "wal_per_update": wal / updates if updates else 0.0,
        "fpi_bytes": fpi_bytes,
        "wal_per_update_without_fpi": (wal - fpi_bytes) / updates if updates and fpi_bytes is not None else None,
        "hot": hot, "cold": cold, "hot_share": hot / (hot + cold) if hot + cold else 0.0,
        "touch_written": queue1[0] - queue0[0], "touch_dropped": queue1[1] - queue0[1], "writer_cpu_s": writer_cpu_s,
    }
    with open(args.json, "w") as f:
        json.dump(row, f)
    print(f"bench: last-use updates: {updates:,} in {args.seconds} s of validate_uniform ({row['tps']:,.0f} tps), "
          f"{row['wal_per_update']:,.0f} WAL bytes each, {row['hot_share']:.0%} HOT", flush=True)


def rate_accuracy(args):
    """4 sessions share one token limited to --limit per second for --seconds: acceptances per
    window (told apart by the rate_reset_at each accepted call returns), full windows only."""
    import threading
    with connect(args, autocommit=True) as c:
        c.execute("SELECT token.create_key_type('rate_bench') WHERE NOT EXISTS "
                  "(SELECT 1 FROM token.key_types WHERE name = 'rate_bench')")
        c.execute("SELECT token.register_prefix('ratebench_', 'rate_bench', current_setting('token.environment')) "
                  "WHERE NOT EXISTS (SELECT 1 FROM token.prefixes WHERE prefix = 'ratebench_')")
        token = c.execute("SELECT token FROM token.generate_token('rate-bench', 'rate_bench', rate_limits => %s)",
                          (f'{{"({args.limit},\\"1 second\\")"}}',)).fetchone()[0]
    per_window, refused, calls = {}, [0], [0]
    lock = threading.Lock()
    deadline = time.time() + args.seconds
    barrier = threading.Barrier(4)

    def run():
        local, local_refused, n = {}, 0, 0
        with connect(args, autocommit=True) as s:
            s.execute("SET token.last_used_interval = -1")
            barrier.wait()
            while time.time() < deadline:
                valid, reset = s.execute("SELECT valid, rate_reset_at FROM token.check_token(%s)", (token,)).fetchone()
                n += 1
                if valid:
                    local[reset] = local.get(reset, 0) + 1
                else:
                    local_refused += 1
        with lock:
            for k, v in local.items():
                per_window[k] = per_window.get(k, 0) + v
            refused[0] += local_refused
            calls[0] += n

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    windows = [per_window[k] for k in sorted(per_window)][1:-1]
    worst = max(abs(w - args.limit) / args.limit * 100 for w in windows) if windows else 100.0
    row = {"limit": args.limit, "seconds": args.seconds, "calls": calls[0], "refused": refused[0],
           "windows": len(windows), "min": min(windows, default=0), "max": max(windows, default=0), "worst_pct": worst}
    with open(args.json, "w") as f:
        json.dump(row, f)
    print(f"bench: rate limit {args.limit}/s shared by 4 sessions: {len(windows)} full windows, "
          f"{row['min']}..{row['max']} accepted per window ({worst:.2f}% off at worst), {calls[0] / args.seconds:,.0f} calls/s")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("load", "per-token", "check-suite"):
        a = sub.add_parser(name)
        a.add_argument("--host", required=True)
        a.add_argument("--port", type=int, required=True)
    sub.choices["load"].add_argument("--to", type=int, required=True)
    sub.choices["load"].add_argument("--timings", help="append to,seconds to this CSV")
    sub.choices["check-suite"].add_argument("--tokens", type=int, required=True)
    for opt, typ in (("--size", int), ("--lookups", int), ("--csv", str)):
        sub.choices["per-token"].add_argument(opt, type=typ, required=True)
    r = sub.add_parser("report")
    for opt in ("--pgbench", "--per-token", "--md", "--png", "--version"):
        r.add_argument(opt, required=True)
    for opt in ("--seconds", "--rounds", "--tokens", "--lookups", "--cache-bytes"):
        r.add_argument(opt, type=int, required=True)
    r.add_argument("--setting", action="append", default=[])
    r.add_argument("--steady-warm", type=int, default=0, help="seconds of uniform traffic before the steady-state rounds")
    r.add_argument("--flood", help="flood.json from `bench.py flood`")
    r.add_argument("--rate", help="rate.json from `bench.py rate-accuracy`")
    r.add_argument("--churn", help="churn.json from `bench.py churn`")
    r.add_argument("--huge-pages", default="off", help="on when the cluster ran in huge pages")
    r.add_argument("--shared-capacity", type=int, default=0, help="entries the shared cache holds")
    r.add_argument("--small-pages", help="per_token CSV of the largest size measured with 4 kB pages")
    r.add_argument("--loads", help="load.csv: size,seconds to grow the table to it")
    r.add_argument("--last-use", help="last_use.json from `bench.py last-use`")
    r.add_argument("--jwt-counts", help="JWTs made for the first-presentation rows: hs256=N,rs256=M")
    j = sub.add_parser("jwts")
    j.add_argument("--host", required=True)
    j.add_argument("--port", type=int, required=True)
    for opt in ("--hs256", "--rs256"):
        j.add_argument(opt, type=int, required=True)
    ra = sub.add_parser("rate-accuracy")
    ra.add_argument("--host", required=True)
    ra.add_argument("--port", type=int, required=True)
    ra.add_argument("--json", required=True)
    for opt in ("--seconds", "--limit"):
        ra.add_argument(opt, type=int, required=True)
    ch = sub.add_parser("churn")
    ch.add_argument("--host", required=True)
    ch.add_argument("--port", type=int, required=True)
    for opt in ("--pgbin", "--scripts", "--out", "--json"):
        ch.add_argument(opt, required=True)
    for opt in ("--seconds", "--rounds", "--rate"):
        ch.add_argument(opt, type=int, required=True)
    lu = sub.add_parser("last-use")
    lu.add_argument("--host", required=True)
    lu.add_argument("--port", type=int, required=True)
    for opt in ("--pgbin", "--scripts", "--out", "--json"):
        lu.add_argument(opt, required=True)
    for opt in ("--seconds", "--tokens"):
        lu.add_argument(opt, type=int, required=True)
    fl = sub.add_parser("flood")
    fl.add_argument("--host", required=True)
    fl.add_argument("--port", type=int, required=True)
    for opt in ("--pgbin", "--scripts", "--out", "--log", "--json"):
        fl.add_argument(opt, required=True)
    for opt in ("--seconds", "--rounds"):
        fl.add_argument(opt, type=int, required=True)
    r.add_argument("--date", help="the run's date (UTC) when re-rendering a report from its CSVs")
    args = p.parse_args()
    {"load": load, "per-token": per_token, "check-suite": check_suite, "report": report, "flood": flood,
     "rate-accuracy": rate_accuracy, "jwts": jwts, "churn": churn, "last-use": last_use}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
