"""The event writer against routine operations (issue 16, part 5): a lock held on token.events
for longer than the writer's lock timeout, pg_cancel_backend on the writer mid-batch, and
databases dropped with records still queued. No refusal may be lost to any of them, and no
dropped database may keep a queue slot.

The counts are exact: every refusal made is in token.events' counts afterwards."""

import threading
import time
import uuid

import psycopg

from conftest import compose, flush

WRITER_LOCK_TIMEOUT_S = 10  # src/events/writer.rs sets lock_timeout = 10s for the writer


def refuse(app, n, key_tag):
    """n refusals of one never-issued token (one key: counted into one row)."""
    token = compose("e2e-", (key_tag * 22)[:22])
    for _ in range(n):
        row = app.execute("SELECT valid FROM token.check_token(%s)", (token,)).fetchone()
        assert row[0] is False


def counted(su, marker):
    return su.execute("SELECT coalesce(sum(count), 0) FROM token.events WHERE application_name = %s",
                      (marker,)).fetchone()[0]


def writer_waiting_on_lock(su, deadline_s=20):
    """The writer's pid once it waits for a table lock (polls pg_stat_activity)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        row = su.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_token writer' "
                         "AND datname = current_database() AND wait_event_type = 'Lock'").fetchone()
        if row:
            return row[0]
        time.sleep(0.05)
    raise AssertionError("the writer never waited on the lock")


def dropped_so_far(su):
    return su.execute("SELECT coalesce(sum(refusals_dropped), 0) FROM token.worker_status() "
                      "WHERE database = current_database()").fetchone()[0]


def test_a_lock_held_past_the_writers_lock_timeout_loses_nothing(db, su):
    """VACUUM FULL token.events (its ACCESS EXCLUSIVE lock, held in an open transaction) for
    longer than the writer's lock timeout, while refusals keep arriving: after release, every
    one is counted."""
    marker = f"lock-{uuid.uuid4()}"
    flush(su)
    before = dropped_so_far(su)
    made = 0
    with db.connect("e2e_app", application_name=marker, autocommit=True) as app, db.su() as locker:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE token.events IN ACCESS EXCLUSIVE MODE")
        try:
            writer_refusals_start = time.monotonic()
            refuse(app, 5, "L")
            made += 5
            writer_waiting_on_lock(su)
            # Keep refusing past the timeout (each of new and counted keys), so the writer is
            # needed all along.
            i = 0
            while time.monotonic() - writer_refusals_start < WRITER_LOCK_TIMEOUT_S + 2:
                refuse(app, 3, "L" if i % 2 else "M")
                made += 3
                i += 1
                time.sleep(0.2)
        finally:
            locker.execute("ROLLBACK")
    assert su.execute("SELECT token.flush_events('30 seconds')").fetchone()[0] is True
    assert counted(su, marker) == made
    assert dropped_so_far(su) == before, "no refusal counted as dropped"


def test_cancelling_the_writer_mid_batch_loses_nothing(db, su):
    """pg_cancel_backend on the writer while it waits to write a batch, three times over: the
    batch is retried, never discarded."""
    marker = f"cancel-{uuid.uuid4()}"
    flush(su)
    before = dropped_so_far(su)
    made = 0
    with db.connect("e2e_app", application_name=marker, autocommit=True) as app, db.su() as locker:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE token.events IN ACCESS EXCLUSIVE MODE")
        try:
            for attempt in range(4):
                refuse(app, 4, "CDEF"[attempt])  # a new key: a row to write at once
                made += 4
                pid = writer_waiting_on_lock(su)
                assert su.execute("SELECT pg_cancel_backend(%s)", (pid,)).fetchone()[0] is True
        finally:
            locker.execute("ROLLBACK")
    assert su.execute("SELECT token.flush_events('30 seconds')").fetchone()[0] is True
    assert counted(su, marker) == made
    assert dropped_so_far(su) == before, "no refusal counted as dropped"


def make_database(db, name):
    with db.su("postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {name}")
    with db.su(name) as c:
        c.execute("CREATE EXTENSION pg_token")
        c.execute("SELECT token.create_key_type('agent')")
        c.execute("SELECT token.register_prefix('e2e-', 'agent', 'dev')")


def test_databases_dropped_with_queued_refusals_free_their_slots(db):
    """Ten databases, each dropped while refusals wait in its queue (count increments wait up
    to a second for more): a database made afterwards still gets a writer and its refusals."""
    names = [f"pgt_drop_{i}" for i in range(10)]
    for name in names:
        make_database(db, name)
        with db.su(name) as c:
            refuse(c, 1, "D")
            flush(c)  # the key's row exists; what follows are count increments
            refuse(c, 5, "D")
            row = c.execute("SELECT refusals_pending FROM token.worker_status() "
                            "WHERE database = current_database()").fetchone()
            assert row is not None, f"{name} got no queue slot"
            assert row[0] > 0, "refusals are queued when the database is dropped"
        with db.su("postgres") as c:
            c.execute(f"DROP DATABASE {name} WITH (FORCE)")
    make_database(db, "pgt_drop_after")
    try:
        with db.su("pgt_drop_after") as c:
            refuse(c, 7, "A")
            assert c.execute("SELECT token.flush_events('20 seconds')").fetchone()[0] is True
            assert c.execute("SELECT coalesce(sum(count), 0) FROM token.events WHERE event = 'refused'").fetchone()[0] == 7
            status = c.execute("SELECT refusals, refusals_written FROM token.worker_status() "
                               "WHERE database = current_database()").fetchone()
            assert status == (7, 7), status
    finally:
        with db.su("postgres") as c:
            c.execute("DROP DATABASE IF EXISTS pgt_drop_after WITH (FORCE)")


def test_only_a_batch_that_cannot_be_written_is_dropped_and_counted(db, su):
    """A data error (a CHECK constraint the rows break) counts against the batch: after three
    attempts it is discarded and counted as dropped, exactly, and the writer goes on."""
    marker = f"baddata-{uuid.uuid4()}"
    flush(su)
    before = dropped_so_far(su)
    su.execute(f"ALTER TABLE token.events ADD CONSTRAINT e2e_reject CHECK (application_name <> '{marker}')")
    try:
        with db.connect("e2e_app", application_name=marker, autocommit=True) as app:
            refuse(app, 6, "B")
        assert su.execute("SELECT token.flush_events('30 seconds')").fetchone()[0] is True
        assert dropped_so_far(su) - before == 6
        assert counted(su, marker) == 0
    finally:
        su.execute("ALTER TABLE token.events DROP CONSTRAINT e2e_reject")
    after = f"gooddata-{uuid.uuid4()}"
    with db.connect("e2e_app", application_name=after, autocommit=True) as app:
        refuse(app, 2, "G")
    flush(su)
    assert counted(su, after) == 2
