"""How the event writer records last use (src/events/last_use.rs): each batch updates the rows
directly, without locking them first (a row lock is a WAL record and a tuple write of its own);
a row lock held longer than the writer's 50 ms wait costs only that token's update, never the
batch or the queue."""

import time

import pytest

from conftest import flush, generate


def validate_all(db, tokens):
    """Each token once, in a session that queues a last-use update on every use (the setting
    is a superuser's)."""
    with db.su() as app:
        app.execute("SET token.last_used_interval = 0")
        for t in tokens:
            assert app.execute("SELECT valid FROM token.check_token(%s)", (t,)).fetchone()[0] is True


def used(su, ids):
    rows = su.execute("SELECT id, last_used_at IS NOT NULL FROM token.tokens WHERE id = ANY(%s)", (ids,)).fetchall()
    return {i: u for i, u in rows}


def test_last_use_updates_write_no_row_lock_records(db, su, admin):
    if not su.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_walinspect'").fetchone():
        pytest.skip("pg_walinspect (PostgreSQL 15 and later) reads the WAL records")
    su.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    made = [generate(admin, db, "acme") for _ in range(40)]
    ids = [i for i, _ in made]
    flush(su)
    lsn0 = su.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    validate_all(db, [t for _, t in made])
    flush(su)
    lsn1 = su.execute("SELECT pg_current_wal_flush_lsn()").fetchone()[0]
    assert all(used(su, ids).values()), "every use was recorded"
    # Nothing else in this cluster locks or updates rows meanwhile: the heap records between
    # the two LSNs are the writer's.
    records = dict(su.execute("SELECT record_type, count(*) FROM pg_get_wal_records_info(%s, %s) "
                              "WHERE resource_manager = 'Heap' GROUP BY 1", (lsn0, lsn1)).fetchall())
    hot = records.get("HOT_UPDATE", 0)
    moved = records.get("UPDATE", 0) + records.get("UPDATE+INIT", 0)
    assert hot + moved >= len(ids), records
    # An update whose new version goes to another page marks the old one locked first (one
    # LOCK record each, Postgres' heap_update); locking the rows before updating them would
    # add one per row on top.
    assert records.get("LOCK", 0) <= moved, f"the writer locked rows before updating them: {records}"


def test_a_row_lock_held_costs_only_that_tokens_last_use(db, su, admin):
    (locked, t_locked), (free1, t_free1), (free2, t_free2) = (generate(admin, db, "acme") for _ in range(3))
    log = db.data / "server.log"
    log_before = log.stat().st_size
    flush(su)
    with db.su() as locker:
        locker.execute("BEGIN")
        locker.execute("SELECT 1 FROM token.tokens WHERE id = %s FOR UPDATE", (locked,))
        try:
            validate_all(db, [t_free1, t_locked, t_free2])
            started = time.monotonic()
            flush(su)
            waited = time.monotonic() - started
            assert used(su, [locked, free1, free2]) == {locked: False, free1: True, free2: True}
        finally:
            locker.execute("ROLLBACK")
    # Well under the writer's 10 s lock timeout: it gave way, it did not wait the lock out.
    assert waited < 5, waited
    with open(log, "rb") as f:
        f.seek(log_before)
        assert b"a lock wait of its last-use updates gave way (canceling statement due to lock timeout)" in f.read()
    # The lock gone, the next use is recorded.
    validate_all(db, [t_locked])
    flush(su)
    assert used(su, [locked]) == {locked: True}
