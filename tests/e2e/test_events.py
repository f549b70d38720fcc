"""Security events: every refusal and lifecycle step is recorded, refusals even when the
caller's transaction rolls back, and each also goes to the server log."""

import uuid

from conftest import compose, flush, generate, refusal


def events_for(su, marker):
    return su.execute("SELECT event, reason, token_id, account, prefix, hint, environment, client_addr, "
                      "application_name, db_user, detail FROM token.events WHERE application_name = %s "
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
    event, reason, tid, account, prefix, hint, env, addr, appname, user, _ = rows[0]
    assert (event, reason, tid, account, prefix, env, user) == ("refused", "revoked", token_id, "acme", "e2e-", "dev", "e2e_app")
    assert hint == token[:8] and addr == "127.0.0.1"


def test_every_refusal_reason_is_recorded_without_the_token(db, su, admin):
    _, token = generate(admin, db, "acme")
    prod_like = "e2eprd-" + token[len("e2e-"):]
    marker = f"reasons-{uuid.uuid4()}"
    with db.connect("e2e_app", application_name=marker, autocommit=True) as app:
        for bad in [None, "", token[:-1], token[:-1] + ("B" if token[-1] == "A" else "A"), prod_like]:
            app.execute("SELECT token.check_token(%s)", (bad,))
    flush(su)
    rows = events_for(su, marker)
    assert [r[1] for r in rows] == ["malformed", "malformed", "malformed", "bad_checksum", "bad_checksum"]
    for r in rows:
        assert token not in repr(r) and token[4:] not in repr(r)


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


def test_purge_is_bounded_by_retention(db, su):
    su.execute("INSERT INTO token.events (occurred_at, event, application_name) "
               "VALUES (now() - interval '400 days', 'refused', 'purge-me')")
    assert su.execute("SELECT token.purge_events()").fetchone()[0] >= 1
    assert su.execute("SELECT count(*) FROM token.events WHERE application_name = 'purge-me'").fetchone()[0] == 0
