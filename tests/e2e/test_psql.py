"""psql ergonomics: every object pg_token installs says what it is for (\\df+, \\dv+, \\dt+, \\dT+
read its comment), and the common mistakes fail with a HINT saying what to do, as a client
receives it."""

import pathlib
import subprocess
import tempfile

import psycopg

from conftest import CLUSTER, ROOT, generate, refusal


def test_every_installed_object_has_a_comment(su):
    missing = su.execute("""
        SELECT pg_catalog.pg_describe_object(d.classid, d.objid, 0)
          FROM pg_catalog.pg_depend d
          JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_token'
         WHERE d.deptype = 'e'
           AND d.classid IN ('pg_catalog.pg_proc'::regclass, 'pg_catalog.pg_type'::regclass,
                             'pg_catalog.pg_class'::regclass, 'pg_catalog.pg_namespace'::regclass)
           -- a table's row type and array types are described by the table / element type
           AND NOT (d.classid = 'pg_catalog.pg_type'::regclass AND EXISTS (
                   SELECT 1 FROM pg_catalog.pg_type t
                    WHERE t.oid = d.objid AND (t.typrelid <> 0 AND (SELECT relkind FROM pg_catalog.pg_class WHERE oid = t.typrelid) <> 'c'
                                               OR t.typelem <> 0 AND t.typlen = -1)))
           -- indexes and sequences are named for what they serve
           AND NOT (d.classid = 'pg_catalog.pg_class'::regclass AND EXISTS (
                   SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = d.objid AND c.relkind IN ('i', 'S')))
           AND pg_catalog.obj_description(d.objid, (SELECT relname FROM pg_catalog.pg_class WHERE oid = d.classid)) IS NULL
         ORDER BY 1""").fetchall()
    assert missing == [], f"objects without a comment: {[m for (m,) in missing]}"


def test_psql_df_shows_the_descriptions(db, su):
    described = su.execute("SELECT obj_description('token.validate_token(text, text, text)'::regprocedure, 'pg_proc')").fetchone()[0]
    assert described
    out = subprocess.run(["psql", "-X", "-h", db.socket, "-p", str(db.port), "-U", "postgres", "-d", "pgt_e2e",
                          "-c", r"\df+ token.validate_token", "-c", r"\dv+ token.*"],
                         check=True, capture_output=True, text=True).stdout
    assert described in out, out
    for line in out.splitlines():
        if "| view" in line:
            assert line.rstrip().split("|")[-1].strip(), f"a view without a description: {line}"


def hint(err):
    return err.diag.message_hint or ""


def test_unknown_key_type_hints_where_the_key_types_are(admin, db):
    for sql in ("SELECT token.generate_token('acme', 'agnet')",
                "SELECT token.register_prefix('hint-', 'agnet', 'dev')"):
        err = refusal(admin, sql)
        assert err.sqlstate == "42704", (sql, err.sqlstate)
        assert 'key type "agnet" does not exist' in str(err)
        assert "token.key_types" in hint(err) and "create_key_type" in hint(err), hint(err)
    err = refusal(admin, "SELECT token.create_key_type('hinted', can_validate => '{agnet}')")
    assert err.sqlstate == "42704" and "token.key_types" in hint(err), hint(err)


def test_an_overlapping_prefix_hints_how_to_choose_one(admin):
    err = refusal(admin, "SELECT token.register_prefix('e2e-x-', 'agent', 'dev')")
    assert err.sqlstate == "22023"
    assert 'overlaps registered prefix "e2e-"' in str(err)
    assert "neither starts nor is started by" in hint(err), hint(err)


def test_an_unset_environment_hints_how_to_set_it(db, su, admin):
    _, token = generate(admin, db, "hint-env")
    su.execute("SET token.environment = ''")
    err = refusal(su, "SELECT token.generate_token('hint-env', 'agent')")
    assert err.sqlstate == "55000" and "token.environment is not set" in str(err)
    assert "SET token.environment" in hint(err), hint(err)
    # Validating: refused as an environment mismatch, with a hint that the setting is missing.
    err = refusal(su, "SELECT * FROM token.validate_token(%s)", (token,))
    assert err.sqlstate == "28000" and "used in (unset)" in str(err), str(err)
    assert "token.environment is not set" in hint(err), hint(err)
    assert token not in hint(err) and token not in str(err)
    # With the environment set, a mismatch is the caller's problem: no operator hint.
    su.execute("SET token.environment = 'prod'")
    err = refusal(su, "SELECT * FROM token.validate_token(%s)", (token,))
    assert err.sqlstate == "28000" and hint(err) == ""
    su.execute("RESET token.environment")


def test_a_missing_preload_hints_shared_preload_libraries(db):
    run = pathlib.Path(tempfile.mkdtemp(prefix="pg_token-nopreload-", dir=db.run))
    subprocess.run(["chown", "postgres:postgres", str(run)], check=True)
    data = run / "data"
    port = subprocess.run(["bash", str(CLUSTER), "free-port"], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(["bash", str(CLUSTER), "start", str(data), port, "shared_preload_libraries = ''"], check=True)
    try:
        with psycopg.connect(host=str(data), port=port, user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute("CREATE EXTENSION pg_token")
            err = refusal(c, "SELECT * FROM token.validate_token('e2e-whatever')")
            assert err.sqlstate == "55000", (err.sqlstate, str(err))
            assert "shared_preload_libraries" in str(err)
            assert "Add pg_token to shared_preload_libraries" in hint(err), hint(err)
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(data)], check=False)
