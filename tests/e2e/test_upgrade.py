"""The upgrade path: a database that installed an earlier release keeps every token's verdict
through ALTER EXTENSION pg_token UPDATE, ends with exactly the catalog of a fresh install, and
is served by the new library even before it is updated.

Run on every supported PostgreSQL by scripts/test.sh (and the whole end-to-end suite runs once
more on a database upgraded from 0.1.0: PGT_UPGRADE_FROM in conftest.py).
"""

import pathlib

import psycopg
import pytest

from conftest import ALPHABET, ROOT, compose

CATALOG_SQL = (ROOT / "tests" / "upgrade" / "catalog.sql").read_text()
# Released versions, oldest first: every one must upgrade to the library's version.
RELEASED = sorted(
    p.name[len("pg_token--"):-len(".sql")]
    for p in (ROOT / "sql").glob("pg_token--*.sql")
    if p.name.count("--") == 1
)
VERDICT = ("SELECT valid, reason, token_id, account, key_type, environment, scopes, name, expires_at, "
           "revoke_after, metadata FROM token.check_token(%s, %s, %s)")


def fresh_database(su, name):
    su.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    su.execute(f"CREATE DATABASE {name}")


def catalog(conn):
    return [r[0] for r in conn.execute(CATALOG_SQL).fetchall()]


def library_version(conn):
    return conn.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'pg_token'").fetchone()[0]


def body(n):
    """A distinct 22-character base62 body."""
    return (ALPHABET[n % 62] + ALPHABET[(n // 62) % 62]) * 11


def fill(c, env):
    """Writes a registry and tokens into a 0.1.0 database exactly as 0.1.0's functions wrote
    them: generate_token's INSERT (hash, hint, prefix, account as given, no family), rotate's
    successor (rotated_from) and revoke_after, revoke's revoked_at. The 0.1.0 library cannot be
    loaded next to this one, and this one refuses 0.1.0-schema writes (55000), so the rows are
    written here, in SQL, from tokens composed as src/core/format.rs composes them. Returns
    the cases to judge: name -> (token, caller_token, required_scope)."""
    c.execute("INSERT INTO token.key_types (name, allowed_scopes, max_ttl) VALUES ('agent', '{read,write}', '90 days')")
    c.execute("INSERT INTO token.key_types (name, can_validate) VALUES ('mid', '{agent}')")
    c.execute("INSERT INTO token.prefixes (prefix, key_type, environment) VALUES "
              "('upg-', 'agent', 'dev'), ('upgprd-', 'agent', 'prod'), ('upgmid_', 'mid', 'dev')")
    counter = iter(range(1, 10_000))

    def gen(account, key_type="agent", prefix="upg-", scopes="{}", expires="NULL", name=None, rotated_from=None):
        token = env.record(compose(prefix, body(next(counter))))
        row = c.execute(
            "INSERT INTO token.tokens (token_hash, hint, prefix, account, key_type, environment, name, scopes, "
            "metadata, expires_at, rotated_from) VALUES (sha256(%s::bytea), %s, %s, %s, %s, 'dev', %s, %s, "
            f"'{{\"n\": 12345678901234567890123}}', {expires}, %s) RETURNING id",
            (token.encode(), token[:len(prefix) + 4], prefix, account, key_type, name, scopes, rotated_from)).fetchone()
        return token, row[0]

    live, _ = gen("acme", scopes="{read}")
    writer, _ = gen("acme", scopes="{read,write}", expires="now() + interval '30 days'", name="ci")
    rotating, rotating_id = gen("acme")
    successor, _ = gen("acme", rotated_from=rotating_id)
    c.execute("UPDATE token.tokens SET revoke_after = clock_timestamp() + interval '1 hour' WHERE id = %s", (rotating_id,))
    grandchild_parent, gp_id = gen("acme")
    child, child_id = gen("acme", rotated_from=gp_id)
    c.execute("UPDATE token.tokens SET revoke_after = clock_timestamp() WHERE id = %s", (gp_id,))
    revoked, revoked_id = gen("acme")
    c.execute("UPDATE token.tokens SET revoked_at = clock_timestamp(), revoked_reason = 'test' WHERE id = %s", (revoked_id,))
    globex, globex_id = gen("globex")
    c.execute("UPDATE token.tokens SET revoked_at = clock_timestamp() WHERE account = 'globex'")
    expired, _ = gen("acme", expires="now() - interval '1 second'")
    mid, _ = gen("acme", key_type="mid", prefix="upgmid_")
    # 0.1.0 stored accounts as given: '0042' and '42' were two accounts to revoke_account_tokens
    # and cross_account but one tenant to current_account_bigint(). 0.2.0 makes them one.
    zero_padded, _ = gen("0042")
    mid_42, _ = gen("42", key_type="mid", prefix="upgmid_")
    cases = {
        "live": (live, None, None),
        "live, needs write": (live, None, "write"),
        "writer, needs write": (writer, None, "write"),
        "rotating (in grace)": (rotating, None, None),
        "successor": (successor, None, None),
        "rotated with no grace": (grandchild_parent, None, None),
        "second generation": (child, None, None),
        "revoked": (revoked, None, None),
        "account revoked": (globex, None, None),
        "expired": (expired, None, None),
        "mid validates agent": (live, mid, None),
        "agent validates mid": (mid, live, None),
        "prod token in dev": (compose("upgprd-", "a" * 22), None, None),
        "never issued": (compose("upg-", "b" * 22), None, None),
        "bad checksum": (live[:-1] + ("0" if live[-1] != "0" else "1"), None, None),
        "malformed": ("upg-'; DROP TABLE token.tokens; --", None, None),
    }
    # Judged separately: the update merges these two spellings into one account.
    spelled = {"0042 validated by a mid of 42": (zero_padded, mid_42, None)}
    return cases, spelled


def verdicts(conn, cases):
    return {name: conn.execute(VERDICT, args).fetchone() for name, args in cases.items()}


def exercise_old_functions(c, env):
    """Calls every function of the old release; each must work or refuse clearly (55000 with a
    hint to update), never fail with an internal error or crash the backend."""
    statements = [
        "SELECT token.create_key_type('between', replace => true)",
        "SELECT token.register_prefix('btw-', 'between', 'dev')",
        "SELECT token FROM token.generate_token('acme', 'between')",
        "SELECT token FROM token.rotate_token((SELECT id FROM token.token_list WHERE prefix = 'btw-' LIMIT 1))",
        "SELECT token.revoke_token((SELECT id FROM token.token_list WHERE prefix = 'btw-' ORDER BY created_at LIMIT 1))",
        "SELECT token.revoke_account_tokens('nobody')",
        "SELECT token.unregister_prefix('btw-')",
        "SELECT token.purge_events('3650 days')",
        "SELECT token.flush_events('10 s')",
        "SELECT count(*) FROM token.worker_status()",
        "SELECT entries FROM token.cache_stats()",
        "SELECT count(*) FROM token.reasons()",
        "SELECT token.hash_token('upg-x')",
        "SELECT count(*) FROM token.token_list",
        "SELECT count(*) FROM token.events",
    ]
    outcomes = {}
    for sql in statements:
        try:
            row = c.execute(sql).fetchone()
            if row and isinstance(row[0], str) and row[0].startswith("btw-"):
                env.record(row[0])
            outcomes[sql] = "ok"
        except psycopg.Error as e:
            assert e.sqlstate == "55000" and "ALTER EXTENSION pg_token UPDATE" in (e.diag.message_hint or ""), \
                f"{sql}: {e.sqlstate} {e}"
            outcomes[sql] = "refused"
    return outcomes


@pytest.mark.parametrize("old", RELEASED)
def test_an_upgraded_database_keeps_every_verdict_and_matches_a_fresh_install(env, old):
    with env.su("postgres") as su:
        target = library_version(su)
        if old == target:
            pytest.skip(f"{old} is the library's own version")
        fresh_database(su, "pgt_upgrade")
        fresh_database(su, "pgt_fresh")
    try:
        with env.su("pgt_upgrade") as c:
            c.execute(f"CREATE EXTENSION pg_token VERSION '{old}'")
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_token'").fetchone()[0] == old
            cases, spelled = fill(c, env)
            before = verdicts(c, cases)
            assert before["live"][0] and before["successor"][0] and before["rotating (in grace)"][0]
            assert [before[k][1] for k in ("revoked", "account revoked", "expired", "rotated with no grace")] == \
                ["revoked", "revoked", "expired", "revoked"]
            assert verdicts(c, spelled)["0042 validated by a mid of 42"][1] == "cross_account", "0.1.0's two spellings"

        # The package is upgraded (the new library serves), ALTER EXTENSION not yet run: a new
        # session sees the old SQL with the new library.
        with env.su("pgt_upgrade") as c:
            assert verdicts(c, cases) == before, "the new library judges the old schema's tokens the same"
            exercise_old_functions(c, env)
            c.execute("ALTER EXTENSION pg_token UPDATE")
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_token'").fetchone()[0] == target

        with env.su("pgt_upgrade") as c:
            after = verdicts(c, cases)
            # Every case made before the update has exactly its old verdict.
            assert after == before
            assert verdicts(c, spelled)["0042 validated by a mid of 42"][0] is True, "one account now"
            families = c.execute("SELECT count(DISTINCT family_id), count(*) FILTER (WHERE family_id IS NULL) "
                                 "FROM token.tokens WHERE rotated_from IS NOT NULL OR id IN "
                                 "(SELECT rotated_from FROM token.tokens)").fetchone()
            assert families == (2, 0), f"each rotation lineage became one family: {families}"
            upgraded = catalog(c)
            # The new release works on the upgraded database: issue, validate, rotate, revoke.
            tid, tok = c.execute("SELECT token_id, token FROM token.generate_token('acme', 'agent')").fetchone()
            env.record(tok)
            assert c.execute("SELECT account FROM token.validate_token(%s)", (tok,)).fetchone()[0] == "acme"
            new = env.record(c.execute("SELECT token FROM token.rotate_token(%s, '0')", (tid,)).fetchone()[0])
            assert c.execute("SELECT reason FROM token.check_token(%s)", (tok,)).fetchone()[0] == "revoked"
            assert c.execute("SELECT valid FROM token.check_token(%s)", (new,)).fetchone()[0] is True

        with env.su("pgt_fresh") as c:
            c.execute("CREATE EXTENSION pg_token")
            fresh = catalog(c)
        missing = sorted(set(fresh) - set(upgraded))
        extra = sorted(set(upgraded) - set(fresh))
        assert not missing and not extra, (
            "the upgraded catalog differs from a fresh install\n"
            + "".join(f"  only in fresh:    {x[:300]}\n" for x in missing)
            + "".join(f"  only in upgraded: {x[:300]}\n" for x in extra))
        assert upgraded == fresh, "same facts, in the same order"
    finally:
        with env.su("postgres") as su:
            su.execute("DROP DATABASE IF EXISTS pgt_upgrade WITH (FORCE)")
            su.execute("DROP DATABASE IF EXISTS pgt_fresh WITH (FORCE)")
