"""The holes an adversarial review found, closed, shown over TCP as the roles an attacker has:
tokens in pg_stat_activity, session state carried across pooled transactions (through a real
pgbouncer), the audit trail's minimum retention, a database closed to connections, and the log
hook leaving ordinary messages alone."""

import time

import psycopg
import pytest
from psycopg import sql

from conftest import DB, flush, generate, refusal
from test_pgbouncer import bouncer, client  # noqa: F401  (the fixture)


def activity_of(su, pid):
    return su.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]


@pytest.mark.parametrize("call", [
    "SELECT account FROM token.validate_token({t})",
    "SELECT valid FROM token.check_token({t})",
    "SELECT account FROM token.authenticate({t})",
    "SELECT 1; SELECT account FROM token.validate_token({t})",
])
def test_a_token_sent_as_a_literal_is_not_readable_in_pg_stat_activity(db, su, admin, app, call):
    _, token = generate(admin, db, "activity")
    pid = app.execute("SELECT pg_backend_pid()").fetchone()[0]
    app.execute(sql.SQL(call).format(t=sql.Literal(token)))
    seen = activity_of(su, pid)   # the backend is idle now; its last query text stays
    assert token not in seen, "the token is readable by other sessions"
    assert token[:len("e2e-") + 4] in seen, f"the hint stays, for whoever debugs: {seen}"
    # Parameters were never the problem: the text holds $1.
    app.execute("SELECT account FROM token.validate_token(%s)", (token,))
    assert token not in activity_of(su, pid)


def test_a_caller_token_literal_is_scrubbed_too(db, su, admin, app):
    _, agent = generate(admin, db, "activity2")
    _, mid = generate(admin, db, "activity2", key_type="mid")
    pid = app.execute("SELECT pg_backend_pid()").fetchone()[0]
    app.execute(sql.SQL("SELECT valid FROM token.check_token({a}, {m})").format(a=sql.Literal(agent), m=sql.Literal(mid)))
    seen = activity_of(su, pid)
    assert agent not in seen and mid not in seen


def test_temporary_objects_from_one_tenant_refuse_the_next_through_pgbouncer(db, admin, bouncer):  # noqa: F811
    _, acme = generate(admin, db, "acme", scopes=["read"])
    _, globex = generate(admin, db, "globex", scopes=["read"])
    a, b = client(bouncer, "tenant-a"), client(bouncer, "tenant-b")
    try:
        # Tenant A plants a temporary view named like the application's table, which copies
        # every row read through it into A's temporary table.
        a.execute("SELECT token.authenticate(%s)", (acme,))
        a.execute("CREATE TEMP TABLE loot (tenant text, name text)")
        a.execute("""CREATE FUNCTION pg_temp.steal(t text, n text) RETURNS boolean LANGUAGE sql VOLATILE
                     AS $$ INSERT INTO pg_temp.loot VALUES (t, n); SELECT true $$""")
        a.execute("CREATE TEMP VIEW projects AS SELECT p.* FROM app.projects p WHERE pg_temp.steal(p.tenant, p.name)")
        pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        a.commit()
        # Tenant B, next on the same server connection, reading `projects` unqualified.
        err = refusal(b, "SELECT token.authenticate(%s)", (globex,))
        assert err.sqlstate == "28000" and "tainted_session" in str(err), str(err)
        b.execute("SET search_path = app")
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid_a, "one pooled backend"
        assert b.execute("SELECT count(*) FROM projects").fetchone()[0] == 0, "unauthenticated: nothing"
        b.rollback()
        assert a.execute("SELECT count(*) FROM pg_temp.loot WHERE tenant = 'globex'").fetchone()[0] == 0
        a.rollback()
        # DISCARD ALL (what a pooler's reset query does) makes the connection clean again.
        a.autocommit = True
        a.execute("DISCARD ALL")
        a.autocommit = False
        b.execute("SELECT token.authenticate(%s)", (globex,))
        assert b.execute("SELECT count(*) FROM app.projects").fetchone()[0] == 3
        b.commit()
    finally:
        a.close()
        b.close()


def test_a_with_hold_cursor_never_shares_a_transaction_with_an_identity(db, admin, bouncer):  # noqa: F811
    _, acme = generate(admin, db, "acme", scopes=["read"])
    _, globex = generate(admin, db, "globex", scopes=["read"])
    a, b = client(bouncer, "tenant-a"), client(bouncer, "tenant-b")
    try:
        # Declared after authenticate: refused, so nothing of acme's can be held past COMMIT.
        a.execute("SELECT token.authenticate(%s)", (acme,))
        err = refusal(a, "DECLARE held CURSOR WITH HOLD FOR SELECT name FROM app.projects")
        assert err.sqlstate == "55000" and "WITH HOLD" in str(err), str(err)
        # Declared before authenticate in the same transaction: authenticate is refused (the
        # cursor would be filled at COMMIT, under the identity).
        a.execute("DECLARE early CURSOR WITH HOLD FOR SELECT name FROM app.projects")
        err = refusal(a, "SELECT token.authenticate(%s)", (acme,))
        assert "tainted_session" in str(err), str(err)
        err = refusal(b, "FETCH ALL FROM early")
        assert err.sqlstate == "34000", f"the aborted transaction's cursor is gone: {err}"
        # Held from an earlier, unauthenticated transaction: the next tenant is refused until
        # it is closed.
        a.execute("DECLARE plain CURSOR WITH HOLD FOR SELECT 1")
        a.commit()
        err = refusal(b, "SELECT token.authenticate(%s)", (globex,))
        assert "tainted_session" in str(err), str(err)
        a.execute("CLOSE plain")
        a.commit()
        b.execute("SELECT token.authenticate(%s)", (globex,))
        assert b.execute("SELECT count(*) FROM app.projects").fetchone()[0] == 3
        b.commit()
    finally:
        a.close()
        b.close()


def test_a_tenant_keeps_its_own_temporary_objects_across_its_transactions(db, admin):
    """A session (no pooler) whose temporary tables are its own: same account, not refused."""
    _, acme = generate(admin, db, "acme", scopes=["read"])
    with db.connect("e2e_tenant") as c:
        c.execute("SELECT token.authenticate(%s)", (acme,))
        c.execute("CREATE TEMP TABLE scratch (x int)")
        c.commit()
        c.execute("SELECT token.authenticate(%s)", (acme,))
        c.commit()


def test_a_token_admin_cannot_purge_recent_events(db, admin, su):
    generate(admin, db, "purge-me")
    err = refusal(admin, "SELECT token.purge_events('0')")
    assert err.sqlstate == "42501", str(err)
    assert "min_event_retention" in str(err)
    assert admin.execute("SELECT count(*) FROM token.events WHERE account = 'purge-me'").fetchone()[0] >= 1
    # Older than the minimum is theirs to purge, and the purge itself is recorded.
    admin.execute("SELECT token.purge_events('3650 days')")
    row = admin.execute("SELECT db_user, detail FROM token.events WHERE event = 'events_purged' ORDER BY id DESC LIMIT 1").fetchone()
    assert row[0] == "e2e_admin" and row[1].startswith("deleted="), row


def test_the_writer_still_writes_when_the_database_refuses_connections(db, su, app):
    with db.su("postgres") as other:
        other.execute(f"ALTER DATABASE {DB} ALLOW_CONNECTIONS false")
    try:
        # Let any running writer go idle and exit, so a new one must connect.
        deadline = time.time() + 15
        while time.time() < deadline:
            pid = su.execute("SELECT worker_pid FROM token.worker_status() WHERE database = %s", (DB,)).fetchone()
            if pid is None or pid[0] is None:
                break
            time.sleep(0.2)
        app.execute("SELECT valid FROM token.check_token('e2e-allowconn')")
        assert su.execute("SELECT token.flush_events('15 seconds')").fetchone()[0] is True, "the writer did not connect"
        assert su.execute("SELECT count(*) FROM token.events WHERE reason = 'malformed' "
                          "AND occurred_at > now() - interval '1 minute'").fetchone()[0] >= 1
    finally:
        with db.su("postgres") as other:
            other.execute(f"ALTER DATABASE {DB} ALLOW_CONNECTIONS true")


def test_the_log_hook_leaves_ordinary_errors_alone_in_any_database(db, su):
    with db.su("postgres") as c:
        err = refusal(c, "SELECT * FROM order_itemsandpricing2024q3")
        assert str(err).startswith('relation "order_itemsandpricing2024q3" does not exist'), str(err)
    log = (db.data / "server.log").read_text(errors="replace")
    line = 'ERROR:  relation "order_itemsandpricing2024q3" does not exist'
    assert line in log
    assert "statement: SELECT * FROM order_itemsandpricing2024q3" in log, "log_statement keeps it too"
    after = log[log.rindex(line):]
    assert "STATEMENT:  SELECT * FROM order_itemsandpricing2024q3" in after.splitlines()[1], after[:400]
