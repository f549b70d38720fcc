"""The validation cache all backends share (token.shared_cache_size): a token one backend read
is a copy for the next, with the same zero-staleness promise as each backend's own cache.

The sessions here set token.cache_size = 0, so every answer comes from the shared cache or the
table; token.shared_cache_stats() counts the shared hits and fills (server-wide, and nothing
else validates while a test runs), which proves which one answered.
"""

import time

import pytest

from conftest import generate, reason_of, revoke_held_open


def shared_counts(conn):
    return conn.execute("SELECT hits_total, fills_total FROM token.shared_cache_stats()").fetchone()


@pytest.fixture()
def shared_only(db):
    """Two sessions without a cache of their own."""
    with db.su() as a, db.su() as b:
        for c in (a, b):
            c.execute("SET token.cache_size = 0")
        yield a, b


def identity(conn, token):
    return conn.execute("SELECT v::text FROM token.validate_token(%s) v", (token,)).fetchone()[0]


def test_the_shared_cache_is_on_by_default_and_sized_by_its_setting(su):
    capacity, size, enabled = su.execute("SELECT capacity, bytes, enabled FROM token.shared_cache_stats()").fetchone()
    setting = su.execute("SELECT setting::bigint * 1024 FROM pg_settings WHERE name = 'token.shared_cache_size'").fetchone()[0]
    assert enabled and size == setting and setting > 0
    assert setting // 512 < capacity <= setting // 400, "about 450 bytes an entry"
    su.execute("SET token.shared_cache = off")
    assert su.execute("SELECT enabled FROM token.shared_cache_stats()").fetchone()[0] is False


def test_a_token_one_backend_read_is_a_shared_hit_for_another(db, admin, shared_only):
    a, b = shared_only
    _, token = generate(admin, db, "acme", scopes=["read"], metadata='{"plan": "pro"}')
    hits, fills = shared_counts(a)
    from_table = identity(a, token)
    assert shared_counts(a) == (hits, fills + 1), "the first read filled the shared cache"
    assert identity(b, token) == from_table, "another backend gets the same row from it"
    assert shared_counts(b) == (hits + 1, fills + 1)
    b.execute("SET token.shared_cache = off")
    assert identity(b, token) == from_table
    assert shared_counts(b) == (hits + 1, fills + 1), "with token.shared_cache off, the table answers"


def test_a_revoke_drops_only_the_revoked_token_from_the_shared_cache(db, admin, shared_only):
    a, b = shared_only
    revoked_id, revoked = generate(admin, db, "acme")
    _, kept = generate(admin, db, "acme")
    for t in (revoked, kept):
        assert reason_of(a, t) is None
    hits, fills = shared_counts(a)
    admin.execute("SELECT token.revoke_token(%s)", (revoked_id,))
    assert reason_of(b, kept) is None
    assert shared_counts(b) == (hits + 1, fills), "the other token stayed in the shared cache"
    assert reason_of(b, revoked) == "revoked"
    assert shared_counts(b) == (hits + 1, fills + 1), "the revoked token was read from the table, and kept"
    assert reason_of(a, revoked) == "revoked"
    assert shared_counts(a) == (hits + 2, fills + 1), "its revoked row is a shared hit now"


def test_no_shared_entry_answers_from_before_a_visible_commit(db, admin, su, shared_only):
    """As test_cache's test of the same name, for the shared cache: while a revoke is visible
    and not yet published (token.test_commit_publish_delay holds it 3 s), a session without a
    cache of its own is refused, and another token is still a shared hit."""
    a, _ = shared_only
    token_id, token = generate(admin, db, "acme")
    _, other = generate(admin, db, "acme")
    for t in (token, other):
        assert reason_of(a, t) is None
    with revoke_held_open(db, su, token_id) as done:
        hits, _ = shared_counts(a)
        assert reason_of(a, token) == "revoked", "a visible revoke is never answered from the shared cache"
        assert reason_of(a, other) is None
        assert not done.is_set(), "still inside the window"
        assert shared_counts(a)[0] == hits + 1, "the other token was a shared hit, the revoked one not"
    assert reason_of(a, token) == "revoked"


def test_a_transaction_s_own_change_wins_over_the_shared_cache(db, admin, shared_only):
    a, b = shared_only
    token_id, token = generate(admin, db, "acme")
    assert reason_of(a, token) is None
    b.execute("BEGIN")
    b.execute("SELECT token.revoke_token(%s)", (token_id,))
    assert reason_of(b, token) == "revoked", "its own uncommitted revoke"
    assert reason_of(a, token) is None, "not committed"
    b.execute("ROLLBACK")
    assert reason_of(b, token) is None


def test_a_registry_change_and_a_truncation_empty_the_shared_cache(db, admin, su, shared_only):
    a, b = shared_only
    _, token = generate(admin, db, "acme")
    assert reason_of(a, token) is None
    hits, fills = shared_counts(a)
    su.execute("SELECT token.create_key_type('shared_cache_probe')")
    assert reason_of(b, token) is None
    assert shared_counts(b) == (hits, fills + 1), "read from the table again, and kept"
    assert reason_of(a, token) is None
    assert shared_counts(a) == (hits + 1, fills + 1)
    # A truncation, in a transaction rolled back: the notice of it never went out.
    a.execute("BEGIN")
    a.execute("TRUNCATE token.tokens CASCADE")
    assert reason_of(a, token) == "not_found"
    a.execute("ROLLBACK")
    assert reason_of(b, token) is None
    assert shared_counts(b)[0] == hits + 2, "a rolled-back truncation leaves the shared cache alone"


def test_each_database_meets_only_its_own_rows(db, admin, su, shared_only):
    """The same token row in two databases, with different accounts: each database's sessions
    get their own database's row, from the table first and then from the shared cache."""
    a, _ = shared_only
    token_id, token = generate(admin, db, "acme")
    row = su.execute("SELECT t::text FROM token.tokens t WHERE id = %s", (token_id,)).fetchone()[0]
    other = "pgt_e2e_shared_other"
    with db.su("postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {other} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {other}")
    try:
        with db.su(other) as o, db.su(other) as o2:
            o.execute("CREATE EXTENSION pg_token")
            o.execute("SELECT token.create_key_type('agent')")
            o.execute("SELECT token.register_prefix('e2e-', 'agent', 'dev')")
            o.execute("INSERT INTO token.tokens SELECT (%s::token.tokens).*", (row,))
            o.execute("UPDATE token.tokens SET account = 'other-db' WHERE id = %s", (token_id,))
            for c in (o, o2):
                c.execute("SET token.cache_size = 0")
            assert a.execute("SELECT account FROM token.validate_token(%s)", (token,)).fetchone()[0] == "acme"
            hits, fills = shared_counts(a)
            assert o.execute("SELECT account FROM token.validate_token(%s)", (token,)).fetchone()[0] == "other-db"
            assert o2.execute("SELECT account FROM token.validate_token(%s)", (token,)).fetchone()[0] == "other-db"
            assert shared_counts(a) == (hits + 1, fills + 1), "the other database filled its own entry and hit it"
            assert a.execute("SELECT account FROM token.validate_token(%s)", (token,)).fetchone()[0] == "acme"
    finally:
        with db.su("postgres") as c:
            c.execute(f"DROP DATABASE IF EXISTS {other} WITH (FORCE)")


def touches_queued(su):
    """Last uses queued in this database since its queue slot was claimed (waiting, written or
    dropped)."""
    return su.execute("SELECT coalesce(sum(touches_queued + touches_written + touches_dropped), 0) "
                      "FROM token.worker_status() WHERE database = current_database()").fetchone()[0]


def test_a_last_use_one_backend_queued_is_not_queued_again_by_the_next(db, admin, su, shared_only):
    """The event writer's last_used_at updates leave cached rows alone, so a row in the shared
    cache keeps the last_used_at it was read with; the entry also carries the last use any
    backend queued since. B takes the row A read and queued a use of: B queues none within the
    interval (1 s in this suite), and one again after it."""
    a, b = shared_only
    _, token = generate(admin, db, "acme")
    before = touches_queued(su)
    assert reason_of(a, token) is None
    assert reason_of(b, token) is None
    assert touches_queued(su) == before + 1, "one use queued, by A; B took the row and A's use from the shared cache"
    time.sleep(1.2)
    assert reason_of(b, token) is None
    assert touches_queued(su) == before + 2, "after the interval, B queues the next"
