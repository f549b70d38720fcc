"""Shared fixtures for the end-to-end tests: a real cluster, real roles, real TCP clients.

scripts/test.sh starts the cluster and exports PGT_HOST, PGT_PORT, PGT_SOCKET, PGT_DATA,
PGT_RUN and PGT_TOKENS. Run alone (`pytest tests/e2e`), this file starts its own throwaway
cluster with scripts/cluster.sh (PGBIN picks the server) and stops it at the end. With
PGT_UPGRADE_FROM=<release>, the suite's database installs that release and is updated with
ALTER EXTENSION pg_token UPDATE before any test runs.

The superuser connects over the unix socket (trust); every role under test connects over
TCP with a SCRAM password, as an application would.
"""

import contextlib
import os
import pathlib
import re
import subprocess
import tempfile
import threading
import time
import zlib

import psycopg
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts" / "cluster.sh"
DB = "pgt_e2e"
PASSWORD = "e2e-password"

# Login roles, each with exactly the memberships named (cluster-wide; recreated per run).
ROLES = {
    "e2e_admin": ["token_admin"],
    "e2e_app": ["token_validator"],
    "e2e_tenant": ["app_api"],
    "e2e_gateway": ["token_gateway"],
    "e2e_reporter": ["token_reporter"],
}


class Env:
    def __init__(self, host, port, socket, data, run, tokens):
        self.host, self.port, self.socket = host, int(port), socket
        self.data, self.run, self.tokens = pathlib.Path(data), pathlib.Path(run), pathlib.Path(tokens)

    def su(self, dbname=DB, **kw):
        """A superuser connection over the unix socket (autocommit)."""
        return psycopg.connect(host=self.socket, port=self.port, user="postgres", dbname=dbname,
                               autocommit=True, **kw)

    def connect(self, role, dbname=DB, **kw):
        """A TCP connection as `role`, authenticated with SCRAM."""
        kw.setdefault("application_name", "pg_token-e2e")
        return psycopg.connect(host=self.host, port=self.port, user=role, password=PASSWORD,
                               dbname=dbname, **kw)

    def record(self, token):
        """Every plaintext token a test sees goes to the leak check's list."""
        with open(self.tokens, "a") as f:
            f.write(token + "\n")
        return token

    def record_jwt(self, token):
        """A JWT for the leak check. tests/leakcheck.py finds a token by its characters
        [-28:-6], which must be 22 letters and digits; a JWT's signature is base64url and may
        carry '-' or '_' there. Then a fingerprint is recorded instead: 22 letters and digits
        of its signature (else its claims; never its header, which every JWT of an algorithm
        shares), padded the way leakcheck reads a token. A string that is not JWT-shaped is
        no credential and not recorded (the log hook leaves it alone)."""
        if not re.fullmatch(r"eyJ[0-9A-Za-z_-]*\.[0-9A-Za-z_-]+\.[0-9A-Za-z_-]*", token):
            return token
        if re.fullmatch(r"[0-9A-Za-z]{22}", token[-28:-6]):
            return self.record(token)
        _, claims, signature = token.split(".")
        runs = re.findall(r"[0-9A-Za-z]{22,}", signature) or re.findall(r"[0-9A-Za-z]{22,}", claims)
        if runs:
            self.record(runs[-1][-22:] + "jwtfp0")
        return token


@pytest.fixture(scope="session")
def env():
    if os.environ.get("PGT_PORT"):
        yield Env(os.environ["PGT_HOST"], os.environ["PGT_PORT"], os.environ["PGT_SOCKET"],
                  os.environ["PGT_DATA"], os.environ["PGT_RUN"], os.environ["PGT_TOKENS"])
        return
    run = pathlib.Path(tempfile.mkdtemp(prefix="pg_token-e2e-"))
    subprocess.run(["chown", "postgres:postgres", str(run)], check=True)
    data = run / "primary"
    port = subprocess.run(["bash", str(CLUSTER), "free-port"], check=True, capture_output=True,
                          text=True).stdout.strip()
    subprocess.run(["bash", str(CLUSTER), "start", str(data), port, "log_statement = 'all'",
                    "token.last_used_interval = 1"], check=True)
    tokens = run / "generated-tokens.txt"
    tokens.touch()
    try:
        yield Env("127.0.0.1", port, str(data), str(data), str(run), str(tokens))
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(data)], check=False)


@pytest.fixture(scope="session")
def db(env):
    """A fresh database with the extension, a registry, the example schema and the roles."""
    with env.su("postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"DROP DATABASE IF EXISTS {DB}_restored WITH (FORCE)")
        c.execute(f"CREATE DATABASE {DB}")
    with env.su() as c:
        # PGT_UPGRADE_FROM=0.1.0: the whole suite runs on a database that installed that
        # release and was then updated, the way pgmq tests its upgrades.
        old = os.environ.get("PGT_UPGRADE_FROM")
        if old:
            c.execute(f"CREATE EXTENSION pg_token VERSION '{old}'")
            c.execute("ALTER EXTENSION pg_token UPDATE")
        else:
            c.execute("CREATE EXTENSION pg_token")
        c.execute("SELECT token.create_key_type('agent', allowed_scopes => '{read,write,admin}', max_ttl => '90 days')")
        c.execute("SELECT token.create_key_type('mid', can_validate => '{agent}')")
        c.execute("SELECT token.register_prefix('e2e-', 'agent', 'dev')")
        c.execute("SELECT token.register_prefix('e2eprd-', 'agent', 'prod')")
        c.execute("SELECT token.register_prefix('e2emid_', 'mid', 'dev')")
        c.execute((ROOT / "sql" / "examples" / "multi_tenant.sql").read_text())
        for role, groups in ROLES.items():
            c.execute(f"DROP OWNED BY {role} CASCADE" if role_exists(c, role) else "SELECT 1")
            c.execute(f"DROP ROLE IF EXISTS {role}")
            c.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{PASSWORD}'")
            for g in groups:
                c.execute(f"GRANT {g} TO {role}")
    return env


def role_exists(conn, role):
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


@pytest.fixture()
def su(db):
    with db.su() as c:
        yield c


@pytest.fixture()
def admin(db):
    with db.connect("e2e_admin", autocommit=True) as c:
        yield c


@pytest.fixture()
def app(db):
    with db.connect("e2e_app", autocommit=True) as c:
        yield c


def generate(conn, env, account, key_type="agent", **named):
    """generate_token with named arguments; returns (token_id, token) and records the token."""
    args = "".join(f", {k} => %({k})s" for k in named)
    row = conn.execute(f"SELECT token_id, token FROM token.generate_token(%(account)s, %(kt)s{args})",
                       {"account": account, "kt": key_type, **named}).fetchone()
    env.record(row[1])
    return row[0], row[1]


def refusal(conn, sql, params=()):
    """Runs `sql`, which must fail; returns the psycopg error (connection stays usable)."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        if not conn.autocommit:
            conn.rollback()
        return e
    raise AssertionError(f"expected an error from {sql}")


def reason_of(conn, token, caller=None, scope=None):
    row = conn.execute("SELECT valid, reason FROM token.check_token(%s, %s, %s)", (token, caller, scope)).fetchone()
    return None if row[0] else row[1]


ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def compose(prefix, body):
    """A well-formed token (valid CRC32 checksum, as src/core/format.rs writes it) that was never issued."""
    n = zlib.crc32((prefix + body).encode())
    digits = ""
    for _ in range(6):
        n, r = divmod(n, 62)
        digits = ALPHABET[r] + digits
    return prefix + body + digits


def flush(su):
    assert su.execute("SELECT token.flush_events('10 seconds')").fetchone()[0] is True, "event writer did not drain"


@contextlib.contextmanager
def revoke_held_open(db, su, token_id, ms=3000):
    """Revokes a token in another session whose commit is held for `ms` between becoming
    visible to new snapshots and telling the caches (token.test_commit_publish_delay). Enters
    once the revoke is visible, while its call has not returned; yields an Event set when it
    returns. Leaves once it returned (and raises what it raised)."""
    done, failure = threading.Event(), []

    def revoke():
        try:
            with db.su() as w:
                w.execute(f"SET token.test_commit_publish_delay = {int(ms)}")
                w.execute("SELECT token.revoke_token(%s)", (token_id,))
        except Exception as e:  # reported below
            failure.append(e)
        finally:
            done.set()

    revoker = threading.Thread(target=revoke)
    revoker.start()
    try:
        deadline = time.monotonic() + 10
        while not su.execute("SELECT revoked_at IS NOT NULL FROM token.tokens WHERE id = %s", (token_id,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the revoke never became visible"
            time.sleep(0.01)
        assert not done.is_set(), "the window was open: the revoke is visible, its call has not returned"
        yield done
    finally:
        revoker.join()
    assert not failure, failure
