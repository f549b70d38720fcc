"""The whole lifecycle over TCP, as an admin role and an application role would run it."""

import re
import threading
import time

import psycopg
import pytest

from conftest import flush, generate, reason_of, refusal

SHAPE = re.compile(r"^e2e-[0-9A-Za-z]{22}[0-9A-Za-z]{6}$")


def test_generate_validate_rotate_revoke(db, admin, app):
    token_id, token = generate(admin, db, "acme", scopes=["read"], name="ci", expires_in="30 days")
    assert SHAPE.match(token), "prefix + 22 base62 body + 6 base62 checksum"

    # The application validates with a prepared statement, as a driver would.
    ident = app.execute("SELECT token_id, account, key_type, environment, scopes, name, expires_at IS NOT NULL "
                        "FROM token.validate_token(%s)", (token,), prepare=True).fetchone()
    assert ident == (token_id, "acme", "agent", "dev", ["read"], "ci", True)

    # The DBA's view shows the token, its hint and status, never the hash or the token.
    row = admin.execute("SELECT hint, status, to_jsonb(l) FROM token.token_list l WHERE id = %s", (token_id,)).fetchone()
    assert row[0] == token[:8] and row[1] == "active"
    assert "token_hash" not in row[2] and token not in str(row[2])

    new_id, new_token = admin.execute("SELECT token_id, token FROM token.rotate_token(%s)", (token_id,)).fetchone()
    db.record(new_token)
    assert new_token != token and new_token.startswith("e2e-")
    assert reason_of(app, token) is None, "old token still valid during the grace window"
    assert reason_of(app, new_token) is None
    assert admin.execute("SELECT status FROM token.token_list WHERE id = %s", (token_id,)).fetchone()[0] == "rotating"
    same = app.execute("SELECT (SELECT account FROM token.validate_token(%s)) = (SELECT account FROM token.validate_token(%s))",
                       (token, new_token)).fetchone()[0]
    assert same

    assert admin.execute("SELECT token.revoke_token(%s, 'leaked in CI log')", (new_id,)).fetchone()[0] is True
    err = refusal(app, "SELECT * FROM token.validate_token(%s)", (new_token,))
    assert err.sqlstate == "28000" and "token rejected: revoked" in str(err)
    assert reason_of(app, token) is None, "revoking the successor left the old one in its grace window"
    assert admin.execute("SELECT token.revoke_token(%s)", (new_id,)).fetchone()[0] is False, "already revoked"


def test_a_backends_kept_statements_follow_a_recreated_extension(db, su):
    """The lifecycle functions keep their statements' plans for the life of the backend
    (src/prepared.rs). Dropped and created again under the same session, the extension's new
    tables are the ones written: the rotation, the revocation and their events land in them,
    and a rate limit of the new token.rate_limit type (a new OID) is taken."""
    name = "pgt_e2e_kept_plans"
    su.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    su.execute(f"CREATE DATABASE {name}")
    setup = ["CREATE EXTENSION pg_token", "SELECT token.create_key_type('agent')",
             "SELECT token.register_prefix('e2e-', 'agent', 'dev')"]
    try:
        with db.su(name) as c:
            for round_ in range(2):
                for sql in setup:
                    c.execute(sql)
                token_id, token = c.execute("SELECT token_id, token FROM token.generate_token('acme', 'agent', "
                                            "rate_limits => %s, allowed_networks => '{127.0.0.1/32}')",
                                            ('{"(100,\\"1 hour\\")"}',)).fetchone()
                db.record(token)
                new_id, new_token = c.execute("SELECT token_id, token FROM token.rotate_token(%s)", (token_id,)).fetchone()
                db.record(new_token)
                assert c.execute("SELECT token.revoke_token(%s, 'kept plans')", (new_id,)).fetchone()[0] is True
                events = c.execute("SELECT event, token_id FROM token.events WHERE token_id IS NOT NULL ORDER BY id").fetchall()
                assert events == [("generated", token_id), ("rotated", token_id), ("revoked", new_id)], round_
                assert c.execute("SELECT count(*), count(revoked_at), count(revoke_after), "
                                 "bool_and(rate_limits::text = '{\"(100,01:00:00)\"}') FROM token.tokens").fetchone() == (2, 1, 1, True)
                assert reason_of(c, new_token) == "revoked" and reason_of(c, token) is None
                if round_ == 0:
                    c.execute("DROP EXTENSION pg_token")
    finally:
        su.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_revoke_account_tokens_revokes_every_token_of_the_account(db, admin, app):
    tokens = [generate(admin, db, "initech")[1] for _ in range(3)]
    other = generate(admin, db, "umbrella")[1]
    assert all(reason_of(app, t) is None for t in tokens)
    assert admin.execute("SELECT token.revoke_account_tokens('initech', 'offboarded')").fetchone()[0] == 3
    assert [reason_of(app, t) for t in tokens] == ["revoked"] * 3
    assert reason_of(app, other) is None


def test_rotate_own_token_needs_only_the_token(db, admin):
    _, token = generate(admin, db, "acme")
    new_id, new_token = admin.execute("SELECT token_id, token FROM token.rotate_own_token(%s, grace => '0 seconds')",
                                      (token,)).fetchone()
    db.record(new_token)
    assert reason_of(admin, token) == "revoked", "no grace: the old token ends at once"
    assert reason_of(admin, new_token) is None
    err = refusal(admin, "SELECT * FROM token.rotate_own_token(%s)", ("e2e-not-a-token",))
    assert err.sqlstate == "28000"


def test_last_used_at_is_written_once_per_interval(db, su, admin, app):
    # The test cluster runs with token.last_used_interval = 1 second.
    token_id, token = generate(admin, db, "acme")
    last_used = "SELECT last_used_at FROM token.tokens WHERE id = %s"
    assert su.execute(last_used, (token_id,)).fetchone()[0] is None
    app.execute("SELECT token.validate_token(%s)", (token,))
    flush(su)
    first = su.execute(last_used, (token_id,)).fetchone()[0]
    assert first is not None, "a successful validation records last use"

    # A longer interval in this session: many validations, no further write.
    su.execute("SET token.last_used_interval = 3600")
    for _ in range(50):
        su.execute("SELECT token.validate_token(%s)", (token,))
    flush(su)
    assert su.execute(last_used, (token_id,)).fetchone()[0] == first


def test_last_used_at_moves_once_per_interval_across_sessions(db, su, admin):
    """Each backend throttles its own touches; the writer holds the interval per token: a
    second session's touch, queued within the interval of the last write, changes nothing."""
    token_id, token = generate(admin, db, "acme")
    row = "SELECT last_used_at, xmin::text FROM token.tokens WHERE id = %s"
    with db.connect("e2e_app", autocommit=True) as a, db.connect("e2e_app", autocommit=True) as b:
        for s in (a, b):  # both sessions cache the token and queue its first use
            s.execute("SELECT token.validate_token(%s)", (token,))
        flush(su)
        time.sleep(1.2)  # past the test cluster's 1 s interval: both sessions are due again
        a.execute("SELECT token.validate_token(%s)", (token,))
        flush(su)
        after_a = su.execute(row, (token_id,)).fetchone()
        b.execute("SELECT token.validate_token(%s)", (token,))
        flush(su)
        after_b = su.execute(row, (token_id,)).fetchone()
    assert after_b == after_a, "b's touch, within 1 s of a's write, must not move last_used_at again"


def test_last_use_update_is_hot(db, su, admin, app):
    """last_used_at is in no index, and token.tokens keeps a tenth of each page free (fillfactor
    90, on fresh and upgraded installs alike): so the writer's last-use update is HOT, the row's
    new version a heap-only tuple on the old one's page, with no index entry written (the
    uniform bench rewrites 1M tokens' rows this way). pageinspect reads the page."""
    options = su.execute("SELECT reloptions FROM pg_catalog.pg_class WHERE oid = 'token.tokens'::regclass").fetchone()[0]
    assert options == ["fillfactor=90"], f"token.tokens keeps no room for HOT updates: {options}"
    token_id, token = generate(admin, db, "acme")
    where = "SELECT (ctid::text::point)[0]::int, (ctid::text::point)[1]::int FROM token.tokens WHERE id = %s"
    page_before, _ = su.execute(where, (token_id,)).fetchone()
    app.execute("SELECT token.validate_token(%s)", (token,))
    flush(su)
    page, item = su.execute(where, (token_id,)).fetchone()
    su.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
    try:
        heap_only, used = su.execute(
            "SELECT (i.t_infomask2 & 32768) <> 0, (SELECT last_used_at IS NOT NULL FROM token.tokens WHERE id = %s) "
            "FROM heap_page_items(get_raw_page('token.tokens', %s)) i WHERE i.lp = %s", (token_id, page, item)).fetchone()
    finally:
        su.execute("DROP EXTENSION pageinspect")
    assert used, "the validation's last use was written"
    assert page == page_before and heap_only, "the last-use update was not HOT (new version off the page, or indexed)"


def test_the_writer_reports_its_updates_while_it_runs(db, su, admin, app):
    """A writer kept busy by steady traffic never exits, so it reports its statistics as it
    goes, as a backend does: otherwise its updates would reach pg_stat_user_tables only when it
    exits, and autovacuum would never hear of the dead row versions they leave."""
    counts = ("SELECT n_tup_upd FROM pg_catalog.pg_stat_user_tables "
              "WHERE relid = 'token.tokens'::regclass")
    writer = ("SELECT pid FROM pg_catalog.pg_stat_activity WHERE backend_type = 'pg_token writer' "
              "AND datname = current_database()")
    tokens = [generate(admin, db, "acme")[1] for _ in range(3)]
    su.execute("SELECT pg_catalog.pg_stat_clear_snapshot()")
    updated = su.execute(counts).fetchone()[0]
    for token in tokens:
        app.execute("SELECT token.validate_token(%s)", (token,))
    flush(su)
    pid = su.execute(writer).fetchone()
    assert pid is not None, "the writer that applied them is still idling (token.worker_idle_timeout, 2 s)"
    deadline = time.monotonic() + 1.5
    while True:
        su.execute("SELECT pg_catalog.pg_stat_clear_snapshot()")
        now_updated = su.execute(counts).fetchone()[0]
        if now_updated >= updated + 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert su.execute(writer).fetchone() == pid, "the writer exited before we looked: the test proves nothing"
    assert now_updated >= updated + 3, "the running writer's updates are not in pg_stat_user_tables"


def test_validation_never_waits_on_the_token_row_lock(db, su, admin):
    token_id, token = generate(admin, db, "acme")
    with db.su() as locker:
        locker.autocommit = False
        locker.execute("SELECT 1 FROM token.tokens WHERE id = %s FOR UPDATE", (token_id,))
        # A validator with a 2 s statement timeout: it would time out if it waited on the lock.
        with db.su() as v:
            v.execute("SET statement_timeout = '2s'")
            v.execute("SET token.last_used_interval = 0")
            for _ in range(5):
                assert v.execute("SELECT account FROM token.validate_token(%s)", (token,)).fetchone()[0] == "acme"
        locker.rollback()
    flush(su)


def test_concurrent_validations_of_one_token_all_succeed(db, admin):
    _, token = generate(admin, db, "acme")
    failures = []

    def worker():
        try:
            with db.connect("e2e_app", autocommit=True) as c:
                for _ in range(200):
                    if c.execute("SELECT account FROM token.validate_token(%s)", (token,), prepare=True).fetchone()[0] != "acme":
                        failures.append("wrong account")
        except psycopg.Error as e:
            failures.append(str(e))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.parametrize("scopes, expires_in, sqlstate, needle", [
    (["delete-everything"], None, "22023", "not allowed"),
    (["read"], "1000 days", "22023", "maximum TTL"),
])
def test_key_type_rules_are_enforced_on_generate(db, admin, scopes, expires_in, sqlstate, needle):
    err = refusal(admin, "SELECT * FROM token.generate_token('acme', 'agent', scopes => %s, expires_in => %s)",
                  (scopes, expires_in))
    assert err.sqlstate == sqlstate and needle in str(err), str(err)
