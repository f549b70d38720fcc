"""Installing pg_token: it refuses a database it could not serve correctly."""

from conftest import refusal


def test_create_extension_refuses_a_non_utf8_database(db, su):
    su.execute("DROP DATABASE IF EXISTS pgt_e2e_ascii")
    su.execute("CREATE DATABASE pgt_e2e_ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        with db.su("pgt_e2e_ascii") as c:
            err = refusal(c, "CREATE EXTENSION pg_token")
            assert err.sqlstate == "0A000", f"{err.sqlstate} {err}"
            assert "pg_token requires a UTF8 database" in str(err)
            assert err.diag.message_detail == "This database's encoding is SQL_ASCII."
            assert c.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_token'").fetchone()[0] == 0
            assert c.execute("SELECT to_regnamespace('token')").fetchone()[0] is None, "nothing half-installed"
    finally:
        su.execute("DROP DATABASE pgt_e2e_ascii WITH (FORCE)")
