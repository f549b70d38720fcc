"""An HTTP API whose callers present pg_token tokens: FastAPI + psycopg_pool, to copy.

    Authorization: Bearer <token>
    GET  /projects        the caller's tenant's rows of app.projects (scope 'read')
    POST /projects        {"name": "..."} adds a row for the caller's tenant (scope 'write')
    GET  /healthz         the process is up (no database)
    GET  /readyz          the database answers (503 if not)

Each request takes one pooled connection and runs one transaction:

    BEGIN; SELECT ... FROM token.authenticate($1, required_scope => $2); <the request's queries>; COMMIT

The one authenticate call both validates the token and binds its identity to the transaction,
so the row-level-security policies of sql/examples/multi_tenant.sql (tenant =
token.current_account()) decide which rows the queries see. The identity ends with the
transaction, so the pooled connection goes back clean.

Why an AsyncConnectionPool: FastAPI serves requests on one event loop, and a request spends
nearly all of its time waiting for the database. The async pool lets a handful of
connections serve many concurrent requests without a thread each, and a request waits for a
connection at most PG_TOKEN_HTTP_POOL_TIMEOUT seconds before it is answered 503. Size the
pool for the database (a few connections per core of the server), not for the number of
clients; put pgbouncer (transaction pooling) in front of Postgres to share connections
between many service processes: the identity belongs to the transaction, so that is safe.

Answers (refusals.py holds the reason -> status table):
    401  no or unusable Authorization header; a refused token (body: the reason word and the
         database's message, e.g. "Token environment mismatch: dev token used in prod")
    403  the token is valid but lacks the scope (insufficient_scope)
    403  also network_not_allowed, and usage_exceeded for a cap that never refills
    429  rate_limited, and usage_exceeded until a refill, with Retry-After and RateLimit;
         an accepted request whose token has a rate limit gets RateLimit-Policy and RateLimit
    2xx  with a legacy JWT (migrating from JWTs): X-Auth-Deprecation (the identity's
         deprecation sentence, on one line), Sunset (RFC 8594: the issuer's cut-off) and, when
         the migration message holds an http(s) URL, Link: <URL>; rel="deprecation"
    401  a legacy JWT after its issuer's cut-off (legacy_token_retired), with the migration
         message in the body and the same Link
    503  the database cannot be reached or gave no connection in time, with Retry-After
    500  anything else, as {"error": "internal_error"}: never the input, never a traceback
A token is never logged, nor put in any response: the access log shows the prefix and 4
characters at most (a JWT: "jwt", nothing of it), and no query string.

PG_TOKEN_HTTP_BACKEND=baseline serves the same API on the plain SQL + pgcrypto approach of
bench/baseline.sql (a hash table, a SQL function, and a custom setting app.tenant that the
policies of examples/http/baseline.sql read), for comparison: it cannot tell why a token is
refused, and any session can SET app.tenant, which is what pg_token's identity prevents.

Run (settings from the environment):
    PG_TOKEN_HTTP_DSN='host=127.0.0.1 port=5432 dbname=app user=api password=...' \\
        python examples/http/service.py --host 127.0.0.1 --port 8000

    PG_TOKEN_HTTP_DSN           libpq connection string; the role holds app_api (token_validator
                                and the table privileges), owns nothing, is not BYPASSRLS
    PG_TOKEN_HTTP_BACKEND       pg_token (default) or baseline
    PG_TOKEN_HTTP_POOL_SIZE     connections (default 4)
    PG_TOKEN_HTTP_POOL_TIMEOUT  seconds a request waits for a connection (default 2)
"""

import argparse
import logging
import os
import sys
import time
from contextlib import asynccontextmanager

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests
from pydantic import BaseModel, Field, ValidationError

import refusals

log = logging.getLogger("pg_token.example")


class ApiError(Exception):
    """An answer other than 2xx, already worded: status, headers, JSON body."""

    def __init__(self, status, headers, body):
        super().__init__(status)
        self.status, self.headers, self.body = status, headers, body


def unavailable():
    return ApiError(503, {"Retry-After": "5"}, {"error": "unavailable"})


class PgToken:
    """pg_token: one call validates the token and binds its identity to the transaction."""

    name = "pg_token"
    AUTHENTICATE = ("SELECT account, scopes, rate_limit, rate_remaining, "
                    "extract(epoch FROM rate_reset_at - clock_timestamp()), deprecation, sunset_at "
                    "FROM token.authenticate(%s, required_scope => %s)")
    LIST = "SELECT id, tenant, name FROM app.projects ORDER BY id"
    INSERT = ("INSERT INTO app.projects (tenant, name) VALUES (token.current_account(), %s) "
              "RETURNING id, tenant, name")

    async def authenticate(self, conn, token, scope):
        try:
            cur = await conn.execute(self.AUTHENTICATE, (token, scope))
        except psycopg.errors.InvalidAuthorizationSpecification as e:  # SQLSTATE 28000
            message = e.diag.message_primary
            if message and token in message:  # pg_token never does this; refuse to pass it on
                message = None
            detail = e.diag.message_detail
            if detail and token in detail:
                detail = None
            retry = refusals.retry_after_of(detail)
            status, headers, body = refusals.refusal(refusals.reason_of(message), message, scope, retry, detail)
            if status >= 500:  # the connection's fault, not the token's: let the pool replace it
                await conn.close()
            raise ApiError(status, headers, body) from None
        return await cur.fetchone()


class Baseline:
    """Plain SQL + pgcrypto (bench/baseline.sql): look the hash up, then SET LOCAL app.tenant."""

    name = "baseline"
    AUTHENTICATE = ("SELECT k.account, k.scopes, pg_catalog.set_config('app.tenant', k.account, true) "
                    "FROM baseline.validate(%s) AS k")
    LIST = "SELECT id, tenant, name FROM baseline.projects ORDER BY id"
    INSERT = ("INSERT INTO baseline.projects (tenant, name) "
              "VALUES (pg_catalog.current_setting('app.tenant'), %s) RETURNING id, tenant, name")

    async def authenticate(self, conn, token, scope):
        row = await (await conn.execute(self.AUTHENTICATE, (token,))).fetchone()
        if row is None:  # unknown, revoked or expired alike: this approach cannot say which
            raise ApiError(*refusals.refusal(None))
        if scope not in row[1]:
            raise ApiError(*refusals.refusal("insufficient_scope", scope=scope))
        return (row[0], row[1], None, None, None, None, None)


BACKENDS = {b.name: b for b in (PgToken(), Baseline())}


def bearer_token(request):
    """The token of `Authorization: Bearer <token>`, or a 401 ApiError."""
    headers = request.headers.getlist("authorization")
    if not headers:
        raise ApiError(*refusals.missing())
    scheme, _, token = headers[0].strip().partition(" ")
    token = token.strip()
    if len(headers) > 1 or scheme.lower() != "bearer" or not token or " " in token:
        raise ApiError(*refusals.missing("invalid_request"))
    return token


async def authenticated(request, scope, work, status=200):
    """Runs `work(conn, (account, scopes, rate_limit, rate_remaining, reset_in, deprecation,
    sunset_at))` in one transaction after token.authenticate; the answer carries the token's
    RateLimit fields, and a legacy JWT's deprecation fields."""
    token = bearer_token(request)
    pool, backend = request.app.state.pool, request.app.state.backend
    for attempt in (1, 2):
        conn, began = None, False
        try:
            async with pool.connection() as conn:
                async with conn.transaction():
                    identity = await backend.authenticate(conn, token, scope)
                    began = True
                    result = await work(conn, identity)
            headers = refusals.rate_headers(*identity[2:5]) | refusals.deprecation_headers(*identity[5:7])
            return JSONResponse(result, status_code=status, headers=headers) if headers else result
        except (PoolTimeout, TooManyRequests):
            raise unavailable() from None
        except psycopg.OperationalError as e:
            # The connection broke (a restarted or failed-over server, a connection cut while
            # idle). Before the request's own queries ran, trying once more on another
            # connection is safe, once the pool has checked its idle ones; after, they may
            # have taken effect, so answer 503 and let the client decide.
            if attempt == 1 and not began and conn is not None and conn.broken:
                log.warning("connection lost (%s); retrying once", _describe(e))
                await pool.check()
                continue
            log.warning("database unavailable: %s", _describe(e))
            raise unavailable() from None


class NewProject(BaseModel):
    name: str = Field(min_length=1, max_length=200)


def create_app(backend_name=None):
    backend = BACKENDS[backend_name or os.environ.get("PG_TOKEN_HTTP_BACKEND", "pg_token")]

    @asynccontextmanager
    async def lifespan(app):
        size = int(os.environ.get("PG_TOKEN_HTTP_POOL_SIZE", "4"))
        pool = AsyncConnectionPool(
            os.environ.get("PG_TOKEN_HTTP_DSN", ""), min_size=size, max_size=size,
            timeout=float(os.environ.get("PG_TOKEN_HTTP_POOL_TIMEOUT", "2")),
            open=False, name=f"pg_token-http-{backend.name}")
        # Start even when the database is down: requests get 503 until it is back.
        await pool.open(wait=False)
        app.state.pool, app.state.backend = pool, backend
        log.info("serving with backend %s, pool of %d", backend.name, size)
        yield
        await pool.close()

    app = FastAPI(title=f"pg_token example ({backend.name})", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, exc):
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        # Starlette answers with this, then re-raises for the server to log with the
        # exception's text; Guard (below) stops it there. Only the class is logged.
        log.error("unhandled %s", _describe(exc))
        return JSONResponse({"error": "internal_error"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        # FastAPI's own 422 echoes the offending input; name the fields only.
        return JSONResponse({"error": "invalid_request", "fields": [list(e["loc"]) for e in exc.errors()]},
                            status_code=422)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        try:
            async with request.app.state.pool.connection() as conn:
                await conn.execute("SELECT 1")
        except psycopg.OperationalError:
            raise unavailable() from None
        return {"status": "ready"}

    @app.get("/projects")
    async def list_projects(request: Request):
        async def work(conn, identity):
            rows = await (await conn.execute(backend.LIST)).fetchall()
            return {"account": identity[0],
                    "projects": [{"id": r[0], "tenant": r[1], "name": r[2]} for r in rows]}
        return await authenticated(request, "read", work)

    @app.post("/projects", status_code=201)
    async def add_project(request: Request):
        # The body is read after the token is accepted: an unauthenticated caller learns
        # nothing from validation errors.
        async def work(conn, identity):
            try:
                project = NewProject.model_validate_json(await request.body())
            except ValidationError as e:
                raise ApiError(422, {}, {"error": "invalid_request",
                                         "fields": [list(err["loc"]) for err in e.errors()]}) from None
            row = await (await conn.execute(backend.INSERT, (project.name,))).fetchone()
            return {"id": row[0], "tenant": row[1], "name": row[2]}
        return await authenticated(request, "write", work, status=201)

    return Guard(app)


class Guard:
    """Outermost layer: one access-log line per request (method, path without the query
    string, status, time to the response's start, token hint), and a bare 500 for any error
    that got past FastAPI's handlers. It does not re-raise: uvicorn would log the
    exception's text and traceback, which may quote the input."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, t0 = False, time.perf_counter()

        async def send_and_log(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                # Logged before the answer leaves: whoever reads the answer finds the line.
                log.info("%s %s %d %.1fms token=%s", scope["method"], scope["path"], message["status"],
                         (time.perf_counter() - t0) * 1000, _hint_of(scope))
            await send(message)

        try:
            await self.app(scope, receive, send_and_log)
        except Exception as e:  # noqa: BLE001 - the last line of defence
            if not started:  # FastAPI's handler answered and logged it otherwise
                log.error("unhandled %s", _describe(e))
                await JSONResponse({"error": "internal_error"}, status_code=500)(scope, receive, send_and_log)


def _describe(exc):
    """An exception's class and SQLSTATE: never its message, which may quote the input."""
    sqlstate = getattr(exc, "sqlstate", None)
    return type(exc).__name__ + (f" (SQLSTATE {sqlstate})" if sqlstate else "")


def _hint_of(scope):
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            _, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            return refusals.hint(token) or ("jwt" if refusals.is_jwt(token) else "unshaped")
    return "-"


app = create_app()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    # uvicorn's access log would print query strings; Guard logs each request instead.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_config=None)


if __name__ == "__main__":
    main()
