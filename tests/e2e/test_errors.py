"""Errors keep their meaning: Postgres' own SQLSTATEs pass through pg_token's functions, and a
misspelt token.* setting is reported instead of silently kept."""

import pathlib
import subprocess
import tempfile

import psycopg

from conftest import CLUSTER, generate, refusal


def test_a_lock_timeout_inside_revoke_is_55P03_not_an_internal_error(db, su, admin):
    token_id, _ = generate(admin, db, "errors-lock")
    with db.su() as locker:
        locker.autocommit = False
        locker.execute("LOCK TABLE token.tokens IN ACCESS EXCLUSIVE MODE")
        admin.execute("SET lock_timeout = '200ms'")
        err = refusal(admin, "SELECT token.revoke_token(%s)", (token_id,))
        admin.execute("RESET lock_timeout")
        locker.rollback()
    assert err.sqlstate == "55P03", f"{err.sqlstate} {err}"
    assert admin.execute("SELECT revoked_at FROM token.token_list WHERE id = %s", (token_id,)).fetchone()[0] is None


def test_a_serialization_failure_inside_rotate_keeps_its_sqlstate(db, admin):
    token_id, _ = generate(admin, db, "errors-serial")
    with db.connect("e2e_admin") as a, db.connect("e2e_admin") as b:
        a.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        b.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        a.execute("SELECT count(*) FROM token.token_list")
        b.execute("SELECT count(*) FROM token.token_list")
        a.execute("SELECT token.revoke_token(%s)", (token_id,))
        a.commit()
        err = refusal(b, "SELECT token.rotate_token(%s)", (token_id,))
    assert err.sqlstate == "40001", f"{err.sqlstate} {err}"


def test_a_misspelt_setting_in_postgresql_conf_is_a_warning_and_cannot_be_set(db):
    run = pathlib.Path(tempfile.mkdtemp(prefix="pg_token-guc-", dir=db.run))
    subprocess.run(["chown", "postgres:postgres", str(run)], check=True)
    data = run / "data"
    port = subprocess.run(["bash", str(CLUSTER), "free-port"], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(["bash", str(CLUSTER), "start", str(data), port, "token.enviroment = 'prod'"], check=True)
    try:
        log = (data / "server.log").read_text()
        with psycopg.connect(host=str(data), port=port, user="postgres", dbname="postgres", autocommit=True) as c:
            if c.info.server_version >= 150000:
                # MarkGUCPrefixReserved: dropped with a WARNING, and the prefix refuses new names.
                assert 'invalid configuration parameter name "token.enviroment", removing it' in log, log[-2000:]
                err = refusal(c, "SHOW token.enviroment")
                assert err.sqlstate == "42704", f"{err.sqlstate} {err}"
                err = refusal(c, "SET token.enviroment = 'prod'")
                assert err.sqlstate == "42602", f"{err.sqlstate} {err}"
            else:
                # PostgreSQL 14 has no reserved prefixes: EmitWarningsOnPlaceholders warns.
                assert 'unrecognized configuration parameter "token.enviroment"' in log, log[-2000:]
            assert c.execute("SHOW token.environment").fetchone()[0] == "dev"
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(data)], check=False)
