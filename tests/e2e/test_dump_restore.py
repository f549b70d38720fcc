"""pg_dump / pg_restore into a new database keeps every token valid and every revoked one
revoked, with the registry that decides verdicts."""

import os
import subprocess

from conftest import DB, generate, reason_of

PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")  # the server under test


def as_postgres(args, env):
    cmd = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(cmd + args, check=True, capture_output=True, text=True,
                   env={**os.environ, "PGHOST": env.socket, "PGPORT": str(env.port), "PGUSER": "postgres"})


def test_dump_and_restore_keep_every_verdict(db, su, admin, app):
    live_id, live = generate(admin, db, "dumped", scopes=["read"], metadata='{"team": "ops"}')
    dead_id, dead = generate(admin, db, "dumped")
    admin.execute("SELECT token.revoke_token(%s, 'before the dump')", (dead_id,))
    old_id, _ = generate(admin, db, "dumped")
    _, rotated = admin.execute("SELECT token_id, token FROM token.rotate_token(%s)", (old_id,)).fetchone()
    db.record(rotated)
    verdicts = {t: reason_of(app, t) for t in (live, dead, rotated)}
    assert verdicts == {live: None, dead: "revoked", rotated: None}

    # Pending last-use updates land before the dump, not in the middle of the comparison.
    assert su.execute("SELECT token.flush_events()").fetchone()[0]
    dump = db.run / "e2e.dump"
    restored = f"{DB}_restored"
    as_postgres([f"{PGBIN}/pg_dump", "-Fc", "-f", str(dump), DB], db)
    su.execute(f"DROP DATABASE IF EXISTS {restored} WITH (FORCE)")
    su.execute(f"CREATE DATABASE {restored}")
    as_postgres([f"{PGBIN}/pg_restore", "--exit-on-error", "-d", restored, str(dump)], db)

    with db.connect("e2e_app", dbname=restored, autocommit=True) as app2:
        assert {t: reason_of(app2, t) for t in verdicts} == verdicts
        ident = app2.execute("SELECT token_id, scopes, metadata FROM token.validate_token(%s)", (live,)).fetchone()
        assert ident == (live_id, ["read"], {"team": "ops"})
    with db.su(restored) as r:
        def snapshot(conn):
            # Every column but last_used_at: validating in either database moves it (by design,
            # through the writer, at its own pace), and it decides no verdict.
            return conn.execute(
                "SELECT (SELECT array_agg(to_jsonb(t) - 'last_used_at' ORDER BY t.id)::text FROM token.tokens t), "
                "(SELECT array_agg(k ORDER BY k.name)::text FROM token.key_types k), "
                "(SELECT array_agg(p ORDER BY p.prefix)::text FROM token.prefixes p), "
                "(SELECT count(*) FROM token.events)").fetchone()
        assert snapshot(r)[:3] == snapshot(su)[:3], "tokens, key types and prefixes restored exactly"
        assert snapshot(r)[3] > 0, "events restored"
        # The restored sequence continues past the restored events.
        assert r.execute("SELECT nextval('token.events_id_seq') > (SELECT max(id) FROM token.events)").fetchone()[0]
        # Privileges came back with the extension: still nothing for PUBLIC.
        assert r.execute("SELECT has_table_privilege('public', 'token.tokens', 'SELECT')").fetchone()[0] is False
    su.execute(f"DROP DATABASE {restored} WITH (FORCE)")
