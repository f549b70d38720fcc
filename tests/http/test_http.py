"""The HTTP example (examples/http) over real HTTP: uvicorn processes on 127.0.0.1 in front of
the test cluster, driven with httpx. Every response of every test is checked for tokens
(conftest._no_token_in); the leak check then searches the service logs with the server's."""

import asyncio
import datetime
import email.utils
import re
import secrets
import time

import jwt as pyjwt
import psycopg
import pytest

import load
import refusals
from conftest import ALPHABET, DB, PROD, compose, generate

TENANT_ROWS = {"acme": 2, "globex": 3}  # sql/examples/multi_tenant.sql


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def random_body():
    return "".join(secrets.choice(ALPHABET) for _ in range(22))


@pytest.fixture()
def su(db):
    with db.su() as c:
        yield c


def tenant_names(su, account, table="app.projects"):
    return sorted(r[0] for r in su.execute(f"SELECT name FROM {table} WHERE tenant = %s", (account,)))


@pytest.mark.parametrize("account", ["acme", "globex"])
def test_a_valid_token_sees_its_tenants_rows_only(db, http, su, account):
    _, token = generate(su, db, account)
    r = http["main"].get("/projects", headers=bearer(token))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["account"] == account
    assert {p["tenant"] for p in body["projects"]} == {account}
    assert sorted(p["name"] for p in body["projects"]) == tenant_names(su, account)


def refused_token(su, env, reason):
    """A token the database refuses for `reason` (in the dev database)."""
    if reason == "malformed":
        return "not-a-token"
    if reason == "bad_checksum":
        _, token = generate(su, env, "acme")
        last = token[-1]
        return token[:-1] + ("A" if last != "A" else "B")  # one character changed: a typo
    if reason == "unknown_prefix":
        return env.record(compose("nope-", random_body()))
    if reason == "not_found":
        return env.record(compose("http-", random_body()))
    if reason == "revoked":
        token_id, token = generate(su, env, "acme")
        su.execute("SELECT token.revoke_token(%s, 'test')", (token_id,))
        return token
    if reason == "expired":
        token_id, token = generate(su, env, "acme")
        su.execute("UPDATE token.tokens SET expires_at = now() - interval '1 minute' WHERE id = %s", (token_id,))
        return token
    if reason == "disabled":
        token_id, token = generate(su, env, "acme")
        su.execute("SELECT token.disable_token(%s, 'test')", (token_id,))
        return token
    raise AssertionError(reason)


@pytest.mark.parametrize("reason", ["malformed", "bad_checksum", "unknown_prefix", "not_found", "revoked", "expired",
                                    "disabled"])
def test_a_refused_token_is_401_with_its_reason(db, http, su, reason):
    token = refused_token(su, db, reason)
    # The database's own verdict first: the HTTP answer must carry the same reason.
    assert su.execute("SELECT reason FROM token.check_token(%s)", (token,)).fetchone()[0] == reason
    r = http["main"].get("/projects", headers=bearer(token))
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="api", error="invalid_token"'
    assert r.json() == {"error": "invalid_token", "reason": reason, "message": f"token rejected: {reason}"}


def test_a_dev_token_in_the_prod_service_is_environment_mismatch(db, http, su):
    _, dev_token = generate(su, db, "acme")
    with db.su(PROD) as prod:
        _, prod_token = generate(prod, db, "acme")
        try:
            prod.execute("SELECT * FROM token.validate_token(%s)", (dev_token,))
            raise AssertionError("the prod database accepted a dev token")
        except psycopg.errors.InvalidAuthorizationSpecification as e:
            database_says = e.diag.message_primary
    assert database_says == "Token environment mismatch: dev token used in prod"
    r = http["prod"].get("/projects", headers=bearer(dev_token))
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="api", error="invalid_token"'
    assert r.json() == {"error": "invalid_token", "reason": "environment_mismatch", "message": database_says}
    # The prod service itself works: its own token is served.
    r = http["prod"].get("/projects", headers=bearer(prod_token))
    assert r.status_code == 200 and r.json()["account"] == "acme"
    assert len(r.json()["projects"]) == TENANT_ROWS["acme"]


def test_writing_needs_the_write_scope(db, http, su):
    _, reader = generate(su, db, "acme", scopes=("read",))
    _, writer = generate(su, db, "acme", scopes=("read", "write"))
    before = su.execute("SELECT count(*) FROM app.projects").fetchone()[0]
    r = http["main"].post("/projects", headers=bearer(reader), json={"name": "acme-reader-wrote-this"})
    assert r.status_code == 403, r.text
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="api", error="insufficient_scope", scope="write"'
    assert r.json()["reason"] == "insufficient_scope"
    assert su.execute("SELECT count(*) FROM app.projects").fetchone()[0] == before
    r = http["main"].post("/projects", headers=bearer(writer), json={"name": "acme-http-new"})
    assert r.status_code == 201, r.text
    assert r.json()["tenant"] == "acme" and r.json()["name"] == "acme-http-new"
    assert su.execute("SELECT tenant FROM app.projects WHERE id = %s", (r.json()["id"],)).fetchone()[0] == "acme"
    su.execute("DELETE FROM app.projects WHERE id = %s", (r.json()["id"],))


@pytest.mark.parametrize("headers, error", [
    ({}, None),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_request"),
    ({"Authorization": "Bearer"}, "invalid_request"),
    ({"Authorization": "Bearer two words"}, "invalid_request"),
], ids=["missing", "basic", "bearer-only", "two-words"])
def test_no_usable_authorization_header_is_401(http, headers, error):
    r = http["main"].get("/projects", headers=headers)
    assert r.status_code == 401, r.text
    want = 'Bearer realm="api"' + (f', error="{error}"' if error else "")
    assert r.headers["WWW-Authenticate"] == want
    assert r.json() == {"error": error or "missing_token"}


def test_bearer_scheme_is_case_insensitive(db, http, su):
    _, token = generate(su, db, "globex")
    r = http["main"].get("/projects", headers={"Authorization": f"bearer {token}"})
    assert r.status_code == 200 and r.json()["account"] == "globex"


def test_two_authorization_headers_are_refused(db, http, su):
    _, token = generate(su, db, "globex")
    r = http["main"].get("/projects", headers=[("Authorization", f"Bearer {token}"), ("Authorization", "Bearer x")])
    assert r.status_code == 401 and r.json() == {"error": "invalid_request"}


def test_database_down_is_503(db, http, su):
    _, token = generate(su, db, "acme")
    r = http["dead"].get("/projects", headers=bearer(token))
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == "5" and r.json() == {"error": "unavailable"}
    assert http["dead"].get("/readyz").status_code == 503
    assert http["main"].get("/readyz").status_code == 200


def test_connections_killed_under_the_pool_are_replaced(db, http, su):
    """A server restart or failover, as the pool sees it: every pooled connection dies. The
    next request is served on a new one (authentication had not run, so one retry is safe)."""
    _, token = generate(su, db, "acme")
    assert http["main"].get("/projects", headers=bearer(token)).status_code == 200
    sql = "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_token-http-main' AND datname = %s"
    before = {r[0] for r in su.execute(sql, (DB,))}
    assert before, "the main service holds no connection"
    killed = su.execute("SELECT bool_and(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
                        "WHERE application_name = 'pg_token-http-main' AND datname = %s", (DB,)).fetchone()[0]
    assert killed
    r = http["main"].get("/projects", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert len(r.json()["projects"]) == TENANT_ROWS["acme"]
    after = {r[0] for r in su.execute(sql, (DB,))}
    assert after and not (after & before), "the request was served on a connection that was killed"


def test_an_unplanned_error_is_a_bare_500(db, http, services, su):
    """A NUL character cannot go into a text column: psycopg raises before sending, an error
    no handler knows. The answer says nothing of the input; the log names the error class."""
    _, writer = generate(su, db, "acme", scopes=("read", "write"))
    r = http["main"].post("/projects", headers=bearer(writer), json={"name": "x\u0000" + writer})
    assert r.status_code == 500
    assert r.json() == {"error": "internal_error"}
    log = services["main"].log_text()
    assert "unhandled DataError" in log
    assert "Traceback" not in log


def test_a_bad_body_is_422_without_echo(db, http, su):
    _, writer = generate(su, db, "acme", scopes=("read", "write"))
    r = http["main"].post("/projects", headers=bearer(writer), json={"name": [writer]})
    assert r.status_code == 422
    assert r.json() == {"error": "invalid_request", "fields": [["name"]]}


def test_a_token_in_the_query_string_stays_out_of_the_log(db, http, services, su):
    _, token = generate(su, db, "acme")
    r = http["main"].get(f"/projects?api_key={token}", headers=bearer(token))
    assert r.status_code == 200
    log = services["main"].log_text()
    assert token[-28:-6] not in log
    # The access line is there, with the hint only.
    assert "GET /projects 200" in log and f"token={token[:-24]}" in log


# ---- legacy JWTs (migrating from JWTs) ----

SUNSET = datetime.datetime(2099, 6, 30, 12, 0, tzinfo=datetime.timezone.utc)
MIGRATION = "Move to pg_token keys.\nSee https://example.com/docs/migrate-from-jwt."


def record_jwt(env, token):
    """A JWT for the leak check and the response check, both of which look for a token's
    characters [-28:-6]: a JWT whose characters there are not all letters and digits is recorded
    as 22 letters and digits of its signature (or payload), padded the same way."""
    window = token[-28:-6]
    if re.fullmatch(r"[0-9A-Za-z]{22}", window):
        return env.record(token)
    runs = re.findall(r"[0-9A-Za-z]{22,}", token.rsplit(".", 1)[-1]) or re.findall(r"[0-9A-Za-z]{22,}", token)
    if runs:
        env.record(runs[-1][-22:] + "jwtfp0")
    return token


@pytest.fixture()
def legacy_issuer(su):
    """An HS256 legacy issuer in the dev database, dropped afterwards: (name, iss, secret)."""
    name, key = f"http_jwt_{secrets.token_hex(3)}", "http-secret-" + secrets.token_hex(20)
    iss = f"https://{name}.example"
    su.execute("SELECT token.register_legacy_issuer(%s, '{HS256}', %s, 'agent', 'dev', %s, %s, issuer => %s)",
               (name, key, SUNSET, MIGRATION, iss))
    yield name, iss, key
    su.execute("SELECT token.drop_legacy_issuer(%s)", (name,))


def make_jwt(db, iss, key, account="acme", scope="read"):
    now = int(time.time())
    claims = {"sub": account, "iss": iss, "scope": scope, "exp": now + 600, "iat": now, "jti": secrets.token_hex(8)}
    return record_jwt(db, pyjwt.encode(claims, key, algorithm="HS256"))


def test_a_legacy_jwt_is_served_with_deprecation_sunset_and_link(db, http, services, su, legacy_issuer):
    name, iss, key = legacy_issuer
    token = make_jwt(db, iss, key)
    deprecation = su.execute("SELECT deprecation FROM token.check_token(%s)", (token,)).fetchone()[0]
    assert deprecation and name in deprecation
    r = served = http["main"].get("/projects", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.json()["account"] == "acme" and len(r.json()["projects"]) == TENANT_ROWS["acme"]
    assert r.headers["X-Auth-Deprecation"] == " ".join(deprecation.split()), "the same sentence, on one line"
    assert r.headers["Sunset"] == email.utils.format_datetime(SUNSET, usegmt=True) == "Tue, 30 Jun 2099 12:00:00 GMT"
    assert r.headers["Link"] == '<https://example.com/docs/migrate-from-jwt>; rel="deprecation"'
    # pg_token's own token: none of them.
    _, own = generate(su, db, "acme")
    r = http["main"].get("/projects", headers=bearer(own))
    assert r.status_code == 200 and not {"X-Auth-Deprecation", "Sunset", "Link"} & set(r.headers)
    # Nothing of the JWT in any response (conftest checks a fingerprint) or in the access log.
    log = services["main"].log_text()
    for part in token.split(".")[1:]:
        assert part not in log and part not in served.text
    assert "GET /projects 200" in log and "token=jwt" in log


def test_legacy_jwt_refusals_are_401_and_a_retired_one_says_where_to_go(db, http, su, legacy_issuer):
    name, iss, key = legacy_issuer
    forged = make_jwt(db, iss, "not-the-secret-" + secrets.token_hex(20))
    stranger = make_jwt(db, "https://nobody.example", key)
    for token, reason in ((forged, "bad_signature"), (stranger, "unknown_issuer")):
        r = http["main"].get("/projects", headers=bearer(token))
        assert r.status_code == 401, r.text
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="api", error="invalid_token"'
        assert r.json() == {"error": "invalid_token", "reason": reason, "message": f"token rejected: {reason}"}
    token = make_jwt(db, iss, key)
    su.execute("SELECT token.alter_legacy_issuer(%s, cutoff_at => now() - interval '1 second')", (name,))
    r = http["main"].get("/projects", headers=bearer(token))
    assert r.status_code == 401, r.text
    body = r.json()
    assert body["reason"] == "legacy_token_retired" and "https://example.com/docs/migrate-from-jwt" in body["migration"]
    assert "\n" not in body["migration"]
    assert r.headers["Link"] == '<https://example.com/docs/migrate-from-jwt>; rel="deprecation"'


def test_deprecation_headers_are_header_safe():
    headers = refusals.deprecation_headers("legacy JWT\r\nSet-Cookie: x=1\u00e9 see http://a.example/m).", SUNSET)
    assert headers["X-Auth-Deprecation"] == "legacy JWT Set-Cookie: x=1? see http://a.example/m)."
    assert headers["Link"] == '<http://a.example/m>; rel="deprecation"'
    assert "Link" not in refusals.deprecation_headers("no url here", None)
    assert "Sunset" not in refusals.deprecation_headers("x", None)
    assert refusals.deprecation_headers(None, None) == {}
    assert len(refusals.deprecation_headers("y" * 5000, None)["X-Auth-Deprecation"]) == refusals.MAX_HEADER


def test_every_reason_the_database_knows_has_a_rule(su):
    reasons = {r[0] for r in su.execute("SELECT reason FROM token.reasons()")}
    assert reasons, "token.reasons() is empty"
    missing = reasons - set(refusals.RULES)
    assert not missing, f"add these reasons to examples/http/refusals.py RULES: {sorted(missing)}"


def test_a_rate_limit_shows_in_the_headers_and_answers_429_with_retry_after(db, http, su):
    _, token = generate(su, db, "acme", rate_limits='{"(2,\\"1 hour\\")"}')
    answers = [http["main"].get("/projects", headers=bearer(token)) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    for a, left in zip(answers[:2], (1, 0)):
        assert a.headers["RateLimit-Policy"] == '"pg_token";q=2'
        assert a.headers["RateLimit"].startswith(f'"pg_token";r={left};t=')
    refused = answers[2]
    wait = int(refused.headers["Retry-After"])
    assert 1 <= wait <= 3600, wait
    assert refused.headers["RateLimit"] == f'"pg_token";r=0;t={wait}'
    assert refused.json() == {"error": "rate_limited", "reason": "rate_limited", "message": "token rejected: rate_limited"}
    assert "WWW-Authenticate" not in refused.headers


def test_a_spent_cap_is_403_or_429_until_its_refill(db, http, su):
    _, once = generate(su, db, "acme", uses=1)
    assert http["main"].get("/projects", headers=bearer(once)).status_code == 200
    r = http["main"].get("/projects", headers=bearer(once))
    assert r.status_code == 403 and r.json()["reason"] == "usage_exceeded", "no refill: retrying never helps"
    _, daily = generate(su, db, "acme", uses=1, refill_uses=1, refill_interval="1 day")
    assert http["main"].get("/projects", headers=bearer(daily)).status_code == 200
    r = http["main"].get("/projects", headers=bearer(daily))
    assert r.status_code == 429 and 80_000 < int(r.headers["Retry-After"]) <= 86_400


def test_a_token_from_another_network_is_403(db, http, su):
    _, office = generate(su, db, "acme", allowed_networks="{192.0.2.0/24}")
    r = http["main"].get("/projects", headers=bearer(office))
    assert r.status_code == 403 and r.json()["reason"] == "network_not_allowed"
    assert "WWW-Authenticate" not in r.headers


def test_unknown_reasons_refuse_never_500():
    assert refusals.refusal("some_future_reason")[0] == 401


@pytest.mark.parametrize("account", ["acme", "globex"])
def test_the_baseline_variant_serves_its_tenants_rows(db, http, su, account):
    token_id, token = generate(su, db, account)
    copy_to_baseline(su, [token_id])
    r = http["baseline"].get("/projects", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert {p["tenant"] for p in r.json()["projects"]} == {account}
    assert sorted(p["name"] for p in r.json()["projects"]) == tenant_names(su, account, "baseline.projects")
    su.execute("UPDATE baseline.api_keys SET revoked_at = now() WHERE id = %s", (token_id,))
    r = http["baseline"].get("/projects", headers=bearer(token))
    assert r.status_code == 401 and r.json()["reason"] == "rejected"  # it cannot say why
    r = http["baseline"].post("/projects", headers=bearer(token), json={"name": "x"})
    assert r.status_code == 401


def copy_to_baseline(su, ids):
    """The same tokens in the plain SQL table: its key_hash is pgcrypto's SHA-256 of the token,
    which is what token.tokens stores."""
    su.execute("INSERT INTO baseline.api_keys (id, key_hash, account, scopes, expires_at, revoke_after, revoked_at) "
               "SELECT id, token_hash, account, scopes, expires_at, revoke_after, revoked_at "
               "FROM token.tokens WHERE id = ANY(%s)", (list(ids),))


LOAD_SECONDS = 10.0
LOAD_CLIENTS = 4
HOT_SET = 64


def test_load_both_variants(db, services, su, capsys):
    """4 concurrent clients for 10 s on each variant with a hot set of valid tokens. Only the
    answers are asserted (all 200, each with its own tenant's rows); the figures are printed."""
    accounts, ids = {}, []
    for i in range(HOT_SET):
        account = ("acme", "globex")[i % 2]
        token_id, token = generate(su, db, account)
        accounts[token] = account
        ids.append(token_id)
    copy_to_baseline(su, ids)
    tokens = list(accounts)
    for name in ("main", "baseline"):
        result = asyncio.run(load.run(services[name].url, tokens, seconds=LOAD_SECONDS, clients=LOAD_CLIENTS,
                                      accounts=accounts))
        s = result.summary()
        with capsys.disabled():
            label = "pg_token" if name == "main" else "plain SQL + pgcrypto"
            print(f"\n[http] load, {label}: {LOAD_CLIENTS} clients x {result.seconds:.1f} s, {s['requests']} requests, "
                  f"{s['rps']:.0f} req/s, p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, statuses {s['statuses']}")
        assert result.requests > 0, f"{name}: no request answered"
        assert not result.errors, f"{name}: transport errors {dict(result.errors)}"
        assert set(result.statuses) == {200}, f"{name}: statuses {dict(result.statuses)}"
        assert result.wrong_tenant == 0, f"{name}: {result.wrong_tenant} answers held another tenant's rows"
