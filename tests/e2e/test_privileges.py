"""Least privilege over TCP: a token_validator can validate and nothing else; a hostile
search_path changes nothing."""

import pytest

from conftest import generate, reason_of, refusal

DENIED = [
    ("read tokens", "SELECT count(*) FROM token.tokens"),
    ("read the token list", "SELECT count(*) FROM token.token_list"),
    ("read events", "SELECT count(*) FROM token.events"),
    ("read key types", "SELECT count(*) FROM token.key_types"),
    ("read prefixes", "SELECT count(*) FROM token.prefixes"),
    ("unregister prefix", "SELECT token.unregister_prefix('e2e-')"),
    ("flush events", "SELECT token.flush_events()"),
    ("writer status", "SELECT * FROM token.worker_status()"),
    ("write tokens", "UPDATE token.tokens SET revoked_at = NULL"),
    ("generate", "SELECT token.generate_token('acme', 'agent')"),
    ("rotate", "SELECT token.rotate_token(gen_random_uuid())"),
    ("rotate own", "SELECT token.rotate_own_token('e2e-x')"),
    ("revoke", "SELECT token.revoke_token(gen_random_uuid())"),
    ("revoke account", "SELECT token.revoke_account_tokens('acme')"),
    ("create key type", "SELECT token.create_key_type('sneaky')"),
    ("register prefix", "SELECT token.register_prefix('sneaky-', 'agent', 'prod')"),
    ("purge events", "SELECT token.purge_events()"),
    ("fire the cache trigger", "SELECT token.invalidate_caches()"),
]


@pytest.mark.parametrize("what, sql", DENIED, ids=[d[0] for d in DENIED])
def test_validator_is_denied(db, app, what, sql):
    err = refusal(app, sql)
    assert err.sqlstate == "42501", f"{what}: {err.sqlstate} {err}"


@pytest.mark.parametrize("sql, sqlstate", [
    # Superuser-only settings: insufficient_privilege.
    ("SET token.environment = 'prod'", "42501"),
    ("SELECT set_config('token.environment', 'prod', false)", "42501"),
    ("SET token.cache_size = '1GB'", "42501"),
    ("SET token.last_used_interval = 0", "42501"),
    ("SET token.log_events = off", "42501"),
    ("SET token.max_token_depth = 16", "42501"),
    ("SET token.max_child_tokens = 100000", "42501"),
    ("SET token.jwt_leeway = 300", "42501"),
    ("SET token.max_refusal_rate = 0", "42501"),
    ("SET token.shared_cache = off", "42501"),
    # The test hook that holds a commit's publication (hidden from SHOW ALL, so listed by hand).
    ("SET token.test_commit_publish_delay = 1000", "42501"),
    ("ALTER ROLE e2e_app SET token.environment = 'prod'", "42501"),
    ("ALTER SYSTEM SET token.environment = 'prod'", "42501"),
    # Server-wide settings (postgresql.conf and a reload): no session can SET them at all.
    ("SET token.event_retention = 0", "55P02"),
    ("SET token.worker_idle_timeout = '1h'", "55P02"),
    ("SET token.min_event_retention = 0", "55P02"),
    ("SET token.max_event_rows = 100000", "55P02"),
    ("SET token.event_window = 1", "55P02"),
    ("SET token.max_event_hints = 10000", "55P02"),
    ("SET token.flood_nice = 0", "55P02"),
    # Shared memory is sized at server start.
    ("SET token.shared_cache_size = '1GB'", "55P02"),
])
def test_validator_cannot_change_settings(db, app, sql, sqlstate):
    err = refusal(app, sql)
    assert err.sqlstate == sqlstate, f"{sql}: {err.sqlstate} {err}"
    assert app.execute("SHOW token.environment").fetchone()[0] == "dev"


def test_every_token_setting_is_covered_above(app):
    names = {r[0] for r in app.execute("SELECT name FROM pg_settings WHERE name LIKE 'token.%'")}
    assert names == {"token.environment", "token.cache_size", "token.last_used_interval", "token.log_events",
                     "token.event_retention", "token.worker_idle_timeout", "token.min_event_retention",
                     "token.max_event_rows", "token.event_window", "token.max_event_hints", "token.flood_nice",
                     "token.max_token_depth", "token.max_child_tokens", "token.jwt_leeway", "token.legacy_notice",
                     "token.max_refusal_rate", "token.shared_cache_size", "token.shared_cache"}


def test_validator_validates(db, admin, app):
    _, token = generate(admin, db, "acme")
    assert app.execute("SELECT account FROM token.validate_token(%s)", (token,)).fetchone()[0] == "acme"
    assert app.execute("SELECT account FROM token.authenticate(%s)", (token,)).fetchone()[0] == "acme"
    assert reason_of(app, token) is None


def test_admin_reads_the_list_and_events_but_not_hashes(db, admin):
    assert admin.execute("SELECT count(*) >= 0 FROM token.token_list").fetchone()[0]
    assert admin.execute("SELECT count(*) >= 0 FROM token.events").fetchone()[0]
    assert refusal(admin, "SELECT token_hash FROM token.tokens").sqlstate == "42501"


@pytest.fixture()
def evil(db, su):
    """A schema full of shadows: operators that say every bytea/text is equal, a frozen clock,
    look-alike tables. The roles under test may use it and put it first."""
    su.execute("DROP SCHEMA IF EXISTS evil CASCADE")
    su.execute("CREATE SCHEMA evil")
    for ddl in [
        "CREATE FUNCTION evil.eq(bytea, bytea) RETURNS boolean LANGUAGE sql AS 'SELECT true'",
        "CREATE OPERATOR evil.= (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = evil.eq)",
        "CREATE FUNCTION evil.eq(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true'",
        "CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq)",
        "CREATE FUNCTION evil.eq(uuid, uuid) RETURNS boolean LANGUAGE sql AS 'SELECT true'",
        "CREATE OPERATOR evil.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = evil.eq)",
        "CREATE FUNCTION evil.lt(timestamptz, timestamptz) RETURNS boolean LANGUAGE sql AS 'SELECT false'",
        "CREATE OPERATOR evil.<= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = evil.lt)",
        "CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS $$SELECT '1999-01-01'::timestamptz$$",
        "CREATE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE sql AS $$SELECT '1999-01-01'::timestamptz$$",
        "CREATE FUNCTION evil.digest(bytea, text) RETURNS bytea LANGUAGE sql AS $$SELECT '\\x00'::bytea$$",
        "CREATE TABLE evil.tokens (LIKE token.tokens)",
        "CREATE TABLE evil.key_types (LIKE token.key_types)",
        "CREATE TABLE evil.prefixes (LIKE token.prefixes)",
        "CREATE TABLE evil.events (LIKE token.events)",
        "GRANT USAGE ON SCHEMA evil TO PUBLIC",
        "GRANT ALL ON ALL TABLES IN SCHEMA evil TO PUBLIC",
    ]:
        su.execute(ddl)
    yield "evil, token, pg_catalog, public"
    su.execute("DROP SCHEMA evil CASCADE")


def test_hostile_search_path_changes_nothing(db, su, admin, app, evil):
    _, good = generate(admin, db, "acme")
    revoked_id, revoked = generate(admin, db, "acme")
    admin.execute("SELECT token.revoke_token(%s)", (revoked_id,))
    for conn in (app, admin):
        conn.execute(f"SET search_path = {evil}")
    forged = good[:-7] + ("B" if good[-7] == "A" else "A") + good[-6:]  # body changed, checksum kept
    assert reason_of(app, forged) == "bad_checksum"
    assert reason_of(app, good) is None
    assert reason_of(app, revoked) == "revoked"
    assert reason_of(app, "e2e-" + "Z" * 28) in ("bad_checksum", "not_found")

    # Admin functions under the hostile path still write the real tables with the real clock.
    new_id, new_token = admin.execute("SELECT token_id, token FROM token.generate_token('acme', 'agent', expires_in => '1 day')").fetchone()
    db.record(new_token)
    assert reason_of(app, new_token) is None
    assert admin.execute("SELECT token.revoke_token(%s)", (new_id,)).fetchone()[0] is True
    assert reason_of(app, new_token) == "revoked"
    assert reason_of(app, good) is None, "revoking one token revoked nothing else"
    assert su.execute("SELECT (SELECT count(*) FROM evil.tokens) + (SELECT count(*) FROM evil.events) "
                      "+ (SELECT count(*) FROM evil.key_types) + (SELECT count(*) FROM evil.prefixes)").fetchone()[0] == 0
    assert su.execute("SELECT expires_at > now() FROM token.tokens WHERE id = %s", (new_id,)).fetchone()[0]
