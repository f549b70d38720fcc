"""PostgREST's db-pre-request recipe (sql/examples/postgrest.sql), driven over TCP exactly the
way PostgREST drives a request: connected as `authenticator`, one transaction per request
with the role and the request.* settings set by set_config(..., true), the pre-request
function, the request's query, COMMIT. No PostgREST process: the SQL it sends is the contract
(src/PostgREST/Query/PreQuery.hs: txVarQuery, preReqQuery)."""

import json
import secrets

import psycopg
import pytest

from conftest import ALPHABET, ROOT, compose, generate

SETTINGS = ("SELECT set_config('search_path', %s, true), set_config('role', %s, true), "
            "set_config('request.jwt.claims', %s, true), set_config('request.method', %s, true), "
            "set_config('request.path', %s, true), set_config('request.headers', %s, true), "
            "set_config('request.cookies', %s, true)")
PRE_REQUEST = 'SELECT "api_auth"."pre_request"()'
# GET /projects, as PostgREST words it (body as JSON text).
READ = ('WITH pgrst_source AS (SELECT "app"."projects".* FROM "app"."projects") '
        "SELECT null::bigint AS total_result_set, pg_catalog.count(_postgrest_t) AS page_total, "
        "coalesce(json_agg(_postgrest_t), '[]')::character varying AS body "
        "FROM (SELECT * FROM pgrst_source) _postgrest_t")
# POST /projects with a JSON body.
WRITE = ('WITH pgrst_source AS (INSERT INTO "app"."projects"("name", "tenant") '
         "SELECT pgrst_body.name, pgrst_body.tenant FROM "
         "json_to_recordset(json_build_array(%s::json)) AS pgrst_body(name text, tenant text) "
         'RETURNING "app"."projects".*) '
         "SELECT '' AS total_result_set, pg_catalog.count(_postgrest_t) AS page_total, "
         "coalesce(json_agg(_postgrest_t), '[]')::character varying AS body "
         "FROM (SELECT * FROM pgrst_source) _postgrest_t")


@pytest.fixture(scope="module")
def postgrest(db):
    with db.su() as c:
        c.execute((ROOT / "sql" / "examples" / "postgrest.sql").read_text())
        c.execute("ALTER ROLE authenticator PASSWORD 'e2e-password'")
    yield db
    # Leave the suite's database as the other tests expect it; the roles are cluster-wide
    # and harmless.
    with db.su() as c:
        c.execute("DROP OWNED BY api_token_auth, web_api, authenticator")
        c.execute("DROP SCHEMA IF EXISTS api_auth")


@pytest.fixture()
def authenticator(postgrest):
    with postgrest.connect("authenticator", autocommit=True) as c:  # it sends BEGIN/COMMIT itself
        yield c


def request(conn, headers, method="GET", body=None, run_pre_request=True):
    """One PostgREST request on `conn`: returns the JSON body's rows, or raises the
    database's error after rolling back, as PostgREST does."""
    mode = "READ ONLY" if method in ("GET", "HEAD") else "READ WRITE"
    conn.execute(f"BEGIN ISOLATION LEVEL READ COMMITTED {mode}")
    try:
        conn.execute(SETTINGS, ('"app"', "web_api", json.dumps({"role": "web_api"}), method, "/projects",
                                json.dumps(headers), "{}"))
        if run_pre_request:
            conn.execute(PRE_REQUEST)
        if method == "GET":
            row = conn.execute(READ).fetchone()
        else:
            row = conn.execute(WRITE, (json.dumps(body),)).fetchone()
    except psycopg.Error:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return json.loads(row[2])


def refused(conn, headers, method="GET", body=None):
    try:
        rows = request(conn, headers, method, body)
    except psycopg.Error as e:
        return e
    raise AssertionError(f"request answered with {len(rows)} rows")


def test_the_roles_are_as_postgrest_wants(postgrest, su):
    row = su.execute("SELECT rolcanlogin, rolinherit, rolsuper, rolbypassrls FROM pg_roles "
                     "WHERE rolname = 'authenticator'").fetchone()
    assert row == (True, False, False, False)
    assert su.execute("SELECT rolbypassrls FROM pg_roles WHERE rolname = 'web_api'").fetchone()[0] is False
    assert su.execute("SELECT pg_has_role('authenticator', 'web_api', 'MEMBER'), "
                      "pg_has_role('authenticator', 'web_api', 'USAGE')").fetchone() == (True, False)
    # web_api, which every HTTP client reaches, may call no pg_token function but the accessors.
    assert su.execute("SELECT has_function_privilege('web_api', 'token.authenticate(text, text, text)', 'EXECUTE'), "
                      "has_function_privilege('web_api', 'token.validate_token(text, text, text)', 'EXECUTE')"
                      ).fetchone() == (False, False)
    fn = su.execute("SELECT prosecdef, proconfig, proowner::regrole::text FROM pg_proc "
                    "WHERE oid = 'api_auth.pre_request()'::regprocedure").fetchone()
    assert fn == (True, ["search_path=pg_catalog, pg_temp"], "api_token_auth")


def test_the_authenticator_alone_reads_nothing(authenticator):
    try:
        authenticator.execute("SELECT count(*) FROM app.projects")
        raise AssertionError("the authenticator read app.projects without becoming web_api")
    except psycopg.errors.InsufficientPrivilege:
        pass


@pytest.mark.parametrize("account, names", [
    ("acme", ["acme-billing", "acme-website"]),
    ("globex", ["globex-hr", "globex-ops", "globex-research"]),
])
@pytest.mark.parametrize("header", ["x-api-key", "bearer", "bearer-lower-case"])
def test_a_valid_token_sees_its_tenants_rows_only(postgrest, admin, authenticator, account, names, header):
    _, token = generate(admin, postgrest, account, scopes=["read"])
    sent = {"x-api-key": {"x-api-key": token},
            "bearer": {"authorization": f"Bearer {token}"},
            "bearer-lower-case": {"authorization": f"bearer  {token} "}}[header]
    rows = request(authenticator, {"accept": "application/json", **sent})  # READ ONLY, as PostgREST's GET
    assert sorted(r["name"] for r in rows) == names
    assert {r["tenant"] for r in rows} == {account}


def _never_issued(prefix):
    return compose(prefix, "".join(secrets.choice(ALPHABET) for _ in range(22)))


@pytest.mark.parametrize("case", ["no key", "empty key", "not a token", "never issued", "revoked",
                                  "basic scheme", "prod token"])
def test_a_request_without_a_valid_token_fails_with_28000(postgrest, admin, authenticator, case):
    if case == "no key":
        headers, expect = {"accept": "application/json"}, "malformed"
    elif case == "empty key":
        headers, expect = {"x-api-key": ""}, "malformed"
    elif case == "not a token":
        headers, expect = {"x-api-key": "hello"}, "malformed"
    elif case == "never issued":
        headers, expect = {"x-api-key": postgrest.record(_never_issued("e2e-"))}, "not_found"
    elif case == "revoked":
        token_id, token = generate(admin, postgrest, "acme", scopes=["read"])
        admin.execute("SELECT token.revoke_token(%s, 'test')", (token_id,))
        headers, expect = {"x-api-key": token}, "revoked"
    elif case == "basic scheme":
        _, token = generate(admin, postgrest, "acme", scopes=["read"])
        headers, expect = {"authorization": f"Basic {token}"}, "malformed"  # not read: no key
    else:  # decided by the prefix, before any lookup: a well-formed prod token suffices
        headers, expect = {"x-api-key": postgrest.record(_never_issued("e2eprd-"))}, None
    err = refused(authenticator, headers)
    assert err.sqlstate == "28000", f"{case}: {err.sqlstate} {err}"
    if expect:
        assert err.diag.message_primary == f"token rejected: {expect}"
    else:
        assert err.diag.message_primary == "Token environment mismatch: prod token used in dev"
    for value in headers.values():
        if len(value) > 8:
            assert value not in str(err) and value not in (err.diag.message_detail or "")
    # The connection is clean and unauthenticated afterwards.
    assert authenticator.execute("SELECT token.current_account()").fetchone()[0] is None


def test_the_identity_does_not_leak_into_the_next_transaction(postgrest, admin, authenticator):
    _, acme = generate(admin, postgrest, "acme", scopes=["read"])
    _, globex = generate(admin, postgrest, "globex", scopes=["read"])
    assert len(request(authenticator, {"x-api-key": acme})) == 2
    # The next transaction on the same connection, with no pre-request at all: nothing of the
    # previous request remains, neither the identity nor the headers that carried the token.
    assert request(authenticator, {}, run_pre_request=False) == []
    assert authenticator.execute("SELECT token.current_account(), current_setting('request.headers', true), "
                                 "current_user").fetchone() == (None, "", "authenticator")
    # A refused request in between does not bring the earlier identity back ...
    assert refused(authenticator, {"x-api-key": "garbage"}).sqlstate == "28000"
    # ... and the next tenant sees its own rows only.
    assert {r["tenant"] for r in request(authenticator, {"x-api-key": globex})} == {"globex"}
    assert request(authenticator, {}, run_pre_request=False) == []


def test_writes_go_through_the_policies(postgrest, admin, su, authenticator):
    _, writer = generate(admin, postgrest, "acme", scopes=["read", "write"])
    _, reader = generate(admin, postgrest, "acme", scopes=["read"])
    try:
        rows = request(authenticator, {"x-api-key": writer}, "POST", {"name": "acme-via-postgrest", "tenant": "acme"})
        assert [(r["tenant"], r["name"]) for r in rows] == [("acme", "acme-via-postgrest")]
        # Into another tenant: WITH CHECK refuses (PostgREST answers 403).
        err = refused(authenticator, {"x-api-key": writer}, "POST", {"name": "planted", "tenant": "globex"})
        assert err.sqlstate == "42501"
        # Without the write scope: the restrictive policy refuses.
        err = refused(authenticator, {"x-api-key": reader}, "POST", {"name": "acme-reader", "tenant": "acme"})
        assert err.sqlstate == "42501"
        assert su.execute("SELECT array_agg(name ORDER BY name) FROM app.projects WHERE name IN "
                          "('acme-via-postgrest', 'planted', 'acme-reader')").fetchone()[0] == ["acme-via-postgrest"]
    finally:
        su.execute("DELETE FROM app.projects WHERE name = 'acme-via-postgrest'")
