"""Model-checked mixed load (issue 16): validators and administrators race on one database for
MODEL_SECONDS; every call is recorded with its start and end, and tests/model/checker.py
replays the history and reports every verdict no ordering consistent with those times allows.

  validators  MODEL_VALIDATORS connections (16) as a token_validator role, each calling
              check_token (70%) or validate_token (30%), a quarter of them with a
              required_scope, on a pool of the run's opaque tokens and legacy HS256 JWTs
              (mostly the 200 newest, so recent changes are raced). Every other validator
              logs in as a role whose token.cache_size is 0, so its answers come from the
              cache all backends share (token.shared_cache_size) or the table: both caches
              are raced.
  admins      MODEL_ADMINS connections (4) as a token_admin role, MODEL_RATE operations a second
              in all (100): generate_token (some expiring within seconds), rotate_token with a
              grace of 0 to 30 s, revoke_token, disable_token, enable_token, update_token
              (scopes, and sometimes an expiry a few seconds ahead), revoke_legacy_jwt; and
              minting JWTs (no database call, not counted as an operation). Each admin owns the
              tokens and JWTs it made, so one subject's changes are sequential. Every operation
              is one transaction that reads the subject's row back before COMMIT: that row is
              the state the model applies; the admin also checks that the row says what the
              operation promised (an `admin_effect` anomaly if not).

Left out of the model, so not exercised here: usage caps and rate limits (their verdicts
depend on the order of concurrent acceptances), derived tokens, caller tokens, networks,
reuse detection (a write the event writer makes, not an admin), revoke_account_tokens,
prefix and key-type changes, issuer changes (cut-off, key). Half the JWTs expire within 2 to
12 s; the database's token.jwt_leeway is 0 so they do so at their exp.

Connection: PGT_HOST, PGT_PORT, PGT_SOCKET (the superuser's unix socket), PGT_RUN (the history
and anomalies go there), PGT_TOKENS (every token issued, for tests/leakcheck.py). The
history holds token ids and hints, never a token. Exit status 1 on any anomaly or unexpected
error.
"""

import datetime
import json
import os
import pathlib
import random
import re
import secrets
import sys
import threading
import time
import traceback
import uuid

import jwt as pyjwt
import psycopg

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from checker import check  # noqa: E402

DB = "pgt_model"
PASSWORD = "model-password"
ISSUER = "model_v1"
ISS = "https://model.example"
SCOPES = ["read", "write", "admin"]
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)

SECONDS = float(os.environ.get("MODEL_SECONDS", "60"))
VALIDATORS = int(os.environ.get("MODEL_VALIDATORS", "16"))
ADMINS = int(os.environ.get("MODEL_ADMINS", "4"))
RATE = float(os.environ.get("MODEL_RATE", "100"))
HOST, PORT, SOCKET = os.environ["PGT_HOST"], int(os.environ["PGT_PORT"]), os.environ["PGT_SOCKET"]
RUN = pathlib.Path(os.environ["PGT_RUN"])
TOKENS = pathlib.Path(os.environ["PGT_TOKENS"])


def now_us():
    return time.time_ns() // 1000  # CLOCK_REALTIME, the clock the server judges by


def us(ts):
    return None if ts is None else (ts - EPOCH) // datetime.timedelta(microseconds=1)


history = []          # list.append is atomic: every thread appends here
pool = []             # (key, secret) of every subject whose creation has ended
pool_lock = threading.Lock()
leak_lock = threading.Lock()
admin_errors = []     # unexpected errors of admin operations
expected_refusals = {}
stop_at = 0.0


def record_secret(secret):
    """Every token for tests/leakcheck.py, as tests/e2e/conftest.py records them (a JWT by a
    22-character fingerprint of its signature when its own characters [-28:-6] do not fit)."""
    if secret.startswith("eyJ") and not re.fullmatch(r"[0-9A-Za-z]{22}", secret[-28:-6]):
        runs = re.findall(r"[0-9A-Za-z]{22,}", secret.split(".")[2]) or re.findall(r"[0-9A-Za-z]{22,}", secret.split(".")[1])
        if not runs:
            return
        secret = runs[-1][-22:] + "jwtfp0"
    with leak_lock, open(TOKENS, "a") as f:
        f.write(secret + "\n")


def setup():
    with psycopg.connect(host=SOCKET, port=PORT, user="postgres", dbname="postgres", autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {DB}")
    secret = secrets.token_urlsafe(40)
    with psycopg.connect(host=SOCKET, port=PORT, user="postgres", dbname=DB, autocommit=True) as c:
        c.execute("CREATE EXTENSION pg_token")
        c.execute("SELECT token.create_key_type('model', allowed_scopes => '{read,write,admin}', max_ttl => '90 days')")
        c.execute("SELECT token.register_prefix('mdl-', 'model', current_setting('token.environment'))")
        c.execute("SELECT token.register_legacy_issuer(%s, '{HS256}', %s, 'model', current_setting('token.environment'), "
                  "'2099-01-01 00:00+00', issuer => %s)", (ISSUER, secret, ISS))
        # No leeway, so the run's short-lived JWTs expire within it, at exp exactly.
        c.execute(f"ALTER DATABASE {DB} SET token.jwt_leeway = 0")
        for role, group in (("model_admin", "token_admin"), ("model_app", "token_validator"),
                            ("model_app_shared", "token_validator")):
            if c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                c.execute(f"DROP OWNED BY {role} CASCADE")
                c.execute(f"DROP ROLE {role}")
            c.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
            c.execute(f"GRANT {group} TO {role}")
        c.execute("ALTER ROLE model_app_shared SET token.cache_size = 0")
        shared = c.execute("SELECT hits_total, fills_total FROM token.shared_cache_stats()").fetchone()
    with connect("model_app") as c:
        leeway = int(re.match(r"\d+", c.execute("SHOW token.jwt_leeway").fetchone()[0]).group())
    return secret, leeway, shared


def connect(role, **kw):
    # Bounded: a call that hangs fails (57014, an unexpected error) instead of stalling the run.
    return psycopg.connect(host=HOST, port=PORT, user=role, password=PASSWORD, dbname=DB, connect_timeout=10,
                           options="-c statement_timeout=30s", application_name="pg_token-model", **kw)


READBACK = ("SELECT id, hint, account, key_type, scopes, expires_at, revoke_after, revoked_at, disabled_at, "
            "family_revoked_at FROM token.token_list WHERE id = ANY(%s)")


def row_state(r):
    return {"kind": "opaque", "token_id": str(r[0]), "hint": r[1], "account": r[2], "key_type": r[3],
            "scopes": sorted(r[4] or []), "expires_at": us(r[5]), "revoke_after": us(r[6]),
            "revoked_at": us(r[7]), "disabled_at": us(r[8]), "family_revoked_at": us(r[9])}


class Admin:
    def __init__(self, n, jwt_secret, leeway):
        self.n, self.jwt_secret, self.leeway = n, jwt_secret, leeway
        self.rng = random.Random(n)
        self.mine = {}  # key -> {"seq", "state"}
        self.ops = 0

    def commit_op(self, name, fn):
        """Runs fn(cur) in one transaction; returns (result, states by id, start, end) or None."""
        conn = self.conn
        start = now_us()
        try:
            with conn.cursor() as cur:
                result, ids = fn(cur)
                states = {str(r[0]): row_state(r) for r in cur.execute(READBACK, (ids,)).fetchall()}
            conn.commit()
        except psycopg.Error as e:
            conn.rollback()
            return e, start, now_us()
        self.ops += 1
        return (result, states), start, now_us()

    def log(self, key, name, start, end, state):
        ent = self.mine.setdefault(key, {"seq": -1})
        ent["seq"] += 1
        ent["state"] = state
        history.append({"t": "op", "key": key, "seq": ent["seq"], "op": name, "start": start, "end": end, "state": state})

    def effect(self, name, key, why):
        admin_errors.append({"kind": "admin_effect", "op": name, "key": key, "why": why})

    def failed(self, name, key, err, start, end):
        st = self.mine.get(key, {}).get("state") or {}
        late = [t for t in (st.get("expires_at"), st.get("revoke_after")) if t is not None and t <= end]
        if err.sqlstate == "55000" and late:
            expected_refusals[err.sqlstate] = expected_refusals.get(err.sqlstate, 0) + 1
        else:
            admin_errors.append({"kind": "admin_error", "op": name, "key": key, "sqlstate": err.sqlstate,
                                 "message": str(err).splitlines()[0], "start": start, "end": end})

    def live(self, pred):
        soon = now_us() + 3_000_000
        keys = [k for k, e in self.mine.items() if not k.startswith("jwt:") and e["state"]["revoked_at"] is None
                and e["state"]["revoke_after"] is None and (e["state"]["expires_at"] or soon + 1) > soon and pred(e["state"])]
        return self.rng.choice(keys) if keys else None

    def generate(self):
        scopes = sorted(self.rng.sample(SCOPES, self.rng.randint(0, 3)))
        ttl = self.rng.choice([None, None, None, "4 seconds", "8 seconds", "20 seconds"])
        account = f"acct-{self.n}-{self.rng.randint(0, 6)}"
        out, start, end = self.commit_op("generate", lambda cur: self._gen(cur, account, scopes, ttl))
        if isinstance(out, psycopg.Error):
            return self.failed("generate", None, out, start, end)
        (tid, tok), states = out
        record_secret(tok)
        st = states[tid]
        if st["scopes"] != scopes or st["revoked_at"] or st["account"] != account:
            self.effect("generate", tid, f"row {st} after generate_token(scopes => {scopes})")
        self.log(tid, "generate", start, end, st)
        with pool_lock:
            pool.append((tid, tok))

    def _gen(self, cur, account, scopes, ttl):
        tid, tok = cur.execute("SELECT token_id, token FROM token.generate_token(%s, 'model', scopes => %s, "
                               "expires_in => %s::interval)", (account, scopes, ttl)).fetchone()
        return (str(tid), tok), [tid]

    def rotate(self):
        key = self.live(lambda s: s["disabled_at"] is None)
        if key is None:
            return self.generate()
        grace = self.rng.choice(["0", "500 milliseconds", "2 seconds", "5 seconds", "30 seconds"])

        def go(cur):
            nid, tok = cur.execute("SELECT token_id, token FROM token.rotate_token(%s, grace => %s::interval)",
                                   (key, grace)).fetchone()
            return (str(nid), tok), [uuid.UUID(key), nid]
        out, start, end = self.commit_op("rotate", go)
        if isinstance(out, psycopg.Error):
            return self.failed("rotate", key, out, start, end)
        (nid, tok), states = out
        record_secret(tok)
        old, new = states[key], states[nid]
        # The grace counts from the rotation: revoke_after less the grace is an instant of the
        # rotating transaction (rotate.rs takes clock_timestamp()), within the call's window.
        grace_us = {"0": 0, "500 milliseconds": 500_000, "2 seconds": 2_000_000, "5 seconds": 5_000_000,
                    "30 seconds": 30_000_000}[grace]
        since = None if old["revoke_after"] is None else old["revoke_after"] - grace_us
        if since is None or not start <= since <= end or new["account"] != old["account"] or new["scopes"] != old["scopes"]:
            self.effect("rotate", key, f"old revoke_after {old['revoke_after']} - grace {grace} outside [{start}, {end}], new {new}")
        self.log(key, "rotate", start, end, old)
        self.log(nid, "rotate_successor", start, end, new)
        with pool_lock:
            pool.append((nid, tok))

    def simple(self, name, sql, args, key, check_fn):
        out, start, end = self.commit_op(name, lambda cur: (cur.execute(sql, args).fetchone()[0], [uuid.UUID(key)]))
        if isinstance(out, psycopg.Error):
            return self.failed(name, key, out, start, end)
        result, states = out
        st = states[key]
        why = check_fn(result, st)
        if why:
            self.effect(name, key, why)
        self.log(key, name, start, end, st)

    def revoke(self):
        key = self.rng.choice([k for k, e in self.mine.items() if not k.startswith("jwt:") and e["state"]["revoked_at"] is None] or [None])
        if key is None:
            return self.generate()
        self.simple("revoke", "SELECT token.revoke_token(%s, 'model check')", (key,), key,
                    lambda r, s: None if r is True and s["revoked_at"] else f"returned {r}, revoked_at {s['revoked_at']}")

    def disable(self):
        key = self.live(lambda s: s["disabled_at"] is None)
        if key is None:
            return self.generate()
        self.simple("disable", "SELECT token.disable_token(%s, 'model check')", (key,), key,
                    lambda r, s: None if r is True and s["disabled_at"] else f"returned {r}, disabled_at {s['disabled_at']}")

    def enable(self):
        key = self.live(lambda s: s["disabled_at"] is not None)
        if key is None:
            return self.disable()
        self.simple("enable", "SELECT token.enable_token(%s)", (key,), key,
                    lambda r, s: None if r is True and s["disabled_at"] is None else f"returned {r}, disabled_at {s['disabled_at']}")

    def update(self):
        key = self.live(lambda s: s["disabled_at"] is None)
        if key is None:
            return self.generate()
        scopes = sorted(self.rng.sample(SCOPES, self.rng.randint(0, 3)))
        ahead = self.rng.choice([None, None, "5 seconds", "15 seconds"])
        sql = ("SELECT token.update_token(%s, scopes => %s, expires_at => clock_timestamp() + %s::interval) IS NULL")
        self.simple("update", sql, (key, scopes, ahead), key,
                    lambda r, s: None if s["scopes"] == scopes else f"scopes {s['scopes']}, asked {scopes}")

    def mint_jwt(self):
        jti = f"{self.n}-{uuid.uuid4()}"
        account = f"acct-{self.n}-{self.rng.randint(0, 6)}"
        scopes = sorted(self.rng.sample(SCOPES, self.rng.randint(1, 3)))
        t = int(time.time())
        exp = t + self.rng.choice([600, self.rng.randint(2, 12)])
        start = now_us()
        tok = pyjwt.encode({"sub": account, "iss": ISS, "exp": exp, "iat": t, "jti": jti, "scope": " ".join(scopes)},
                           self.jwt_secret, algorithm="HS256")
        record_secret(tok)
        key = "jwt:" + jti
        self.log(key, "mint", start, now_us(), {"kind": "jwt", "hint": "jti:" + jti[:10], "account": account, "key_type": "model",
                                                "scopes": scopes, "exp": exp * 1_000_000, "leeway": self.leeway * 1_000_000,
                                                "revoked": False, "revoke_after": None})
        with pool_lock:
            pool.append((key, tok))

    def revoke_jwt(self):
        keys = [k for k, e in self.mine.items() if k.startswith("jwt:") and not e["state"]["revoked"]]
        if not keys:
            return self.mint_jwt()
        key = self.rng.choice(keys)
        out, start, end = self.commit_op("revoke_legacy_jwt", lambda cur: (
            cur.execute("SELECT token.revoke_legacy_jwt(%s, %s, 'model check')", (ISSUER, key[4:])).fetchone()[0], []))
        if isinstance(out, psycopg.Error):
            return self.failed("revoke_legacy_jwt", key, out, start, end)
        if out[0] is not True:
            self.effect("revoke_legacy_jwt", key, f"returned {out[0]}")
        self.log(key, "revoke_legacy_jwt", start, end, dict(self.mine[key]["state"], revoked=True))

    def run(self):
        ops = [(self.generate, 18), (self.rotate, 15), (self.revoke, 10), (self.disable, 12), (self.enable, 10),
               (self.update, 20), (self.revoke_jwt, 5), (self.mint_jwt, 6)]
        fns, weights = zip(*ops)
        interval = ADMINS / RATE
        try:
            with connect("model_admin") as self.conn:
                for _ in range(3):
                    self.mint_jwt()
                nxt = time.time()
                while time.time() < stop_at:
                    live = sum(1 for k, e in self.mine.items() if not k.startswith("jwt:") and e["state"]["revoked_at"] is None)
                    fn = self.generate if live < 8 else self.rng.choices(fns, weights)[0]
                    fn()
                    if fn == self.mint_jwt:
                        continue  # no database call: not one of the MODEL_RATE operations
                    nxt += interval
                    time.sleep(max(0.0, nxt - time.time()))
        except Exception:
            admin_errors.append({"kind": "admin_crash", "trace": traceback.format_exc()})


CHECK = ("SELECT v.valid, v.reason, v.token_id, v.account, v.key_type, v.scopes, v.expires_at, v.revoke_after, "
         "clock_timestamp() FROM token.check_token(%s, NULL, %s) v")
VALIDATE = ("SELECT true, NULL, v.token_id, v.account, v.key_type, v.scopes, v.expires_at, v.revoke_after, "
            "clock_timestamp() FROM token.validate_token(%s, NULL, %s) v")


def validator(n):
    rng = random.Random(1000 + n)
    try:
        with connect("model_app_shared" if n % 2 else "model_app", autocommit=True) as conn:
            try:
                conn.execute("SET token.legacy_notice = off")
            except psycopg.Error:
                pass
            while time.time() < stop_at:
                with pool_lock:
                    if not pool:
                        key = None
                    else:
                        recent = pool[-200:]
                        key, tok = rng.choice(recent if rng.random() < 0.7 else pool)
                if key is None:
                    time.sleep(0.01)
                    continue
                fn = "check" if rng.random() < 0.7 else "validate"
                scope = rng.choice(SCOPES) if rng.random() < 0.25 else None
                start = now_us()
                try:
                    r = conn.execute(CHECK if fn == "check" else VALIDATE, (tok, scope)).fetchone()
                    end = now_us()
                    res = {"valid": r[0], "reason": r[1], "token_id": None if r[2] is None else str(r[2]), "account": r[3],
                           "key_type": r[4], "scopes": r[5], "expires_at": us(r[6]), "revoke_after": us(r[7]),
                           "server_ts": us(r[8])}
                except psycopg.Error as e:
                    end = now_us()
                    m = re.match(r"token rejected: (\w+)", str(e))
                    if e.sqlstate == "28000" and fn == "validate" and m:
                        res = {"valid": False, "reason": m.group(1)}
                    else:
                        res = {"error": {"sqlstate": e.sqlstate, "message": str(e).splitlines()[0]}}
                history.append({"t": "v", "key": key, "fn": fn, "scope": scope, "start": start, "end": end, "result": res})
    except Exception:
        history.append({"t": "v", "key": "?", "fn": "crash", "scope": None, "start": 0, "end": 0,
                        "result": {"error": {"sqlstate": None, "message": traceback.format_exc()}}})


def main():
    global stop_at
    secret, leeway, shared_before = setup()
    print(f"[model] {SECONDS:g} s, {VALIDATORS} validators, {ADMINS} admins at {RATE:g} ops/s in all, "
          f"jwt_leeway {leeway} s, database {DB} on {HOST}:{PORT}", flush=True)
    stop_at = time.time() + SECONDS
    admins = [Admin(i, secret, leeway) for i in range(ADMINS)]
    threads = [threading.Thread(target=a.run) for a in admins]
    threads += [threading.Thread(target=validator, args=(i,)) for i in range(VALIDATORS)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.time() - t0
    path = RUN / "model-history.jsonl"
    with open(path, "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    summary, anomalies = check(history)
    anomalies = admin_errors + anomalies
    admin_ops = sum(a.ops for a in admins)
    print(f"[model] ran {took:.1f} s: {admin_ops} admin operations ({admin_ops / took:.0f}/s), "
          f"{summary['validations']} validations ({summary['validations'] / took:.0f}/s) of {summary['subjects']} tokens and JWTs")
    print(f"[model] verdicts: {summary['accepted']} accepted, refused {json.dumps(summary['refused'], sort_keys=True)}; "
          f"{summary['ambiguous']} with more than one allowed verdict (racing a change or a deadline)")
    print(f"[model] calls: {json.dumps(summary['by_call'], sort_keys=True)}")
    print(f"[model] expected admin refusals (55000 on a token expiring or past its grace meanwhile): "
          f"{sum(expected_refusals.values())}")
    with psycopg.connect(host=SOCKET, port=PORT, user="postgres", dbname=DB, autocommit=True) as c:
        hits, fills = (a - b for a, b in zip(c.execute("SELECT hits_total, fills_total FROM token.shared_cache_stats()").fetchone(),
                                            shared_before))
    print(f"[model] shared cache: {hits} hits, {fills} rows added")
    if VALIDATORS > 1 and (hits == 0 or fills == 0):
        anomalies.append({"kind": "unexpected_error", "what": "the shared cache was never used: the run did not race it"})
    errors = [a for a in anomalies if a["kind"] in ("unexpected_error", "admin_error", "admin_crash")]
    print(f"[model] anomalies: {len(anomalies) - len(errors)}, unexpected errors: {len(errors)}")
    if anomalies:
        out = RUN / "model-anomalies.json"
        out.write_text(json.dumps(anomalies, indent=1, default=str))
        for a in anomalies[:20]:
            print("  " + json.dumps(a, default=str))
        print(f"[model] all of them in {out}; the history (token ids and hints, no token) in {path}")
        return 1
    path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
