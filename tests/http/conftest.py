"""Fixtures for the HTTP example's test: its databases, and the example service started as
real uvicorn processes on 127.0.0.1, each on a free port, stopped at the end.

tests/http/run.sh exports PGT_HOST, PGT_PORT, PGT_SOCKET, PGT_RUN and PGT_TOKENS (the cluster
scripts/test.sh started, or its own). Each service writes its log to $PGT_RUN/http-<name>.log,
which the leak check searches with the server logs.
"""

import os
import pathlib
import subprocess
import sys
import time
import zlib

import httpx
import psycopg
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "http"
sys.path.insert(0, str(EXAMPLE))  # refusals, load

DB = "pgt_http"
PROD = "pgt_http_prod"  # the same schema, serving token.environment = 'prod'
ROLE = "http_app"       # what the service logs in as: holds app_api, owns nothing
PASSWORD = "http-password"

SECRETS = []  # every token this run saw, also kept in memory for the response checks


class Env:
    def __init__(self):
        self.host, self.port = os.environ["PGT_HOST"], int(os.environ["PGT_PORT"])
        self.socket, self.run = os.environ["PGT_SOCKET"], pathlib.Path(os.environ["PGT_RUN"])
        self.tokens = pathlib.Path(os.environ["PGT_TOKENS"])

    def su(self, dbname=DB):
        return psycopg.connect(host=self.socket, port=self.port, user="postgres", dbname=dbname, autocommit=True)

    def dsn(self, dbname, name, port=None):
        return (f"host={self.host} port={port or self.port} dbname={dbname} user={ROLE} "
                f"password={PASSWORD} application_name=pg_token-http-{name}")

    def record(self, token):
        with open(self.tokens, "a") as f:
            f.write(token + "\n")
        SECRETS.append(token)
        return token


@pytest.fixture(scope="session")
def env():
    return Env()


@pytest.fixture(scope="session")
def db(env):
    with env.su("postgres") as c:
        for name in (DB, PROD):
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.execute(f"DROP ROLE IF EXISTS {ROLE}")
        for name in (DB, PROD):
            c.execute(f"CREATE DATABASE {name}")
        c.execute(f"ALTER DATABASE {PROD} SET token.environment = 'prod'")
    for name in (DB, PROD):
        with env.su(name) as c:
            c.execute("CREATE EXTENSION pg_token")
            c.execute("SELECT token.create_key_type('agent', allowed_scopes => '{read,write}')")
            c.execute("SELECT token.register_prefix('http-', 'agent', 'dev')")
            c.execute("SELECT token.register_prefix('httpprd-', 'agent', 'prod')")
            c.execute((ROOT / "sql" / "examples" / "multi_tenant.sql").read_text())
    with env.su() as c:
        c.execute((ROOT / "bench" / "baseline.sql").read_text())
        c.execute((EXAMPLE / "baseline.sql").read_text())
    with env.su("postgres") as c:
        c.execute(f"CREATE ROLE {ROLE} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{PASSWORD}'")
        c.execute(f"GRANT app_api TO {ROLE}")
    return env


class Service:
    """One uvicorn process serving examples/http/service.py."""

    def __init__(self, env, name, backend, dsn, timeout="2"):
        self.name, self.log = name, env.run / f"http-{name}.log"
        self.port = int(subprocess.run(["bash", str(ROOT / "scripts" / "cluster.sh"), "free-port"],
                                       check=True, capture_output=True, text=True).stdout)
        self.url = f"http://127.0.0.1:{self.port}"
        child_env = dict(os.environ, PG_TOKEN_HTTP_DSN=dsn, PG_TOKEN_HTTP_BACKEND=backend,
                         PG_TOKEN_HTTP_POOL_SIZE="4", PG_TOKEN_HTTP_POOL_TIMEOUT=timeout)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(EXAMPLE / "service.py"), "--host", "127.0.0.1",
                                          "--port", str(self.port)], env=child_env, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=str(EXAMPLE))

    def wait_ready(self, within=30.0):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"service {self.name} exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling a process that is starting: there is no event to wait on
        raise AssertionError(f"service {self.name} did not answer /healthz within {within} s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self):
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def services(db):
    dead_port = int(subprocess.run(["bash", str(ROOT / "scripts" / "cluster.sh"), "free-port"],
                                   check=True, capture_output=True, text=True).stdout)
    # The services the load run drives wait up to 30 s for a pooled connection: on a loaded
    # 2-core machine a 2 s wait can run out, and a 503 there must mean a real failure.
    started = {
        "main": Service(db, "main", "pg_token", db.dsn(DB, "main"), timeout="30"),
        "baseline": Service(db, "baseline", "baseline", db.dsn(DB, "baseline"), timeout="30"),
        "prod": Service(db, "prod", "pg_token", db.dsn(PROD, "prod")),
        # Nothing listens on this port: the database is down from the service's point of view.
        "dead": Service(db, "dead", "pg_token", db.dsn(DB, "dead", port=dead_port), timeout="1"),
    }
    try:
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.stop()


def _no_token_in(response):
    """Every response of every test passes here: no token, nor its random body, in the body or
    any header."""
    response.read()
    texts = [response.content.decode("latin-1")] + [f"{k}: {v}" for k, v in response.headers.multi_items()]
    for token in SECRETS:
        for text in texts:
            assert token[-28:-6] not in text, f"a token ({token[:-24]}...) is in a response of {response.request.url.path}"


@pytest.fixture(scope="session")
def http(services):
    """service name -> an httpx client on it that checks every response."""
    clients = {name: httpx.Client(base_url=s.url, timeout=15.0, event_hooks={"response": [_no_token_in]})
               for name, s in services.items()}
    yield clients
    for c in clients.values():
        c.close()


def generate(conn, env, account, scopes=("read",), **named):
    args = "".join(f", {k} => %({k})s" for k in named)
    row = conn.execute(f"SELECT token_id, token FROM token.generate_token(%(account)s, 'agent', "
                       f"scopes => %(scopes)s{args})", {"account": account, "scopes": list(scopes), **named}).fetchone()
    env.record(row[1])
    return row[0], row[1]


ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def compose(prefix, body):
    """A well-formed token (valid CRC32 checksum) that was never issued (as tests/e2e/conftest.py)."""
    n = zlib.crc32((prefix + body).encode())
    digits = ""
    for _ in range(6):
        n, r = divmod(n, 62)
        digits = ALPHABET[r] + digits
    return prefix + body + digits
