"""Row-level security with sql/examples/multi_tenant.sql, over TCP as e2e_tenant: a login
role holding app_api (token_validator + table rights), not superuser, not owner, no BYPASSRLS."""

import psycopg
import pytest

from conftest import generate, refusal

ACME_UUID = "6f1c1e1a-1111-4c3e-9d1a-aaaaaaaaaaaa"


@pytest.fixture()
def tenant(db):
    with db.connect("e2e_tenant") as c:  # not autocommit: each test drives its transactions
        yield c


def names(conn):
    return sorted(r[0] for r in conn.execute("SELECT name FROM app.projects"))


def test_policies_apply_to_the_tenant_role(su):
    row = su.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = 'e2e_tenant'").fetchone()
    assert row == (False, False)
    assert su.execute("SELECT relowner::regrole::text <> 'e2e_tenant' AND relrowsecurity "
                      "FROM pg_class WHERE oid = 'app.projects'::regclass").fetchone()[0]


def test_tenant_sees_and_changes_only_its_rows(db, admin, su, tenant):
    _, acme = generate(admin, db, "acme", scopes=["read", "write"])
    tenant.execute("SELECT token.authenticate(%s)", (acme,))
    assert names(tenant) == ["acme-billing", "acme-website"]
    assert tenant.execute("SELECT token.current_account(), token.has_scope('write'), token.has_scope('admin')").fetchone() \
        == ("acme", True, False)
    # Updates and deletes reach only acme's rows, whatever the WHERE clause says.
    assert tenant.execute("UPDATE app.projects SET name = name || '!' WHERE true").rowcount == 2
    assert tenant.execute("DELETE FROM app.projects WHERE tenant = 'globex'").rowcount == 0
    err = refusal(tenant, "INSERT INTO app.projects (tenant, name) VALUES ('globex', 'planted')")
    assert err.sqlstate == "42501", "WITH CHECK stops writing into another tenant"
    # The refusal aborted the transaction; the updates went with it.
    assert su.execute("SELECT count(*) FROM app.projects WHERE name LIKE '%!'").fetchone()[0] == 0
    assert su.execute("SELECT count(*) FROM app.projects WHERE tenant = 'globex'").fetchone()[0] == 3


def test_read_scope_cannot_write(db, admin, tenant):
    _, reader = generate(admin, db, "acme", scopes=["read"])
    tenant.execute("SELECT token.authenticate(%s)", (reader,))
    assert len(names(tenant)) == 2
    assert tenant.execute("UPDATE app.projects SET name = name").rowcount == 0
    assert refusal(tenant, "INSERT INTO app.projects (tenant, name) VALUES ('acme', 'x')").sqlstate == "42501"


def test_unauthenticated_transaction_sees_nothing(db, tenant):
    assert names(tenant) == []
    assert tenant.execute("SELECT token.current_account(), token.current_token_id(), token.current_key_type(), "
                          "token.current_scopes(), token.has_scope('read')").fetchone() == (None, None, None, None, False)
    assert tenant.execute("SELECT count(*) FROM app.invoices").fetchone()[0] == 0
    assert tenant.execute("SELECT count(*) FROM app.usage").fetchone()[0] == 0
    assert refusal(tenant, "INSERT INTO app.projects (tenant, name) VALUES ('acme', 'x')").sqlstate == "42501"


def test_identity_ends_with_commit_and_with_rollback(db, admin, tenant):
    _, acme = generate(admin, db, "acme", scopes=["read"])
    for end in ("COMMIT", "ROLLBACK"):
        tenant.execute("SELECT token.authenticate(%s)", (acme,))
        assert len(names(tenant)) == 2
        tenant.execute(end)
        assert tenant.execute("SELECT token.current_account()").fetchone()[0] is None, end
        assert names(tenant) == [], end
        tenant.rollback()


def test_identity_ends_when_a_failed_transaction_rolls_back(db, admin, tenant):
    _, acme = generate(admin, db, "acme", scopes=["read"])
    tenant.execute("SELECT token.authenticate(%s)", (acme,))
    refusal(tenant, "SELECT 1/0")  # aborts, then rolls back
    assert tenant.execute("SELECT token.current_account()").fetchone()[0] is None


def test_revoked_token_fails_in_the_next_transaction(db, admin, tenant):
    token_id, acme = generate(admin, db, "acme", scopes=["read"])
    tenant.execute("SELECT token.authenticate(%s)", (acme,))
    tenant.commit()
    admin.execute("SELECT token.revoke_token(%s)", (token_id,))
    err = refusal(tenant, "SELECT token.authenticate(%s)", (acme,))
    assert err.sqlstate == "28000" and "token rejected: revoked" in str(err)
    assert names(tenant) == []


def test_second_authenticate_replaces_the_identity(db, admin, tenant):
    _, acme = generate(admin, db, "acme", scopes=["read"])
    _, globex = generate(admin, db, "globex", scopes=["read"])
    tenant.execute("SELECT token.authenticate(%s)", (acme,))
    tenant.execute("SELECT token.authenticate(%s)", (globex,))
    assert names(tenant) == ["globex-hr", "globex-ops", "globex-research"]
    # A failed authenticate leaves no identity behind (the transaction is aborted anyway).
    refusal(tenant, "SELECT token.authenticate('e2e-garbage')")
    assert names(tenant) == []


def test_failed_authenticate_in_a_savepoint_restores_the_previous_identity(db, admin, tenant):
    _, acme = generate(admin, db, "acme", scopes=["read"])
    tenant.execute("SELECT token.authenticate(%s)", (acme,))
    tenant.execute("SAVEPOINT s")
    with pytest.raises(psycopg.Error):
        tenant.execute("SELECT token.authenticate('e2e-garbage')")
    tenant.execute("ROLLBACK TO SAVEPOINT s")
    assert tenant.execute("SELECT token.current_account()").fetchone()[0] == "acme"


@pytest.mark.parametrize("attempt", [
    "SET token.account = 'globex'",
    "SET token.current_account = 'globex'",
    "SELECT set_config('token.account', 'globex', false)",
    "SELECT set_config('token.current_account', 'globex', true)",
    "SET app.tenant = 'globex'",
    "SET role e2e_admin",
    "SET session_authorization = 'postgres'",
])
def test_settings_cannot_forge_an_identity(db, admin, tenant, attempt):
    _, acme = generate(admin, db, "acme", scopes=["read"])
    tenant.execute("SELECT token.authenticate(%s)", (acme,))
    try:
        tenant.execute(attempt)
    except psycopg.Error:
        tenant.rollback()
        tenant.execute("SELECT token.authenticate(%s)", (acme,))
    assert tenant.execute("SELECT token.current_account()").fetchone()[0] == "acme", attempt
    assert names(tenant) == ["acme-billing", "acme-website"], attempt
    tenant.rollback()
    # And without authenticating, the same attempts leave the session with no identity.
    try:
        tenant.execute(attempt)
    except psycopg.Error:
        tenant.rollback()
    assert tenant.execute("SELECT token.current_account()").fetchone()[0] is None
    assert names(tenant) == []
    tenant.rollback()


# Every function in schema token the application role may execute, and a call of each. The
# first assertion below keeps this list honest: a function granted to token_validator later
# must be added here.
CALLABLE = {
    "authenticate": "SELECT token.authenticate(%(globex)s)",  # a second identity, in a savepoint
    "validate_token": "SELECT token.validate_token(%(globex)s)",
    "check_token": "SELECT token.check_token(%(globex)s)",
    "hash_token": "SELECT token.hash_token(%(globex)s)",
    "reasons": "SELECT count(*) FROM token.reasons()",
    "cache_stats": "SELECT * FROM token.cache_stats()",
    "current_account": "SELECT token.current_account()",
    "current_account_uuid": "SELECT token.current_account_uuid()",
    "current_account_bigint": "SELECT token.current_account_bigint()",
    "current_token_id": "SELECT token.current_token_id()",
    "current_key_type": "SELECT token.current_key_type()",
    "current_scopes": "SELECT token.current_scopes()",
    "has_scope": "SELECT token.has_scope('write')",
    "current_identity": "SELECT token.current_identity()",
    "canonical_account": "SELECT token.canonical_account('042')",
    # Refuses an opaque token (22023: it takes a legacy JWT); the identity must survive that too.
    "exchange_legacy_jwt": "SELECT token.exchange_legacy_jwt(%(globex)s)",
}


def test_no_function_the_application_may_call_changes_its_identity(db, admin, tenant):
    callable_ = {r[0] for r in tenant.execute(
        "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'token'::regnamespace "
        "AND has_function_privilege(p.oid, 'EXECUTE')")}
    assert callable_ == set(CALLABLE), callable_ ^ set(CALLABLE)
    _, acme = generate(admin, db, "acme", scopes=["read"])
    _, globex = generate(admin, db, "globex", scopes=["read", "write"])
    tenant.execute("SELECT token.authenticate(%s)", (acme,))
    for name, sql in CALLABLE.items():
        tenant.execute("SAVEPOINT s")
        if name == "exchange_legacy_jwt":
            try:
                tenant.execute(sql, {"globex": globex})
                raise AssertionError("exchange_legacy_jwt took an opaque token")
            except psycopg.errors.InvalidParameterValue:
                tenant.execute("ROLLBACK TO SAVEPOINT s")
        else:
            tenant.execute(sql, {"globex": globex})
        if name == "authenticate":
            assert tenant.execute("SELECT token.current_account()").fetchone()[0] == "globex"
            tenant.execute("ROLLBACK TO SAVEPOINT s")  # undoes it, as for any savepoint
        else:
            tenant.execute("RELEASE SAVEPOINT s")
        assert tenant.execute("SELECT token.current_account()").fetchone()[0] == "acme", name
        assert names(tenant) == ["acme-billing", "acme-website"], name
    tenant.rollback()


def test_uuid_and_bigint_accounts_use_typed_accessors(db, admin, tenant):
    _, by_uuid = generate(admin, db, ACME_UUID, scopes=["read"])
    _, by_bigint = generate(admin, db, "1001", scopes=["read"])
    tenant.execute("SELECT token.authenticate(%s)", (by_uuid,))
    assert tenant.execute("SELECT amount::text FROM app.invoices").fetchall() == [("120.00",)]
    assert tenant.execute("SELECT count(*) FROM app.usage").fetchone()[0] == 0, "not a bigint: deny"
    tenant.rollback()
    tenant.execute("SELECT token.authenticate(%s)", (by_bigint,))
    assert tenant.execute("SELECT sum(units) FROM app.usage").fetchone()[0] == 12
    assert tenant.execute("SELECT count(*) FROM app.invoices").fetchone()[0] == 0, "not a uuid: deny"
    tenant.rollback()


def test_policy_predicates_use_the_tenant_indexes(db, admin, su, tenant):
    with db.su() as c:  # enough rows that an index matters; rolled back below
        c.autocommit = False
        c.execute("INSERT INTO app.projects (tenant, name) SELECT 't' || (i % 500), 'p' || i FROM generate_series(1, 20000) i")
        c.execute("INSERT INTO app.invoices (tenant, amount) SELECT gen_random_uuid(), 1 FROM generate_series(1, 20000)")
        c.execute("INSERT INTO app.usage (tenant, units) SELECT i, 1 FROM generate_series(1, 20000) i")
        c.execute("ANALYZE app.projects, app.invoices, app.usage")
        c.commit()
    try:
        _, acme = generate(admin, db, ACME_UUID, scopes=["read"])
        tenant.execute("SELECT token.authenticate(%s)", (acme,))
        for table, index in [("app.projects", "projects_tenant_idx"), ("app.invoices", "invoices_tenant_idx"),
                             ("app.usage", "usage_tenant_idx")]:
            plan = "\n".join(r[0] for r in tenant.execute(f"EXPLAIN SELECT * FROM {table}").fetchall())
            assert index in plan, plan
        tenant.rollback()
    finally:
        su.execute("DELETE FROM app.projects WHERE tenant ~ '^t[0-9]+$'")
        su.execute("DELETE FROM app.invoices WHERE amount = 1")
        su.execute("DELETE FROM app.usage WHERE units = 1")


def test_a_parallel_safe_policy_wrapper_loses_rows_and_a_restricted_one_does_not(db, su, admin, tenant):
    """Parallel workers do not share the backend memory the identity lives in: a wrapper around
    the accessors declared PARALLEL SAFE is evaluated in workers, where it sees no identity,
    so a parallel plan returns too few rows. Declared PARALLEL RESTRICTED (as the accessors
    are), the filter stays in the leader and every row comes back."""
    su.execute("DROP TABLE IF EXISTS app.wide")
    su.execute("CREATE TABLE app.wide AS SELECT 'acme'::text AS tenant, g AS n FROM generate_series(1, 100000) g")
    su.execute("ANALYZE app.wide")
    su.execute("GRANT SELECT ON app.wide TO app_api")
    su.execute("""CREATE OR REPLACE FUNCTION app.tenant_safe() RETURNS text LANGUAGE sql STABLE PARALLEL SAFE
                  AS $$ SELECT token.current_account() $$""")
    su.execute("""CREATE OR REPLACE FUNCTION app.tenant_restricted() RETURNS text LANGUAGE sql STABLE PARALLEL RESTRICTED
                  AS $$ SELECT token.current_account() $$""")
    _, acme = generate(admin, db, "acme", scopes=["read"])
    try:
        for setting in ("parallel_setup_cost = 0", "parallel_tuple_cost = 0", "min_parallel_table_scan_size = 0",
                        "max_parallel_workers_per_gather = 2", "parallel_leader_participation = off"):
            tenant.execute(f"SET LOCAL {setting}")
        tenant.execute("SELECT token.authenticate(%s)", (acme,))
        restricted = tenant.execute("SELECT count(*) FROM app.wide WHERE tenant = app.tenant_restricted()").fetchone()[0]
        assert restricted == 100000
        plan = "\n".join(r[0] for r in tenant.execute(
            "EXPLAIN (ANALYZE, COSTS OFF) SELECT count(*) FROM app.wide WHERE tenant = app.tenant_safe()"))
        safe = tenant.execute("SELECT count(*) FROM app.wide WHERE tenant = app.tenant_safe()").fetchone()[0]
        print(f"\nPARALLEL SAFE wrapper: {safe} of 100000 rows; PARALLEL RESTRICTED: {restricted}")
        if "Workers Launched: 0" not in plan and "Workers Launched" in plan:
            assert safe < 100000, "workers ran the SAFE wrapper and still saw the identity?"
        tenant.rollback()
    finally:
        su.execute("DROP TABLE app.wide")
        su.execute("DROP FUNCTION app.tenant_safe(), app.tenant_restricted()")
