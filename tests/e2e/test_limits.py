"""Usage caps, rate limits and bound networks (issue 15), over TCP from real sessions.

Caps: exact under concurrency (8 sessions, 1,000 uses, exactly 1,000 acceptances), spent even
when the caller rolls back, never exceeded across a crash, refilled, readable by the admin and
returned to the caller. Rate limits: counted across sessions, refused as rate_limited with the
retry time, the state returned to accepted callers. Networks: the connection's address, a
socket counting as loopback, and a gateway stating the end client's address."""

import pathlib
import subprocess
import tempfile
import threading
import time

import psycopg
import pytest

from conftest import CLUSTER, PASSWORD, generate, reason_of, refusal


def hammer(db, token, sessions, per_session):
    """`sessions` connections validate `token` `per_session` times each, at once; returns
    (accepted, refusal reasons)."""
    accepted, reasons, errors = [], [], []
    start = threading.Barrier(sessions)

    def run():
        try:
            with db.connect("e2e_app", autocommit=True) as c:
                start.wait()
                for _ in range(per_session):
                    row = c.execute("SELECT valid, reason, uses_remaining FROM token.check_token(%s)", (token,)).fetchone()
                    (accepted if row[0] else reasons).append(row[2] if row[0] else row[1])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return accepted, reasons


# ---- usage caps ----

def test_eight_sessions_get_exactly_the_cap(db, admin):
    token_id, token = generate(admin, db, "acme-cap", uses=1000)
    accepted, reasons = hammer(db, token, sessions=8, per_session=150)
    assert len(accepted) == 1000, f"{len(accepted)} acceptances for a cap of 1000"
    assert set(reasons) == {"usage_exceeded"} and len(reasons) == 200
    # Every acceptance reported a distinct number of uses left: 999 down to 0.
    assert sorted(accepted) == list(range(1000))
    row = admin.execute("SELECT uses_remaining, reserved, in_table FROM token.token_uses(%s)", (token_id,)).fetchone()
    assert row == (0, 0, 0)


def test_a_use_is_spent_even_when_the_caller_rolls_back(db, admin):
    token_id, token = generate(admin, db, "acme-once", uses=1)
    with db.connect("e2e_app") as c:
        assert c.execute("SELECT uses_remaining FROM token.validate_token(%s)", (token,)).fetchone()[0] == 0
        c.rollback()
    with db.connect("e2e_app", autocommit=True) as c:
        assert reason_of(c, token) == "usage_exceeded", "a one-time token is not reusable after a rollback"
    err = refusal(admin, "SELECT * FROM token.validate_token(%s)", (token,))
    assert err.sqlstate == "28000" and "no uses left" in err.diag.message_detail


def test_remaining_uses_are_returned_and_readable_exactly(db, admin, app):
    token_id, token = generate(admin, db, "acme-count", uses=100)
    left = [app.execute("SELECT uses_remaining FROM token.validate_token(%s)", (token,)).fetchone()[0] for _ in range(5)]
    assert left == [99, 98, 97, 96, 95]
    total, reserved, in_table = admin.execute(
        "SELECT uses_remaining, reserved, in_table FROM token.token_uses(%s)", (token_id,)).fetchone()
    assert total == 95 and reserved + in_table == 95 and reserved > 0, f"a block is reserved ahead: {(total, reserved, in_table)}"
    # The table's column is what is not reserved yet: at most in_table (the writer may reserve
    # the next block ahead in between), and the exact total does not move.
    listed = admin.execute("SELECT uses_remaining FROM token.token_list WHERE id = %s", (token_id,)).fetchone()[0]
    assert listed <= in_table
    assert admin.execute("SELECT uses_remaining FROM token.token_uses(%s)", (token_id,)).fetchone()[0] == 95


def test_an_admin_can_raise_a_spent_cap_and_the_next_call_sees_it(db, admin, app):
    token_id, token = generate(admin, db, "acme-raise", uses=2)
    for _ in range(2):
        assert reason_of(app, token) is None
    assert reason_of(app, token) == "usage_exceeded"
    admin.execute("SELECT token.update_token(%s, uses => 3)", (token_id,))
    assert [reason_of(app, token) for _ in range(4)] == [None, None, None, "usage_exceeded"]
    admin.execute("SELECT token.update_token(%s, unset => '{uses}')", (token_id,))
    assert [reason_of(app, token) for _ in range(5)] == [None] * 5, "uncapped again"


def test_a_refill_restores_the_cap_each_interval(db, admin, app):
    _, token = generate(admin, db, "acme-refill", uses=2, refill_uses=2, refill_interval="1 second")
    assert [reason_of(app, token) for _ in range(3)] == [None, None, "usage_exceeded"]
    time.sleep(1.2)
    assert [reason_of(app, token) for _ in range(3)] == [None, None, "usage_exceeded"]


def test_rotation_moves_the_cap_to_the_successor(db, admin, app):
    token_id, old = generate(admin, db, "acme-rotcap", uses=10)
    assert reason_of(app, old) is None
    new = db.record(admin.execute("SELECT token FROM token.rotate_token(%s)", (token_id,)).fetchone()[0])
    assert reason_of(app, old) == "usage_exceeded", "the old token keeps no uses"
    left = app.execute("SELECT uses_remaining FROM token.validate_token(%s)", (new,)).fetchone()[0]
    assert left <= 8, "the successor has what was left, less what the crash-safe reservation set aside"


def test_a_crash_never_grants_extra_uses(db):
    """A throwaway cluster: spend some uses, crash it (immediate stop: no shutdown, shared memory
    lost), start it, spend the rest. Never more acceptances than the cap; at most one reserved
    block lost."""
    run = pathlib.Path(tempfile.mkdtemp(prefix="pg_token-crash-", dir=db.run))
    subprocess.run(["chown", "postgres:postgres", str(run)], check=True)
    data = run / "data"
    port = subprocess.run(["bash", str(CLUSTER), "free-port"], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(["bash", str(CLUSTER), "start", str(data), port], check=True)
    pg_ctl = pathlib.Path(subprocess.run(["bash", "-c", "echo ${PGBIN:-/usr/lib/postgresql/15/bin}"],
                                         capture_output=True, text=True).stdout.strip()) / "pg_ctl"

    def connect():
        return psycopg.connect(host=str(data), port=port, user="postgres", dbname="postgres", autocommit=True)

    try:
        with connect() as c:
            c.execute("CREATE EXTENSION pg_token")
            c.execute("SELECT token.create_key_type('agent')")
            c.execute("SELECT token.register_prefix('crash-', 'agent', 'dev')")
            token = db.record(c.execute("SELECT token FROM token.generate_token('acme', 'agent', uses => 200)").fetchone()[0])
            before = sum(c.execute("SELECT (token.check_token(%s)).valid", (token,)).fetchone()[0] for _ in range(30))
        assert before == 30
        subprocess.run(["runuser", "-u", "postgres", "--", str(pg_ctl), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       check=True, capture_output=True)
        subprocess.run(["bash", str(CLUSTER), "start", str(data), port], check=True)
        with connect() as c:
            after = 0
            while c.execute("SELECT (token.check_token(%s)).valid", (token,)).fetchone()[0]:
                after += 1
                assert before + after <= 200, "more acceptances than the cap"
        assert 200 - 64 <= before + after <= 200, (before, after)
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(data)], check=False)


# ---- rate limits ----

def test_a_rate_limit_holds_across_sessions(db, admin):
    _, token = generate(admin, db, "acme-rate", rate_limits='{"(25,\\"1 hour\\")"}')
    accepted, reasons = hammer(db, token, sessions=4, per_session=20)
    assert len(accepted) == 25 and set(reasons) == {"rate_limited"}


def test_accepted_callers_get_the_limit_state_and_refused_ones_the_retry_time(db, admin, app):
    _, token = generate(admin, db, "acme-rate2", rate_limits='{"(100,\\"1 second\\")","(3,\\"1 hour\\")"}')
    rows = [app.execute("SELECT rate_limit, rate_remaining, rate_reset_at, rate_reset_at > now() "
                        "AND rate_reset_at <= now() + interval '1 hour' FROM token.validate_token(%s)",
                        (token,)).fetchone() for _ in range(3)]
    assert [(r[0], r[1], r[3]) for r in rows] == [(3, 2, True), (3, 1, True), (3, 0, True)], \
        "the binding limit: the one with least room"
    # Each token's windows start at its own phase, so the hour may end at any moment: the
    # refusal must name the same reset as the last acceptance (the hourly window's).
    v = app.execute("SELECT valid, reason, rate_limit, rate_remaining, rate_reset_at "
                    "FROM token.check_token(%s)", (token,)).fetchone()
    assert v == (False, "rate_limited", 3, 0, rows[2][2]), "check_token carries the retry time"
    err = refusal(app, "SELECT * FROM token.validate_token(%s)", (token,))
    assert err.sqlstate == "28000" and "retry after" in err.diag.message_detail


def test_a_key_type_limit_applies_unless_the_token_has_its_own(db, su, admin, app):
    su.execute("SELECT token.create_key_type('metered', rate_limits => '{\"(2,\\\"1 hour\\\")\"}')")
    su.execute("SELECT token.register_prefix('e2emet-', 'metered', 'dev')")
    try:
        _, plain = generate(admin, db, "acme-m", key_type="metered")
        _, own = generate(admin, db, "acme-m", key_type="metered", rate_limits="{}")
        assert [reason_of(app, plain) for _ in range(3)] == [None, None, "rate_limited"]
        assert [reason_of(app, own) for _ in range(5)] == [None] * 5, "an empty list of its own: no limit"
        # A change of limit is seen at once, and the count so far carries over.
        su.execute("UPDATE token.key_types SET rate_limits = '{\"(4,\\\"1 hour\\\")\"}' WHERE name = 'metered'")
        assert [reason_of(app, plain) for _ in range(3)] == [None, None, "rate_limited"]
    finally:
        su.execute("DELETE FROM token.tokens WHERE key_type = 'metered'")
        su.execute("DELETE FROM token.prefixes WHERE key_type = 'metered'")
        su.execute("DELETE FROM token.key_types WHERE name = 'metered'")


@pytest.mark.parametrize("limits, message", [
    ("{\"(0,\\\"1 second\\\")\"}", "1 to"),
    ("{\"(5,\\\"500 milliseconds\\\")\"}", "1 second"),
    ("{\"(5,\\\"1 month\\\")\"}", "not months"),
    ("{\"(5,\\\"1 second\\\")\",\"(9,\\\"1 second\\\")\"}", "same window"),
    ("{\"(5,)\"}", "both"),
])
def test_bad_rate_limits_are_refused(db, admin, limits, message):
    err = refusal(admin, "SELECT * FROM token.generate_token('acme', 'agent', rate_limits => %s)", (limits,))
    assert err.sqlstate == "22023" and message in str(err), (limits, str(err))


# ---- bound networks ----

def test_a_token_bound_to_networks_is_refused_from_elsewhere(db, admin, app):
    _, office = generate(admin, db, "acme-net", allowed_networks="{192.0.2.0/24,2001:db8::/32}")
    _, local = generate(admin, db, "acme-net", allowed_networks="{127.0.0.0/8}")
    assert reason_of(app, office) == "network_not_allowed", "the app connects from 127.0.0.1"
    err = refusal(app, "SELECT * FROM token.validate_token(%s)", (office,))
    assert "may not be used from 127.0.0.1" in err.diag.message_detail
    assert reason_of(app, local) is None
    stored = admin.execute("SELECT allowed_networks::text FROM token.token_list WHERE allowed_networks IS NOT NULL "
                           "AND account = 'acme-net' ORDER BY created_at").fetchall()
    assert stored == [("{192.0.2.0/24,2001:db8::/32}",), ("{127.0.0.0/8}",)]


def test_a_socket_client_counts_as_loopback(db, admin, su):
    _, local = generate(admin, db, "acme-sock", allowed_networks="{127.0.0.1}")
    _, office = generate(admin, db, "acme-sock", allowed_networks="{192.0.2.0/24}")
    assert reason_of(su, local) is None, "su connects over the Unix socket"
    assert reason_of(su, office) == "network_not_allowed"


def test_a_gateway_states_the_client_address(db, admin):
    _, office = generate(admin, db, "acme-gw", allowed_networks="{192.0.2.0/24}")
    with db.connect("e2e_gateway", autocommit=True) as gw:
        assert gw.execute("SELECT valid FROM token.check_token_from('192.0.2.7', %s)", (office,)).fetchone()[0] is True
        row = gw.execute("SELECT valid, reason FROM token.check_token_from('198.51.100.1', %s)", (office,)).fetchone()
        assert row == (False, "network_not_allowed")
        assert gw.execute("SELECT account FROM token.validate_token_from('192.0.2.7', %s)", (office,)).fetchone()[0] == "acme-gw"
        assert gw.execute("SELECT account FROM token.authenticate_from('192.0.2.7', %s)", (office,)).fetchone()[0] == "acme-gw"
        # NULL: the connection's own address.
        assert gw.execute("SELECT reason FROM token.check_token_from(NULL, %s)", (office,)).fetchone()[0] == "network_not_allowed"
    with db.connect("e2e_app", autocommit=True) as app:
        for fn in ("validate_token_from", "check_token_from", "authenticate_from"):
            err = refusal(app, f"SELECT * FROM token.{fn}('192.0.2.7', %s)", (office,))
            assert err.sqlstate == "42501", (fn, err.sqlstate)


def test_a_key_type_network_list_applies_and_bad_lists_are_refused(db, su, admin, app):
    su.execute("SELECT token.create_key_type('office', allowed_networks => '{10.0.0.0/8}')")
    su.execute("SELECT token.register_prefix('e2eoff-', 'office', 'dev')")
    try:
        _, t = generate(admin, db, "acme-o", key_type="office")
        assert reason_of(app, t) == "network_not_allowed"
        _, mine = generate(admin, db, "acme-o", key_type="office", allowed_networks="{127.0.0.1}")
        assert reason_of(app, mine) is None, "the token's own list wins"
    finally:
        su.execute("DELETE FROM token.tokens WHERE key_type = 'office'")
        su.execute("DELETE FROM token.prefixes WHERE key_type = 'office'")
        su.execute("DELETE FROM token.key_types WHERE name = 'office'")
    for bad, message in [("{}", "must not be empty"), ("{10.0.0.0/8,NULL}", "NULL")]:
        err = refusal(admin, "SELECT * FROM token.generate_token('acme', 'agent', allowed_networks => %s)", (bad,))
        assert err.sqlstate == "22023" and message in str(err), (bad, str(err))
