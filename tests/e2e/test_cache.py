"""The per-backend validation cache: zero staleness across sessions, and a size bound.

Session A validates (and so caches); session B changes something and commits; A's very
next call must see it. cache_stats() proves A really answered from its cache before.
"""

import time

import pytest

from conftest import generate, reason_of


def cached_entries(conn):
    return conn.execute("SELECT entries FROM token.cache_stats()").fetchone()[0]


@pytest.fixture()
def session_a(db):
    with db.connect("e2e_app", autocommit=True) as c:
        yield c


def warm(conn, token, caller=None):
    """Validates until the verdict is served from the cache (the entry count stops growing)."""
    assert reason_of(conn, token, caller) is None
    before = cached_entries(conn)
    assert before >= 1, "the first validation filled the cache"
    assert reason_of(conn, token, caller) is None
    assert cached_entries(conn) == before, "the second validation was a hit"


def test_revoke_in_another_session_is_seen_at_once(db, admin, session_a):
    token_id, token = generate(admin, db, "acme")
    warm(session_a, token)
    admin.execute("SELECT token.revoke_token(%s)", (token_id,))
    assert reason_of(session_a, token) == "revoked"


def test_uncommitted_revoke_is_not_seen_committed_is(db, admin, session_a):
    token_id, token = generate(admin, db, "acme")
    warm(session_a, token)
    with db.connect("e2e_admin") as b:
        b.execute("SELECT token.revoke_token(%s)", (token_id,))
        assert reason_of(session_a, token) is None, "B has not committed"
        b.commit()
    assert reason_of(session_a, token) == "revoked"


def test_rotation_past_grace_is_seen(db, admin, session_a):
    token_id, token = generate(admin, db, "acme")
    warm(session_a, token)
    admin.execute("SELECT token.rotate_token(%s, grace => '0 seconds')", (token_id,))
    assert reason_of(session_a, token) == "revoked"


def test_grace_deadline_is_checked_against_the_clock_on_every_hit(db, admin, session_a):
    token_id, token = generate(admin, db, "acme")
    _, new = admin.execute("SELECT token_id, token FROM token.rotate_token(%s, grace => '1 second')", (token_id,)).fetchone()
    db.record(new)
    warm(session_a, token)  # cached while inside the grace window
    entries = cached_entries(session_a)
    time.sleep(1.2)  # nothing changes in the database: only the clock moves
    assert reason_of(session_a, token) == "revoked"
    assert reason_of(session_a, new) is None
    assert cached_entries(session_a) >= entries


def test_expiry_is_checked_against_the_clock_on_every_hit(db, admin, session_a):
    _, token = generate(admin, db, "acme", expires_in="1 second")
    warm(session_a, token)
    time.sleep(1.2)
    assert reason_of(session_a, token) == "expired"


def test_changed_key_type_is_seen(db, su, admin, session_a):
    su.execute("SELECT token.create_key_type('boss', can_validate => '{agent}')")
    su.execute("SELECT token.register_prefix('e2eboss_', 'boss', 'dev')")
    _, agent = generate(admin, db, "acme")
    _, boss = generate(admin, db, "acme", key_type="boss")
    warm(session_a, agent, caller=boss)
    su.execute("SELECT token.create_key_type('boss', can_validate => '{}', replace => true)")
    assert reason_of(session_a, agent, boss) == "caller_not_permitted"


def test_changed_scopes_are_seen(db, su, admin, session_a):
    token_id, token = generate(admin, db, "acme", scopes=["read", "write"])
    assert reason_of(session_a, token, scope="write") is None
    su.execute("UPDATE token.tokens SET scopes = '{read}' WHERE id = %s", (token_id,))
    assert reason_of(session_a, token, scope="write") == "insufficient_scope"


def test_deleted_prefix_is_seen(db, su, admin, session_a):
    su.execute("SELECT token.create_key_type('temp')")
    su.execute("SELECT token.register_prefix('e2etmp-', 'temp', 'dev')")
    _, token = generate(admin, db, "acme", key_type="temp")
    warm(session_a, token)
    assert su.execute("SELECT token.unregister_prefix('e2etmp-')").fetchone()[0] is True
    assert reason_of(session_a, token) == "unknown_prefix"


def test_deleted_token_row_is_seen(db, su, admin, session_a):
    token_id, token = generate(admin, db, "acme")
    warm(session_a, token)
    su.execute("DELETE FROM token.tokens WHERE id = %s", (token_id,))
    assert reason_of(session_a, token) == "not_found"


def test_cache_honours_its_size_bound(db, su, admin):
    n = 3000
    rows = su.execute("SELECT token FROM generate_series(1, %s) i, "
                      "LATERAL token.generate_token('bulk-' || i, 'agent') g", (n,)).fetchall()
    tokens = [db.record(r[0]) for r in rows]
    with db.su() as a:
        a.execute("SET token.cache_size = '64kB'")
        budget = a.execute("SELECT budget FROM token.cache_stats()").fetchone()[0]
        assert budget == 64 * 1024
        peak = 0
        for t in tokens:
            assert a.execute("SELECT account FROM token.validate_token(%s)", (t,), prepare=True).fetchone()[0].startswith("bulk-")
            entries, used, budget = a.execute("SELECT entries, bytes, budget FROM token.cache_stats()").fetchone()
            assert used <= budget, (entries, used, budget)
            peak = max(peak, entries)
        assert 0 < peak < n, f"the cache must evict: peak {peak} entries for {n} distinct tokens"
        # Every token still validates after eviction (served by the index path).
        assert all(reason_of(a, t) is None for t in tokens[:50])
        # A bigger budget holds them all.
        a.execute("SET token.cache_size = '16MB'")
        for t in tokens:
            a.execute("SELECT token.validate_token(%s)", (t,), prepare=True)
        assert a.execute("SELECT entries FROM token.cache_stats()").fetchone()[0] >= n
