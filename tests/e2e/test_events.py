"""Security events: every refusal and lifecycle step is recorded, refusals even when the
caller's transaction rolls back, and each also goes to the server log."""

import threading
import time
import uuid

import jwt as pyjwt
import psycopg

from conftest import compose, flush, generate, refusal


def events_for(su, marker):
    return su.execute("SELECT event, reason, token_id, account, prefix, hint, environment, client_addr, "
                      "application_name, db_user, detail, count FROM token.events WHERE application_name = %s "
                      "ORDER BY id", (marker,)).fetchall()


def test_refusal_survives_the_callers_rollback(db, su, admin):
    token_id, token = generate(admin, db, "acme")
    admin.execute("SELECT token.revoke_token(%s)", (token_id,))
    marker = f"rollback-{uuid.uuid4()}"
    with db.connect("e2e_app", application_name=marker) as app:
        app.execute("BEGIN")
        app.execute("CREATE TEMP TABLE scratch (x int)")
        err = refusal(app, "SELECT * FROM token.validate_token(%s)", (token,))  # rolls back
        assert err.sqlstate == "28000"
        assert app.execute("SELECT to_regclass('pg_temp.scratch')").fetchone()[0] is None, "the transaction did roll back"
    flush(su)
    rows = events_for(su, marker)
    assert len(rows) == 1, rows
    event, reason, tid, account, prefix, hint, env, addr, appname, user, _, count = rows[0]
    assert (event, reason, tid, account, prefix, env, user, count) == ("refused", "revoked", token_id, "acme", "e2e-", "dev", "e2e_app", 1)
    assert hint == token[:8] and addr == "127.0.0.1"


def test_every_refusal_reason_is_recorded_without_the_token(db, su, admin):
    """One refusal of each reason, from the application over TCP: each leaves
    an event row with its reason, and no row holds any of the tokens involved."""
    _, token = generate(admin, db, "acme", scopes=["read"])
    revoked_id, revoked = generate(admin, db, "acme")
    admin.execute("SELECT token.revoke_token(%s)", (revoked_id,))
    expired_id, expired = generate(admin, db, "acme")
    su.execute("UPDATE token.tokens SET expires_at = now() - interval '1 minute' WHERE id = %s", (expired_id,))
    _, mid_acme = generate(admin, db, "acme", key_type="mid")
    _, agent_globex = generate(admin, db, "globex")
    never_issued = compose("e2e-", "N" * 22)
    disabled_id, disabled = generate(admin, db, "acme")
    admin.execute("SELECT token.disable_token(%s, 'events test')", (disabled_id,))
    parent_id, _ = generate(admin, db, "acme")
    child = db.record(admin.execute("SELECT token FROM token.derive_token(%s)", (parent_id,)).fetchone()[0])
    admin.execute("SELECT token.revoke_token(%s)", (parent_id,))
    _, elsewhere = generate(admin, db, "acme", allowed_networks="{192.0.2.0/24}")
    _, limited = generate(admin, db, "acme", rate_limits='{"(1,\\"1 hour\\")"}')
    admin.execute("SELECT token.validate_token(%s)", (limited,))
    _, spent = generate(admin, db, "acme", uses=0)
    # Legacy JWTs (migrating from JWTs): an issuer, one retired, and three refused JWTs.
    secret = "events-secret-" + "x" * 32
    su.execute("SELECT token.register_legacy_issuer('events_jwt', '{HS256}', %s, 'agent', 'dev', now() + interval '1 day', "
               "issuer => 'https://events.example')", (secret,))
    su.execute("SELECT token.register_legacy_issuer('events_old', '{HS256}', %s, 'agent', 'dev', now() - interval '1 day', "
               "'use pg_token', issuer => 'https://events-old.example')", (secret,))
    exp = int(time.time()) + 600
    addressed = db.record_jwt(pyjwt.encode({"sub": "acme", "exp": exp, "iss": "https://events.example", "aud": "elsewhere"}, secret, "HS256"))
    forged = db.record_jwt(pyjwt.encode({"sub": "acme", "exp": exp, "iss": "https://events.example"}, "f" * 40, "HS256"))
    retired = db.record_jwt(pyjwt.encode({"sub": "acme", "exp": exp, "iss": "https://events-old.example"}, secret, "HS256"))
    # A rotated-away token of a key type with reuse detection, presented after its grace (0).
    su.execute("SELECT token.create_key_type('ev_fam', reuse_detection => true, replace => true)")
    if su.execute("SELECT 1 FROM token.prefixes WHERE prefix = 'e2eevf-'").fetchone() is None:
        su.execute("SELECT token.register_prefix('e2eevf-', 'ev_fam', 'dev')")
    reused_id, reused = generate(admin, db, "acme", key_type="ev_fam")
    db.record(admin.execute("SELECT token FROM token.rotate_token(%s, '0')", (reused_id,)).fetchone()[0])
    cases = [  # (token, caller, required scope) -> reason
        ((None, None, None), "malformed"),
        ((token[:-1], None, None), "malformed"),
        ((flip_last(token), None, None), "bad_checksum"),
        ((compose("zz-", "Z" * 22), None, None), "unknown_prefix"),
        ((compose("e2eprd-", "P" * 22), None, None), "environment_mismatch"),
        ((never_issued, None, None), "not_found"),
        ((revoked, None, None), "revoked"),
        ((expired, None, None), "expired"),
        ((token, "e2e-garbage", None), "caller_invalid"),
        ((mid_acme, token, None), "caller_not_permitted"),
        ((agent_globex, mid_acme, None), "cross_account"),
        ((token, None, "write"), "insufficient_scope"),
        ((disabled, None, None), "disabled"),
        ((child, None, None), "parent_invalid"),
        ((elsewhere, None, None), "network_not_allowed"),
        ((limited, None, None), "rate_limited"),
        ((spent, None, None), "usage_exceeded"),
        ((addressed, None, None), "unknown_issuer"),
        ((forged, None, None), "bad_signature"),
        ((retired, None, None), "legacy_token_retired"),
        ((reused, None, None), "family_revoked"),
    ]
    marker = f"reasons-{uuid.uuid4()}"
    with db.connect("e2e_app", application_name=marker, autocommit=True) as app:
        for args, _ in cases:
            app.execute("SELECT token.check_token(%s, %s, %s)", args)
        # The one reason only authenticate gives: a connection carrying another identity's
        # temporary objects (this one made them unauthenticated).
        app.execute("CREATE TEMP TABLE planted (x int)")
        try:
            app.execute("SELECT token.authenticate(%s)", (token,))
            raise AssertionError("authenticate accepted a tainted session")
        except psycopg.Error:
            pass
    cases.append(((token, None, None), "tainted_session"))
    flush(su)
    rows = events_for(su, marker)
    # The reuse is also a lifecycle event: the family's revocation, by the same client.
    family = [r for r in rows if r[0] == "family_revoked"]
    assert [(r[1], r[2]) for r in family] == [("family_revoked", reused_id)], family
    rows = [r for r in rows if r[0] != "family_revoked"]
    # One row per key (two malformed refusals from this source are one row counting 2).
    counted = {}
    for r in rows:
        counted[r[1]] = counted.get(r[1], 0) + r[11]
    expected = {}
    for _, reason in cases:
        expected[reason] = expected.get(reason, 0) + 1
    assert counted == expected
    assert {r[1] for r in rows} == {r for (r,) in su.execute("SELECT reason FROM token.reasons()")}, "every reason"
    su.execute("SELECT token.drop_legacy_issuer('events_jwt'), token.drop_legacy_issuer('events_old')")
    secrets = [token, revoked, expired, mid_acme, agent_globex, never_issued, disabled, child, elsewhere, limited, spent,
               addressed, forged, retired, reused]
    assert not any(t in repr(family) or t[-28:] in repr(family) for t in secrets), family
    for r in rows:
        assert r[0] == "refused" and r[9] == "e2e_app"
        assert not any(t in repr(r) or t[-28:] in repr(r) for t in secrets), r


def flip_last(token):
    return token[:-1] + ("B" if token[-1] == "A" else "A")


def test_environment_mismatch_and_cross_account_are_recorded(db, su, admin, env):
    _, agent_b = generate(admin, db, "globex")
    _, mid_a = generate(admin, db, "acme", key_type="mid")
    forged_prod = compose("e2eprd-", "P" * 22)
    marker = f"trust-{uuid.uuid4()}"
    with db.connect("e2e_app", application_name=marker, autocommit=True) as app:
        err = refusal(app, "SELECT * FROM token.validate_token(%s)", (forged_prod,))
        assert err.sqlstate == "28000"
        assert str(err).startswith("Token environment mismatch: prod token used in dev"), str(err)
        err = refusal(app, "SELECT * FROM token.validate_token(%s, caller_token => %s)", (agent_b, mid_a))
        assert "token rejected: cross_account" in str(err)
    flush(su)
    rows = events_for(su, marker)
    assert [(r[0], r[1], r[6]) for r in rows] == [("refused", "environment_mismatch", "prod"),
                                                   ("refused", "cross_account", "dev")]
    # The server log carries the same events, with the hint and never the token.
    log = (db.data / "server.log").read_text(errors="replace")
    assert "reason=environment_mismatch" in log and "reason=cross_account" in log
    assert forged_prod not in log and agent_b not in log and mid_a not in log


def test_lifecycle_events_are_recorded_in_the_admins_transaction(db, su, admin):
    marker = f"lifecycle-{uuid.uuid4()}"
    with db.connect("e2e_admin", application_name=marker, autocommit=True) as a:
        token_id, _ = generate(a, db, "acme")
        new_id, new = a.execute("SELECT token_id, token FROM token.rotate_token(%s)", (token_id,)).fetchone()
        db.record(new)
        a.execute("SELECT token.revoke_token(%s, 'test')", (new_id,))
        # A generate that rolls back leaves no event (and no token).
        a.execute("BEGIN")
        generate(a, db, "acme")
        a.execute("ROLLBACK")
    rows = events_for(su, marker)
    assert [(r[0], r[2]) for r in rows] == [("generated", token_id), ("rotated", token_id), ("revoked", new_id)]
    assert all(r[9] == "e2e_admin" and r[7] == "127.0.0.1" for r in rows)
    # Each is also a LOG line, with the token's id and hint and never the token.
    log = (db.data / "server.log").read_text(errors="replace")
    for event, tid in (("generated", token_id), ("rotated", token_id), ("revoked", new_id)):
        assert f"pg_token: {event} " in log and f"token_id={tid}" in log, event
    assert new not in log


def test_registry_changes_are_recorded(db, su):
    marker = f"registry-{uuid.uuid4()}"
    with db.su(application_name=marker) as s:
        s.execute("SELECT token.create_key_type('evtype')")
        s.execute("SELECT token.create_key_type('evtype', description => 'again', replace => true)")
        s.execute("SELECT token.register_prefix('e2eev-', 'evtype', 'dev')")
        assert s.execute("SELECT token.unregister_prefix('e2eev-')").fetchone()[0] is True
    rows = events_for(su, marker)
    assert [r[0] for r in rows] == ["key_type_created", "key_type_replaced", "prefix_registered", "prefix_unregistered"]
    assert [r[4] for r in rows[2:]] == ["e2eev-", "e2eev-"]


def test_purge_is_bounded_by_retention(db, su):
    su.execute("INSERT INTO token.events (occurred_at, event, application_name) "
               "VALUES (now() - interval '400 days', 'refused', 'purge-me')")
    assert su.execute("SELECT token.purge_events()").fetchone()[0] >= 1
    assert su.execute("SELECT count(*) FROM token.events WHERE application_name = 'purge-me'").fetchone()[0] == 0


def test_the_writer_purges_past_retention_on_its_own(db, su):
    """token.event_retention (90 days here) is applied by the writer itself, each time it
    starts and every 10 minutes, without anyone calling purge_events()."""
    su.execute("INSERT INTO token.events (occurred_at, event, application_name) "
               "VALUES (now() - interval '400 days', 'refused', 'auto-purge-me')")
    status = "SELECT worker_pid FROM token.worker_status() WHERE database = current_database()"
    deadline = time.monotonic() + 15
    while (row := su.execute(status).fetchone()) and row[0] is not None:  # let the writer go idle and exit
        assert time.monotonic() < deadline, "the writer did not exit after token.worker_idle_timeout"
        time.sleep(0.2)
    su.execute("SELECT token.check_token('e2e-not-a-token')")  # a refusal starts a fresh writer
    flush(su)
    deadline = time.monotonic() + 15
    while su.execute("SELECT count(*) FROM token.events WHERE application_name = 'auto-purge-me'").fetchone()[0]:
        assert time.monotonic() < deadline, "the writer did not purge an event past token.event_retention"
        time.sleep(0.2)


def test_the_writer_stops_when_terminated_under_load(db, su):
    """SIGTERM is honoured while the writer has work on every turn (a refusal flood), and the
    next record starts a fresh writer that drains the queue."""
    stop = threading.Event()

    def flood():
        with db.connect("e2e_app", autocommit=True) as c:
            while not stop.is_set():
                c.execute("SELECT token.check_token('e2e-flood')")

    flooders = [threading.Thread(target=flood) for _ in range(3)]
    for t in flooders:
        t.start()
    try:
        status = "SELECT worker_pid FROM token.worker_status() WHERE database = current_database()"
        deadline = time.monotonic() + 10
        while (pid := (su.execute(status).fetchone() or [None])[0]) is None:
            assert time.monotonic() < deadline, "no writer started under the flood"
            time.sleep(0.05)
        time.sleep(0.5)  # well into the flood
        assert su.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        deadline = time.monotonic() + 5
        while su.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the writer ignored SIGTERM while busy"
            time.sleep(0.05)
    finally:
        stop.set()
        for t in flooders:
            t.join()
    flush(su)
