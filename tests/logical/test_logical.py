"""Logical replication between two real clusters: the publisher issues and revokes, the
subscriber validates, and a subscriber session whose cache already holds a token refuses it
once the change is applied.

The two clusters are started here with scripts/cluster.sh (PGBIN picks the server) under
$PGT_RUN/logical (tests/logical/run.sh sets it) and stopped at the end. The publisher runs
with wal_level = logical; the subscriber installs the extension, then subscribes to the
publication the README recommends (`PUBLICATION` below). Every application session connects
over TCP with SCRAM as a token_validator role; the administration goes over the unix socket.

The lag printed for each change is measured from the return of the publisher's COMMIT to the
first refusal seen by the subscriber session polling check_token; it is reported, never
asserted (the bound is only the poll's timeout).
"""

import importlib.util
import os
import pathlib
import secrets
import subprocess
import threading
import time

import jwt as pyjwt
import psycopg
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts" / "cluster.sh"
DB = "pgt_logical"
ROLE = "lr_app"
PASSWORD = "lr-password"
TIMEOUT = 30.0  # seconds a replicated change may take to be applied before the test fails

# What the README recommends: every table whose rows decide verdicts, tokens without
# last_used_at (each cluster writes its own). Never token.events (each cluster's own audit
# trail, with its own id sequence).
TOKEN_COLUMNS = ("id, token_hash, hint, prefix, account, key_type, environment, name, scopes, metadata, "
                 "created_at, expires_at, revoke_after, revoked_at, revoked_reason, rotated_from, family_id, "
                 "family_issued_at, disabled_at, disabled_reason, parent_id, allowed_networks, rate_limits, "
                 "uses_remaining, uses_version, refill_uses, refill_interval, refilled_at, family_revoked_at")


def publication(server_version_num):
    # Column lists exist from PostgreSQL 15 on; 14 publishes last_used_at too (README).
    tokens = f"token.tokens ({TOKEN_COLUMNS})" if server_version_num >= 150000 else "token.tokens"
    return (f"CREATE PUBLICATION pg_token FOR TABLE token.key_types, token.prefixes, {tokens}, "
            "token.legacy_issuers, token.legacy_issuer_keys, token.legacy_revocations, token.legacy_exchanges")


def e2e_conftest():
    spec = importlib.util.spec_from_file_location("e2e_conftest", ROOT / "tests" / "e2e" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Cluster:
    def __init__(self, run, name, conf):
        self.data = run / name
        self.port = subprocess.run(["bash", str(CLUSTER), "free-port"], check=True, capture_output=True,
                                   text=True).stdout.strip()
        subprocess.run(["bash", str(CLUSTER), "start", str(self.data), self.port, "log_statement = 'all'",
                        "token.last_used_interval = 1", *conf], check=True)

    def su(self, dbname=DB):
        return psycopg.connect(host=str(self.data), port=self.port, user="postgres", dbname=dbname, autocommit=True)

    def app(self):
        return psycopg.connect(host="127.0.0.1", port=self.port, user=ROLE, password=PASSWORD, dbname=DB,
                               autocommit=True, application_name="pg_token-logical")

    def stop(self):
        subprocess.run(["bash", str(CLUSTER), "stop", str(self.data)], check=False)


@pytest.fixture(scope="module")
def pair():
    run = pathlib.Path(os.environ["PGT_RUN"]) / "logical"
    run.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "postgres:postgres", str(run)], check=True)
    env = e2e_conftest().Env("127.0.0.1", 0, "", str(run), str(run), os.environ["PGT_TOKENS"])
    pub = Cluster(run, "publisher", ["wal_level = logical"])
    sub = None
    try:
        sub = Cluster(run, "subscriber", [])
        for c in (pub, sub):
            with c.su("postgres") as s:
                s.execute(f"CREATE DATABASE {DB}")
                s.execute(f"DROP ROLE IF EXISTS {ROLE}")
                s.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
            with c.su() as s:
                s.execute("CREATE EXTENSION pg_token")
                s.execute(f"GRANT token_validator TO {ROLE}")
        with pub.su() as p:
            p.execute("SELECT token.create_key_type('agent', allowed_scopes => '{read,write}')")
            p.execute("SELECT token.create_key_type('boss', can_validate => '{agent}')")
            p.execute("SELECT token.register_prefix('lr-', 'agent', 'dev')")
            p.execute("SELECT token.register_prefix('lrboss_', 'boss', 'dev')")
            p.execute(publication(p.info.server_version))
        with sub.su() as s:
            s.execute(f"CREATE SUBSCRIPTION pg_token CONNECTION 'host={pub.data} port={pub.port} user=postgres "
                      f"dbname={DB}' PUBLICATION pg_token")
            deadline = time.monotonic() + TIMEOUT
            while s.execute("SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'").fetchone()[0]:
                assert time.monotonic() < deadline, "the initial copy did not finish"
                time.sleep(0.05)
        yield env, pub, sub
        with sub.su() as s:
            s.execute("DROP SUBSCRIPTION pg_token")
    finally:
        if sub:
            sub.stop()
        pub.stop()


def generate(env, conn, account, key_type="agent"):
    row = conn.execute("SELECT token_id, token FROM token.generate_token(%s, %s, scopes => %s)",
                       (account, key_type, ["read", "write"] if key_type == "agent" else [])).fetchone()
    env.record(row[1])
    return row[0], row[1]


def reason_of(conn, token, caller=None, scope=None):
    row = conn.execute("SELECT valid, reason FROM token.check_token(%s, %s, %s)", (token, caller, scope)).fetchone()
    return None if row[0] else row[1]


def hits_and_misses(conn):
    return conn.execute("SELECT hits, misses FROM token.cache_stats()").fetchone()


def until_valid(conn, token, caller=None):
    """Polls until the subscriber has the token (the publisher's insert was applied)."""
    deadline = time.monotonic() + TIMEOUT
    while reason_of(conn, token, caller) is not None:
        assert time.monotonic() < deadline, "the token never reached the subscriber"
        time.sleep(0.01)


def warm(conn, token, caller=None, counted=True):
    """The session's next answer for this token comes from its cache: hits only. A verified
    legacy JWT is kept in a cache of its own, which cache_stats() does not count (counted =
    False): then it is validated twice and not checked."""
    until_valid(conn, token, caller)
    hits, misses = hits_and_misses(conn)
    assert reason_of(conn, token, caller) is None
    if not counted:
        return
    presented = 1 if caller is None else 2
    assert hits_and_misses(conn) == (hits + presented, misses), "answered from the subscriber session's cache"


def refused_after(conn, committed, token, reason, caller=None):
    """Polls the same session until it refuses with `reason`; returns the lag in ms from the
    publisher's commit. Any other answer than valid or `reason` fails at once."""
    while True:
        got = reason_of(conn, token, caller)
        if got == reason:
            return (time.monotonic() - committed) * 1000
        assert got is None, f"refused as {got}, not {reason}"
        assert time.monotonic() - committed < TIMEOUT, f"still valid {TIMEOUT} s after the publisher's commit"
        time.sleep(0.001)


def report(what, ms):
    print(f"\n[logical] {what}: refused on the subscriber {ms:.1f} ms after the publisher's commit")


def test_revoke_is_refused_by_a_session_that_cached_the_token(pair):
    env, pub, sub = pair
    with pub.su() as p, sub.app() as s:
        token_id, token = generate(env, p, "acme")
        _, other = generate(env, p, "acme")
        warm(s, token)
        warm(s, other)
        p.execute("SELECT token.revoke_token(%s)", (token_id,))
        report("revoke", refused_after(s, time.monotonic(), token, "revoked"))
        # The apply worker named only the revoked token in the subscriber's change log: the
        # session's other cached token is still a hit.
        hits, misses = hits_and_misses(s)
        assert reason_of(s, other) is None
        assert hits_and_misses(s) == (hits + 1, misses), "the other token stayed in the subscriber session's cache"
        # A session that never saw the token agrees.
        with sub.app() as fresh:
            assert reason_of(fresh, token) == "revoked"


def test_disable_is_refused_and_enable_accepted_again(pair):
    env, pub, sub = pair
    with pub.su() as p, sub.app() as s:
        token_id, token = generate(env, p, "acme")
        warm(s, token)
        p.execute("SELECT token.disable_token(%s)", (token_id,))
        report("disable", refused_after(s, time.monotonic(), token, "disabled"))
        p.execute("SELECT token.enable_token(%s)", (token_id,))
        until_valid(s, token)


def test_key_type_change_is_seen(pair):
    env, pub, sub = pair
    with pub.su() as p, sub.app() as s:
        _, agent = generate(env, p, "acme")
        _, boss = generate(env, p, "acme", key_type="boss")
        warm(s, agent, caller=boss)
        p.execute("SELECT token.create_key_type('boss', can_validate => '{}', replace => true)")
        report("key type change", refused_after(s, time.monotonic(), agent, "caller_not_permitted", caller=boss))


def test_legacy_issuer_cut_off_is_seen(pair):
    env, pub, sub = pair
    name, key = f"lr_{secrets.token_hex(3)}", "s3cret-" + secrets.token_hex(20)
    now = int(time.time())
    jwt = env.record_jwt(pyjwt.encode({"sub": "acme", "iss": name, "iat": now, "exp": now + 600, "jti": "j1"},
                                      key, algorithm="HS256"))
    with pub.su() as p, sub.app() as s:
        p.execute("SELECT token.register_legacy_issuer(%s, '{HS256}', %s, 'agent', 'dev', now() + interval '1 day', "
                  "issuer => %s)", (name, key, name))
        warm(s, jwt, counted=False)
        p.execute("SELECT token.alter_legacy_issuer(%s, cutoff_at => now())", (name,))
        report("legacy issuer cut-off", refused_after(s, time.monotonic(), jwt, "legacy_token_retired"))


def stream_validations(pub, tokens, stop):
    """Validates every token on the publisher over and over: its event writer then writes each
    token's last_used_at once a second (token.last_used_interval = 1), and every one of those
    updates is replicated."""
    with pub.app() as c:
        while not stop.is_set():
            for t in tokens:
                c.execute("SELECT valid FROM token.check_token(%s)", (t,))


def updates_applied(sub):
    with sub.su() as s:
        s.execute("SELECT pg_stat_clear_snapshot()")
        return s.execute("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'token.tokens'::regclass").fetchone()[0]


def test_cache_stays_warm_under_replicated_last_use_updates(pair):
    """The subscriber session cycles over 50 cached tokens while the publisher's last uses of
    200 others are replicated: a single emptying of its cache would cost 50 misses."""
    env, pub, sub = pair
    seconds = 5
    with pub.su() as p:
        streamed = [generate(env, p, f"stream{i}")[1] for i in range(200)]
        mine = [generate(env, p, f"local{i}")[1] for i in range(50)]
    with sub.app() as s:
        until_valid(s, streamed[-1])
        for t in mine:
            warm(s, t)
        applied_before = updates_applied(sub)
        stop = threading.Event()
        streamer = threading.Thread(target=stream_validations, args=(pub, streamed, stop))
        hits0, misses0 = hits_and_misses(s)
        streamer.start()
        calls, started = 0, time.monotonic()
        try:
            while time.monotonic() - started < seconds:
                for t in mine:
                    assert reason_of(s, t) is None
                calls += len(mine)
        finally:
            stop.set()
            streamer.join()
        hits, misses = hits_and_misses(s)
        hits, misses = hits - hits0, misses - misses0
    with pub.su() as p:
        p.execute("SELECT token.flush_events()")
    # Every streamed token's last use was written at least once on the publisher; poll (the
    # apply worker reports its statistics at most once a second) until the subscriber applied
    # at least that many updates.
    deadline, applied = time.monotonic() + TIMEOUT, 0
    while applied < len(streamed):
        assert time.monotonic() < deadline, f"only {applied} replicated updates applied"
        time.sleep(0.2)
        applied = updates_applied(sub) - applied_before
    print(f"\n[logical] {seconds} s of {len(streamed)} tokens validated on the publisher: {applied} replicated "
          f"last-use updates applied; the subscriber session made {calls} validations of {len(mine)} tokens: "
          f"{hits} hits, {misses} misses ({100 * hits / max(hits + misses, 1):.2f}% hits)")
    assert calls >= 10 * len(mine), "the subscriber session hardly validated"
    assert hits + misses == calls
    assert misses < len(mine), "replicated last-use updates emptied the subscriber's cache"


def test_last_use_is_local_and_nothing_fights_the_apply_worker(pair):
    """The subscriber writes its own last_used_at (left out of the publication) and its own
    events; neither stops the apply worker, and the publisher's last uses do not arrive."""
    env, pub, sub = pair
    with pub.su() as p:
        token_id, token = generate(env, p, "acme")
        p.execute("SELECT valid FROM token.check_token(%s)", (token,))
        p.execute("SELECT token.flush_events()")
        assert p.execute("SELECT last_used_at IS NOT NULL FROM token.tokens WHERE id = %s", (token_id,)).fetchone()[0]
    with sub.app() as s:
        until_valid(s, token)
        assert reason_of(s, "lr-" + "x" * 40) is not None  # a refusal event, written on the subscriber
    with sub.su() as s:
        s.execute("SELECT token.flush_events()")
        local = s.execute("SELECT last_used_at FROM token.tokens WHERE id = %s", (token_id,)).fetchone()[0]
        assert local is not None, "the subscriber wrote its own last use"
        assert s.execute("SELECT count(*) FROM token.events WHERE event = 'refused'").fetchone()[0] >= 1
        # Another change to the row on the publisher is applied and keeps the subscriber's last use.
        with pub.su() as p:
            p.execute("SELECT token.disable_token(%s)", (token_id,))
        deadline = time.monotonic() + TIMEOUT
        while s.execute("SELECT disabled_at IS NULL FROM token.tokens WHERE id = %s", (token_id,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the disable was never applied"
            time.sleep(0.01)
        if s.info.server_version >= 150000:
            kept = s.execute("SELECT last_used_at FROM token.tokens WHERE id = %s", (token_id,)).fetchone()[0]
            assert kept == local, "last_used_at is the subscriber's own (not in the publication)"
            errors = s.execute("SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats "
                               "WHERE subname = 'pg_token'").fetchone()
            assert errors == (0, 0), errors
        assert s.execute("SELECT pid IS NOT NULL FROM pg_stat_subscription WHERE subname = 'pg_token' "
                         "AND relid IS NULL").fetchone()[0], "the apply worker is running"


def test_a_change_made_locally_as_a_replica_is_still_seen(pair):
    """session_replication_role = replica in an ordinary session (a data-only restore): the
    statement triggers and the replica row triggers both fire; one invalidation is enough."""
    env, pub, sub = pair
    with pub.su() as p, sub.app() as s:
        token_id, token = generate(env, p, "acme")
        warm(s, token)
        with sub.su() as r:
            r.execute("SET session_replication_role = replica")
            r.execute("UPDATE token.tokens SET revoked_at = now() WHERE id = %s", (token_id,))
        assert reason_of(s, token) == "revoked"
