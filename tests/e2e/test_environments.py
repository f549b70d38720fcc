"""Environments across databases: a token issued by the prod database and presented to the
dev one (and the other way round) is refused by its prefix, before any lookup."""

import pytest

from conftest import DB, generate, refusal

PROD = f"{DB}_prod"


@pytest.fixture(scope="module")
def prod(db):
    with db.su("postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {PROD} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {PROD}")
        c.execute(f"ALTER DATABASE {PROD} SET token.environment = 'prod'")
    with db.su(PROD) as c:
        c.execute("CREATE EXTENSION pg_token")
        c.execute("SELECT token.create_key_type('agent')")
        c.execute("SELECT token.register_prefix('e2e-', 'agent', 'dev')")
        c.execute("SELECT token.register_prefix('e2eprd-', 'agent', 'prod')")
    yield PROD
    with db.su("postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {PROD} WITH (FORCE)")


def test_prod_token_in_dev_and_dev_token_in_prod(db, admin, app, prod):
    with db.su(prod) as p:
        _, prod_token = generate(p, db, "acme")
        assert prod_token.startswith("e2eprd-")
        _, dev_token = generate(admin, db, "acme")
        with db.connect("e2e_app", dbname=prod, autocommit=True) as prod_app:
            assert prod_app.execute("SELECT account FROM token.validate_token(%s)", (prod_token,)).fetchone()[0] == "acme"
            err = refusal(prod_app, "SELECT * FROM token.validate_token(%s)", (dev_token,))
            assert err.sqlstate == "28000"
            assert str(err).splitlines()[0] == "Token environment mismatch: dev token used in prod"
        err = refusal(app, "SELECT * FROM token.validate_token(%s)", (prod_token,))
        assert err.sqlstate == "28000"
        assert str(err).splitlines()[0] == "Token environment mismatch: prod token used in dev"
        assert prod_token not in str(err) and err.diag.message_detail and "e2eprd-" in err.diag.message_detail


def test_generate_refuses_a_prefix_of_another_environment(db, admin):
    err = refusal(admin, "SELECT * FROM token.generate_token('acme', 'agent', prefix => 'e2eprd-')")
    assert err.sqlstate == "42704"


def test_an_unset_environment_refuses_everything(db, su, admin):
    _, token = generate(admin, db, "acme")
    with db.su() as c:
        c.execute("SET token.environment = ''")
        row = c.execute("SELECT valid, reason FROM token.check_token(%s)", (token,)).fetchone()
        assert row == (False, "environment_mismatch")
        err = refusal(c, "SELECT * FROM token.generate_token('acme', 'agent')")
        assert err.sqlstate == "55000"
