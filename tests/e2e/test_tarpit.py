"""The refusal tarpit (token.max_refusal_rate): a connection refusing garbage tokens as fast as
it can is held at the cap, through every function that refuses; accepted tokens on that same
connection never wait; a cancel, a statement timeout or a terminate ends a wait at once; and
every refusal is still counted in token.events. The cap is set per role (ALTER ROLE ... SET, by
the superuser: it is a superuser-only setting), low enough that an unheld connection would
exceed it many times over. Counts are bounded, never timed: the bounds are the tarpit's own
(cap * (seconds + 1) + 1) plus slack."""

import contextlib
import random
import threading
import time
import uuid

import psycopg
import pytest

from conftest import ALPHABET, PASSWORD, compose, flush, generate

CAP = 50


@contextlib.contextmanager
def capped_role(db, su, cap):
    """A login role holding token_validator and token_gateway whose sessions run with
    token.max_refusal_rate = cap; dropped afterwards."""
    role = f"e2e_tarpit_{uuid.uuid4().hex[:8]}"
    su.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{PASSWORD}' IN ROLE token_validator, token_gateway")
    su.execute(f"ALTER ROLE {role} SET token.max_refusal_rate = {int(cap)}")
    try:
        yield role
    finally:
        su.execute(f"DROP ROLE {role}")


def connect(db, role, app):
    return psycopg.connect(host=db.host, port=db.port, user=role, password=PASSWORD, dbname="pgt_e2e",
                           application_name=app, autocommit=True)


def garbage(rng):
    """A well-formed token of a registered prefix that was never issued (not_found)."""
    return compose("e2e-", "".join(rng.choice(ALPHABET) for _ in range(22)))


REFUSING = {
    "check_token": ("SELECT valid FROM token.check_token(%s)", False),
    "validate_token": ("SELECT account FROM token.validate_token(%s)", True),
    "check_token_from": ("SELECT valid FROM token.check_token_from('192.0.2.9', %s)", False),
    "validate_token_from": ("SELECT account FROM token.validate_token_from('192.0.2.9', %s)", True),
}


def refuse(c, function, token):
    """One refusal through `function`: check_token's row says so, validate_token raises 28000."""
    sql, raises = REFUSING[function]
    if raises:
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
            c.execute(sql, (token,))
    else:
        assert c.execute(sql, (token,)).fetchone()[0] is False


@pytest.mark.parametrize("function", list(REFUSING))
def test_a_flooding_connection_is_held_at_its_cap(db, su, function):
    seconds = 1.5
    rng = random.Random(function)
    marker = f"tarpit-{uuid.uuid4()}"
    log = db.data / "server.log"
    log_before = log.stat().st_size
    with capped_role(db, su, CAP) as role:
        with connect(db, role, marker) as c:
            assert c.execute("SHOW token.max_refusal_rate").fetchone()[0] == str(CAP)
            pid = c.info.backend_pid
            made = 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                refuse(c, function, garbage(rng))
                made += 1
        flush(su)
        counted = su.execute("SELECT coalesce(sum(count), 0) FROM token.events WHERE application_name = %s",
                             (marker,)).fetchone()[0]
    # The burst (CAP at once), then CAP a second; one more for rounding, ten for slack.
    bound = CAP * (seconds + 1) + 1 + 10
    print(f"\n{function}: {made} refusals in {seconds} s at token.max_refusal_rate = {CAP} (bound {bound:.0f})")
    assert made <= bound, f"{made} refusals in {seconds} s through {function}: the tarpit did not hold them at {CAP}/s"
    assert counted == made, "every refusal is still counted in token.events"
    held = log.read_bytes()[log_before:].decode(errors="replace").count(f"pg_token: backend {pid} refused over {CAP} tokens")
    assert held == 1, "the backend logs once that the tarpit holds it"


def test_accepted_tokens_on_a_flooding_connection_never_wait(db, su, admin):
    seconds = 3
    _, good = generate(admin, db, "tarpit-good")
    rng = random.Random(7)
    with capped_role(db, su, CAP) as role, connect(db, role, "tarpit-mixed") as c:
        refused = accepted = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            refuse(c, "check_token", garbage(rng))
            refused += 1
            # 20 accepted validations in one statement, between two refusals.
            n = c.execute("SELECT count(*) FILTER (WHERE (token.check_token(%s)).valid) FROM generate_series(1, 20)",
                          (good,)).fetchone()[0]
            assert n == 20
            accepted += n
    held = CAP * (seconds + 1) + 1 + 10
    print(f"\nmixed: {refused} refusals (bound {held}) and {accepted} accepted validations in {seconds} s")
    assert refused <= held, "the refusals were held"
    # Had accepted validations been held with them, all calls together would be within `held`.
    assert accepted > 3 * held, f"only {accepted} accepted validations in {seconds} s beside {refused} refusals"


def waiting_in_tarpit(su, pid):
    """Waits (up to 10 s) until `pid` runs a statement and sleeps on its latch (the tarpit)."""
    for _ in range(500):
        row = su.execute("SELECT state, wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        if row == ("active", "Extension"):
            return True
        time.sleep(0.02)
    return False


# A statement of 1,000 refusals: at token.max_refusal_rate = 1 it would take over 16 minutes.
SLOW = "SELECT count(*) FROM generate_series(1, 1000) g WHERE NOT (token.check_token('e2e-tarpit-' || g)).valid"


def run_in_thread(c, sql):
    """Runs `sql` on `c` in a thread; returns (thread, outcome dict with 'error' once it ends)."""
    outcome = {}

    def run():
        try:
            outcome["rows"] = c.execute(sql).fetchall()
        except psycopg.Error as e:
            outcome["error"] = e
        outcome["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, outcome


def test_a_cancel_ends_a_wait_in_the_tarpit_at_once(db, su, admin):
    _, good = generate(admin, db, "tarpit-cancel")
    with capped_role(db, su, 1) as role, connect(db, role, "tarpit-cancel") as c:
        pid = c.info.backend_pid
        t, outcome = run_in_thread(c, SLOW)
        assert waiting_in_tarpit(su, pid), "the flooding backend was never seen waiting"
        # While it waits it holds no lock beyond its statement's: writers are not held up.
        modes = {m for (m,) in su.execute("SELECT mode FROM pg_locks WHERE pid = %s AND locktype = 'relation'", (pid,))}
        assert modes <= {"AccessShareLock"}, modes
        generate(admin, db, "tarpit-cancel-meanwhile")
        asked = time.monotonic()
        assert su.execute("SELECT pg_cancel_backend(%s)", (pid,)).fetchone()[0] is True
        t.join(30)
        assert not t.is_alive(), "a cancel did not end the wait"
        assert isinstance(outcome.get("error"), psycopg.errors.QueryCanceled), outcome
        print(f"\ncancel: the statement ended {1000 * (outcome['at'] - asked):.0f} ms after pg_cancel_backend")
        # The connection goes on; an accepted token does not wait, whatever the refusals owe.
        assert c.execute("SELECT valid FROM token.check_token(%s)", (good,)).fetchone()[0] is True


def test_a_statement_timeout_ends_a_wait_in_the_tarpit(db, su):
    with capped_role(db, su, 1) as role, connect(db, role, "tarpit-timeout") as c:
        c.execute("SET statement_timeout = '300ms'")
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            c.execute(SLOW)


def test_a_terminate_ends_a_wait_in_the_tarpit(db, su):
    with capped_role(db, su, 1) as role:
        c = connect(db, role, "tarpit-terminate")
        pid = c.info.backend_pid
        t, outcome = run_in_thread(c, SLOW)
        assert waiting_in_tarpit(su, pid)
        assert su.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0] is True
        t.join(30)
        assert not t.is_alive(), "a terminate did not end the wait"
        assert isinstance(outcome.get("error"), psycopg.errors.AdminShutdown), outcome
        c.close()
        for _ in range(500):
            if su.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == 0:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the terminated backend is still there")


def test_zero_turns_the_tarpit_off(db, su):
    seconds = 1.5
    rng = random.Random(0)
    with capped_role(db, su, 0) as role, connect(db, role, "tarpit-off") as c:
        made = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            refuse(c, "check_token", garbage(rng))
            made += 1
    print(f"\ntarpit off: {made} refusals in {seconds} s")
    # What the other tests' bounds rely on: an unheld connection refuses far more than CAP a second.
    assert made > 3 * (CAP * (seconds + 1) + 11), made
