"""Migrating from JWTs (issue 14): the JWTs of a registered legacy issuer validate like pg_token's
own tokens until the issuer's cut-off, over TCP from ordinary roles.

JWTs are made with PyJWT (HS256 with a 40-byte secret, RS256 with a 2048-bit key registered as
PEM, PKCS#1 PEM, JWK and JWK set, ES256 on P-256); the forgeries PyJWT refuses to make (alg
none, HS256 keyed with an RSA public key's PEM) are built by hand. Each test uses issuers and
accounts of its own and drops its issuers in a finally block. Every JWT made here is recorded
for the leak check and, at the end of the module, searched for in the server log."""

import base64
import contextlib
import datetime
import hashlib
import hmac
import json
import math
import re
import secrets
import time
import uuid

import jwt as pyjwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from conftest import flush, generate, reason_of, refusal

UTC = datetime.timezone.utc
CUTOFF = datetime.datetime(2099, 6, 30, 12, 0, tzinfo=UTC)  # far ahead: JWTs validate
MIGRATION = "Switch to a pg_token key: https://example.com/docs/migrate-api-keys"
IDENTITY = ["token_id", "account", "key_type", "environment", "scopes", "name", "expires_at", "revoke_after", "metadata",
            "parent_id", "uses_remaining", "rate_limit", "rate_remaining", "rate_reset_at", "deprecation", "sunset_at"]
ISSUER_COLUMNS = {"name", "algorithms", "key_type", "environment", "cutoff_at", "migration_message", "issuer", "audience",
                  "account_claim", "scopes_claim", "exchange_ttl", "created_at"}

MADE = []  # every JWT this module made, forged ones included: none may reach the server log


# ---- making JWTs ----

def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj):
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def record(env, token):
    """Remembers a JWT for the log check below and for tests/leakcheck.py (env.record_jwt)."""
    MADE.append(token)
    return env.record_jwt(token)


def now():
    return int(time.time())


def claims(account, iss, scope="read", ttl=600, jti=True, **more):
    c = {"sub": account, "iss": iss, "exp": now() + ttl, "iat": now()}
    if scope is not None:
        c["scope"] = scope
    if jti:
        c["jti"] = jti if isinstance(jti, str) else str(uuid.uuid4())
    c.update(more)
    return {k: v for k, v in c.items() if v is not None}


def hs256(env, payload, secret, headers=None):
    return record(env, pyjwt.encode(payload, secret, algorithm="HS256", headers=headers))


def signed(env, payload, private_key, alg, kid=None):
    return record(env, pyjwt.encode(payload, private_key, algorithm=alg, headers={"kid": kid} if kid else None))


def by_hand(env, header, payload, key):
    """An HS256-style JWT HMAC'd with any bytes (PyJWT refuses a PEM key for HMAC)."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return record(env, f"{signing_input}.{b64(sig)}")


def unsigned(env, payload, signature=""):
    return record(env, f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(payload)}.{signature}")


def junk():
    """A signature-sized random segment, distinct per forgery (so that each is searched for alone)."""
    return b64(secrets.token_bytes(32))


def flip_inside(segment_text):
    """One character changed in the middle of a base64url segment (the last character may hold
    only padding bits, so changing it need not change the bytes)."""
    i = len(segment_text) // 2
    return segment_text[:i] + ("B" if segment_text[i] != "B" else "C") + segment_text[i + 1:]


def rsa_key(bits=2048):
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_key(curve=None):
    return ec.generate_private_key(curve or ec.SECP256R1())


def spki_pem(private_key):
    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def pkcs1_pem(private_key):
    return private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode()


def jwk(private_key, kid=None):
    if isinstance(private_key, rsa.RSAPrivateKey):
        d = json.loads(RSAAlgorithm.to_jwk(private_key.public_key()))
    else:
        d = json.loads(ECAlgorithm.to_jwk(private_key.public_key()))
    if kid:
        d["kid"] = kid
    return d


def unique(stem):
    """A name that fits [a-z][a-z0-9_]{0,30} and an account nobody else uses."""
    return f"{stem}_{secrets.token_hex(3)}"


def secret():
    return "s3cret-" + secrets.token_hex(20)  # 47 bytes


@contextlib.contextmanager
def issuer(conn, name, algorithms, key, key_type="agent", environment="dev", cutoff_at=CUTOFF, **named):
    """register_legacy_issuer with named arguments; dropped again on the way out."""
    args = "".join(f", {k} => %({k})s" for k in named)
    conn.execute(f"SELECT token.register_legacy_issuer(%(name)s, %(algorithms)s, %(key)s, %(key_type)s, %(environment)s, "
                 f"%(cutoff_at)s{args})",
                 {"name": name, "algorithms": algorithms, "key": key, "key_type": key_type, "environment": environment,
                  "cutoff_at": cutoff_at, **named})
    try:
        yield name
    finally:
        conn.execute("SELECT token.drop_legacy_issuer(%s)", (name,))


def validated(conn, token, *more):
    """validate_token's row as a dict of its columns."""
    cur = conn.execute("SELECT * FROM token.validate_token(%s" + ", %s" * len(more) + ")", (token, *more))
    row = cur.fetchone()
    return dict(zip([c.name for c in cur.description], row))


def rejected(conn, token, reason, caller=None, scope=None):
    """check_token says `reason`, and validate_token raises 28000 naming it; returns the error."""
    assert reason_of(conn, token, caller, scope) == reason, reason
    err = refusal(conn, "SELECT * FROM token.validate_token(%s, %s, %s)", (token, caller, scope))
    assert err.sqlstate == "28000", (reason, err.sqlstate, str(err))
    assert reason in str(err) or (reason == "environment_mismatch" and "environment mismatch" in str(err)), str(err)
    return err


def at(epoch):
    return datetime.datetime.fromtimestamp(epoch, tz=UTC)


class Notice:
    """What a notice said, copied inside the handler (psycopg's Diagnostic is valid only there)."""

    def __init__(self, diag):
        self.message_primary = diag.message_primary or ""
        self.message_detail = diag.message_detail or ""
        self.severity_nonlocalized = diag.severity_nonlocalized


def notices_of(conn):
    got = []
    conn.add_notice_handler(lambda diag: got.append(Notice(diag)))
    return got


# ---- registration ----

def test_the_token_admin_registers_and_reads_issuers_but_never_their_keys(db, admin, app):
    name, key = unique("reg"), secret()
    with issuer(admin, name, ["HS256"], key, migration_message=MIGRATION, issuer="https://reg.example",
                exchange_ttl="7 days"):
        cur = admin.execute("SELECT * FROM token.legacy_issuers WHERE name = %s", (name,))
        assert {c.name for c in cur.description} == ISSUER_COLUMNS, "the issuers' view has no key column"
        row = dict(zip([c.name for c in cur.description], cur.fetchone()))
        assert row["algorithms"] == ["HS256"] and row["key_type"] == "agent" and row["environment"] == "dev"
        assert row["cutoff_at"] == CUTOFF and row["migration_message"] == MIGRATION
        assert row["issuer"] == "https://reg.example" and row["audience"] is None
        assert (row["account_claim"], row["scopes_claim"]) == ("sub", "scope")
        assert row["exchange_ttl"] == datetime.timedelta(days=7)
        err = refusal(admin, "SELECT * FROM token.legacy_issuer_keys")
        assert err.sqlstate == "42501", "the keys are the extension owner's only"
        assert key not in str(err)
        for sql in ("SELECT * FROM token.legacy_issuers", "SELECT * FROM token.legacy_issuer_keys"):
            assert refusal(app, sql).sqlstate == "42501", sql
        assert refusal(app, "SELECT token.register_legacy_issuer('x', '{HS256}', %s, 'agent', 'dev', now())",
                       (secret(),)).sqlstate == "42501", "a validator registers nothing"
    assert admin.execute("SELECT count(*) FROM token.legacy_issuers WHERE name = %s", (name,)).fetchone()[0] == 0
    assert admin.execute("SELECT token.drop_legacy_issuer(%s)", (name,)).fetchone()[0] is False, "already dropped"


def registration_cases():
    weak_rsa, p384, rsa_ok = rsa_key(1024), ec_key(ec.SECP384R1()), rsa_key()
    return [
        ("short secret", ["HS256"], "x" * 31),
        ("HS256 with RS256", ["HS256", "RS256"], secret()),
        ("no algorithm", [], secret()),
        ("unknown algorithm", ["PS256"], spki_pem(rsa_ok)),
        ("alg none", ["none"], secret()),
        ("1024-bit RSA", ["RS256"], spki_pem(weak_rsa)),
        ("P-384 for ES256", ["ES256"], spki_pem(p384)),
        ("an RSA key for ES256", ["ES256"], spki_pem(rsa_ok)),
        ("garbage PEM", ["RS256"], "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n"),
        ("a private key", ["RS256"], rsa_ok.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()).decode()),
        ("empty JWK set", ["RS256"], json.dumps({"keys": []})),
        ("an oct JWK for RS256", ["RS256"], json.dumps({"kty": "oct", "k": b64(b"k" * 40)})),
    ]


@pytest.mark.parametrize("what, algorithms, key", registration_cases(), ids=[c[0] for c in registration_cases()])
def test_bad_key_material_or_algorithm_mix_is_22023(su, what, algorithms, key):
    name = unique("bad")
    err = refusal(su, "SELECT token.register_legacy_issuer(%s, %s, %s, 'agent', 'dev', now() + interval '1 day')",
                  (name, algorithms, key))
    assert err.sqlstate == "22023", (what, err.sqlstate, str(err))
    assert key not in str(err) and (err.diag.message_detail or "").find(key) < 0, "never the key in an error"
    assert su.execute("SELECT count(*) FROM token.legacy_issuers WHERE name = %s", (name,)).fetchone()[0] == 0


def test_names_key_types_and_duplicates_are_checked(su):
    name = unique("dup")
    with issuer(su, name, ["HS256"], secret(), issuer=f"https://{name}.example"):
        err = refusal(su, "SELECT token.register_legacy_issuer(%s, '{HS256}', %s, 'agent', 'dev', now())", (name, secret()))
        assert err.sqlstate == "42710", "duplicate name"
        err = refusal(su, "SELECT token.register_legacy_issuer(%s, '{HS256}', %s, 'agent', 'dev', now(), issuer => %s)",
                      (unique("dup2"), secret(), f"https://{name}.example"))
        assert err.sqlstate == "42710", "duplicate iss"
    for bad in ("Upper", "9lives", "has-dash", "x" * 32, ""):
        err = refusal(su, "SELECT token.register_legacy_issuer(%s, '{HS256}', %s, 'agent', 'dev', now())", (bad, secret()))
        assert err.sqlstate == "22023", (bad, err.sqlstate)
    err = refusal(su, "SELECT token.register_legacy_issuer(%s, '{HS256}', %s, 'no_such_type', 'dev', now())",
                  (unique("kt"), secret()))
    assert err.sqlstate == "42704"


# ---- acceptance ----

def test_an_hs256_jwt_yields_the_identity_with_its_deprecation(db, su, admin, app):
    name, key, account = unique("hs"), secret(), unique("acct")
    iss = f"https://{name}.example"
    with issuer(admin, name, ["HS256"], key, migration_message=MIGRATION, issuer=iss):
        payload = claims(account, iss, scope="read write")
        token = hs256(db, payload, key)
        assert token.startswith("eyJ")
        notices = notices_of(app)
        cur = app.execute("SELECT * FROM token.validate_token(%s)", (token,))
        assert [c.name for c in cur.description] == IDENTITY, "deprecation and sunset_at are appended"
        row = dict(zip(IDENTITY, cur.fetchone()))
        assert row["account"] == account and row["scopes"] == ["read", "write"]
        assert (row["key_type"], row["environment"]) == ("agent", "dev")
        assert row["expires_at"] == at(payload["exp"])
        assert row["metadata"] == {"legacy_jwt": {"issuer": name, "jti": payload["jti"]}}
        assert row["sunset_at"] == CUTOFF
        deprecation = row["deprecation"]
        assert name in deprecation and "2099-06-30" in deprecation, deprecation
        assert MIGRATION in deprecation and deprecation.index(MIGRATION) > deprecation.index(name), \
            "a sentence naming the issuer and the cut-off, then the migration message"
        assert isinstance(row["token_id"], uuid.UUID)
        assert any(n.message_primary.startswith("pg_token: legacy JWT") and n.severity_nonlocalized == "NOTICE"
                   for n in notices), [n.message_primary for n in notices]
        assert all(token not in n.message_primary + n.message_detail for n in notices)
        # check_token: the same verdict as a row, with the same two columns at its end.
        cur = app.execute("SELECT * FROM token.check_token(%s)", (token,))
        verdict = dict(zip([c.name for c in cur.description], cur.fetchone()))
        assert [c.name for c in cur.description][-2:] == ["deprecation", "sunset_at"]
        assert verdict["valid"] is True and verdict["reason"] is None
        assert (verdict["token_id"], verdict["deprecation"], verdict["sunset_at"]) == \
            (row["token_id"], row["deprecation"], CUTOFF)
        # pg_token's own tokens carry neither.
        _, own = generate(admin, db, account)
        mine = validated(app, own)
        assert (mine["deprecation"], mine["sunset_at"]) == (None, None)


def test_token_ids_are_stable_per_issuer_and_jti(db, su, app):
    key, account = secret(), unique("acct")
    a, b = unique("ida"), unique("idb")
    with issuer(su, a, ["HS256"], key, issuer=f"https://{a}.example"), \
            issuer(su, b, ["HS256"], key, issuer=f"https://{b}.example"):
        jti = str(uuid.uuid4())
        first = hs256(db, claims(account, f"https://{a}.example", jti=jti, ttl=600), key)
        again = hs256(db, claims(account, f"https://{a}.example", jti=jti, ttl=900), key)
        other = hs256(db, claims(account, f"https://{b}.example", jti=jti), key)
        ids = [validated(app, t)["token_id"] for t in (first, again, other)]
        assert ids[0] == ids[1], "same issuer and jti: same token_id"
        assert ids[0] != ids[2], "another issuer: another token_id"
        plain1 = hs256(db, claims(account, f"https://{a}.example", jti=None, ttl=600), key)
        plain2 = hs256(db, claims(account, f"https://{a}.example", jti=None, ttl=601), key)
        row = validated(app, plain1)
        assert row["metadata"] == {"legacy_jwt": {"issuer": a, "jti": None}}
        assert row["token_id"] == validated(app, plain1)["token_id"], "no jti: derived from the JWT, stable"
        assert row["token_id"] != validated(app, plain2)["token_id"]


def test_claims_are_read_as_registered(db, su, app):
    name, key = unique("clm"), secret()
    iss = f"https://{name}.example"
    with issuer(su, name, ["HS256"], key, issuer=iss, account_claim="uid", scopes_claim="scp"):
        row = validated(app, hs256(db, claims("ignored", iss, scope=None, uid=42, scp=["read", "write"]), key))
        assert (row["account"], row["scopes"]) == ("42", ["read", "write"]), "integer account, array scopes"
        row = validated(app, hs256(db, claims("ignored", iss, scope=None, uid="00042", scp="admin read"), key))
        assert (row["account"], row["scopes"]) == ("42", ["admin", "read"]), "canonical spelling, space-separated"
        upper = "6F1C1E1A-1111-4C3E-9D1A-AAAAAAAAAAAA"
        assert validated(app, hs256(db, claims("x", iss, scope=None, uid=upper), key))["account"] == upper.lower()
        no_scopes = validated(app, hs256(db, claims("x", iss, scope=None, uid="acme-ns"), key))
        assert no_scopes["scopes"] == []
        rejected(app, hs256(db, claims("has-sub-only", iss, scope=None), key), "malformed")  # no uid claim


def test_rs256_as_spki_pem_pkcs1_pem_and_jwk(db, su, app):
    key = rsa_key()
    for form, material in (("spki", spki_pem(key)), ("pkcs1", pkcs1_pem(key)), ("jwk", json.dumps(jwk(key)))):
        name, account = unique(f"rs_{form}"), unique("acct")
        iss = f"https://{name}.example"
        with issuer(su, name, ["RS256"], material, issuer=iss):
            row = validated(app, signed(db, claims(account, iss), key, "RS256"))
            assert (row["account"], row["key_type"]) == (account, "agent"), form
            rejected(app, signed(db, claims(account, iss), rsa_key(), "RS256"), "bad_signature")


def test_a_jwk_set_chooses_the_key_by_kid(db, su, app):
    k1, k2 = rsa_key(), rsa_key()
    name, account = unique("jwks"), unique("acct")
    iss = f"https://{name}.example"
    keys = json.dumps({"keys": [jwk(k1, "k1"), jwk(k2, "k2")]})
    with issuer(su, name, ["RS256"], keys, issuer=iss):
        assert validated(app, signed(db, claims(account, iss), k1, "RS256", kid="k1"))["account"] == account
        assert validated(app, signed(db, claims(account, iss), k2, "RS256", kid="k2"))["account"] == account
        rejected(app, signed(db, claims(account, iss), k1, "RS256", kid="k2"), "bad_signature")
        rejected(app, signed(db, claims(account, iss), k1, "RS256", kid="k3"), "bad_signature")


def test_es256_on_p256(db, su, app):
    key = ec_key()
    name, account = unique("es"), unique("acct")
    iss = f"https://{name}.example"
    with issuer(su, name, ["ES256"], spki_pem(key), issuer=iss):
        row = validated(app, signed(db, claims(account, iss, scope="read"), key, "ES256"))
        assert (row["account"], row["scopes"]) == (account, ["read"])
        rejected(app, signed(db, claims(account, iss), ec_key(), "ES256"), "bad_signature")
        rejected(app, signed(db, claims(account, iss), rsa_key(), "RS256"), "bad_signature")
    # Both algorithms on one issuer: a JWK set with one key of each.
    rk, name = rsa_key(), unique("both")
    iss = f"https://{name}.example"
    with issuer(su, name, ["RS256", "ES256"], json.dumps({"keys": [jwk(rk, "r"), jwk(key, "e")]}), issuer=iss):
        assert validated(app, signed(db, claims(account, iss), rk, "RS256", kid="r"))["account"] == account
        assert validated(app, signed(db, claims(account, iss), key, "ES256", kid="e"))["account"] == account


def legacy_notices(got):
    return [n.severity_nonlocalized for n in got if n.message_primary.startswith("pg_token: legacy JWT")]


def test_token_legacy_notice_off_silences_the_notice(db, su):
    name, key = unique("ntc"), secret()
    iss = f"https://{name}.example"
    with issuer(su, name, ["HS256"], key, issuer=iss):
        token = hs256(db, claims(unique("acct"), iss), key)
        with db.connect("e2e_app", autocommit=True) as c:
            got = notices_of(c)
            validated(c, token)
            validated(c, token)  # a cached verdict still tells the client
            assert legacy_notices(got) == ["NOTICE", "NOTICE"]
            c.execute("SET token.legacy_notice = off")
            validated(c, token)
            assert legacy_notices(got) == ["NOTICE", "NOTICE"], "off: no notice"
            assert validated(c, token)["deprecation"] is not None, "the column says it anyway"


def test_token_legacy_notice_is_notice_by_default_and_can_warn(db, su):
    name, key = unique("wrn"), secret()
    iss = f"https://{name}.example"
    with issuer(su, name, ["HS256"], key, issuer=iss):
        token = hs256(db, claims(unique("acct"), iss), key)
        with db.connect("e2e_app", autocommit=True) as c:
            assert c.execute("SHOW token.legacy_notice").fetchone()[0] == "notice", "off | notice | warning"
            got = notices_of(c)
            c.execute("SET token.legacy_notice = warning")
            validated(c, token)
            c.execute("SET token.legacy_notice = notice")
            validated(c, token)
            assert legacy_notices(got) == ["WARNING", "NOTICE"]


def test_the_from_variants_and_authenticate_take_a_jwt(db, su, app):
    name, key, account = unique("frm"), secret(), unique("acct")
    iss = f"https://{name}.example"
    with issuer(su, name, ["HS256"], key, issuer=iss):
        token = hs256(db, claims(account, iss), key)
        with db.connect("e2e_gateway", autocommit=True) as gw:
            assert gw.execute("SELECT account FROM token.validate_token_from('192.0.2.1', %s)", (token,)).fetchone()[0] \
                == account
            assert gw.execute("SELECT valid FROM token.check_token_from('192.0.2.1', %s)", (token,)).fetchone()[0] is True
        with db.connect("e2e_app") as c:
            c.execute("SELECT token.authenticate(%s)", (token,))
            ident = c.execute("SELECT (i).account, (i).deprecation IS NOT NULL, (i).sunset_at "
                              "FROM (SELECT token.current_identity() AS i) s").fetchone()
            assert ident == (account, True, CUTOFF)
            c.rollback()


def test_authenticate_with_a_jwt_binds_the_identity_for_rls(db, su):
    name, key = unique("rls"), secret()
    iss = f"https://{name}.example"
    with issuer(su, name, ["HS256"], key, issuer=iss):
        token = hs256(db, claims("acme", iss, scope="read"), key)
        with db.connect("e2e_tenant") as tenant:
            tenant.execute("SELECT token.authenticate(%s)", (token,))
            assert tenant.execute("SELECT token.current_account(), token.has_scope('read'), token.has_scope('write')") \
                .fetchone() == ("acme", True, False)
            tenants = [t for (t,) in tenant.execute("SELECT tenant FROM app.projects")]
            assert tenants and set(tenants) == {"acme"}, tenants
            err = refusal(tenant, "INSERT INTO app.projects (tenant, name) VALUES ('acme', 'from-a-jwt')")
            assert err.sqlstate == "42501", "a read-only JWT cannot write"
            assert tenant.execute("SELECT count(*) FROM app.projects").fetchone()[0] == 0, "the identity ended"
            tenant.rollback()


# ---- refusals ----

def test_malformed_jwts(db, su, app):
    name, key = unique("mal"), secret()
    iss = f"https://{name}.example"
    header = segment({"alg": "HS256", "typ": "JWT"})
    with issuer(su, name, ["HS256"], key, issuer=iss):
        good = claims(unique("acct"), iss)
        cases = {
            "oversized": hs256(db, dict(good, padding="p" * 9000), key),
            "bad base64": record(db, f"{header}.{segment(good)[:-2]}!!.{junk()}"),
            "base64 of impossible length": record(db, f"{header}.A.{junk()}"),
            "payload not JSON": record(db, f"{header}.{b64(b'{not json')}.{junk()}"),
            "payload a JSON array": record(db, f"{header}.{b64(b'[1,2]')}.{junk()}"),
            "no exp": hs256(db, {k: v for k, v in good.items() if k != "exp"}, key),
            "exp a string": hs256(db, dict(good, exp="tomorrow"), key),
            "no account claim": hs256(db, {k: v for k, v in good.items() if k != "sub"}, key),
            "four segments": record(db, pyjwt.encode(good, key, algorithm="HS256") + ".eyJ9"),
        }
        assert len(cases["oversized"]) > 8192
        got = {what: reason_of(app, token) for what, token in cases.items()}
        assert got == dict.fromkeys(cases, "malformed")
        err = refusal(app, "SELECT * FROM token.validate_token(%s)", (cases["oversized"],))
        assert err.sqlstate == "28000" and "malformed" in str(err)


def test_unsigned_confused_forged_and_tampered_jwts_are_bad_signature(db, su, app):
    rsa_private = rsa_key()
    pem = spki_pem(rsa_private)
    name, account = unique("sig"), unique("acct")
    iss = f"https://{name}.example"
    with issuer(su, name, ["RS256"], pem, issuer=iss):
        good = signed(db, claims(account, iss), rsa_private, "RS256")
        assert validated(app, good)["account"] == account
        h, p, s = good.split(".")
        forged = claims(account, iss, scope="read write admin")
        cases = {
            "alg none, no signature": unsigned(db, forged),
            "alg none, a signature": unsigned(db, forged, s),
            "alg NONE": record(db, f"{segment({'alg': 'NONE'})}.{segment(forged)}."),
            # The confusion attack: HS256 keyed with the issuer's public key, as text and as bytes.
            "HS256 keyed with the RSA public PEM": by_hand(db, {"alg": "HS256", "typ": "JWT"}, forged, pem.encode()),
            "HS256 keyed with the PEM, no newline": by_hand(db, {"alg": "HS256"}, forged, pem.strip().encode()),
            "HS256 keyed with the DER": by_hand(db, {"alg": "HS256"}, forged, rsa_private.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)),
            "ES256 to an RS256 issuer": signed(db, forged, ec_key(), "ES256"),
            "another RSA key": signed(db, forged, rsa_key(), "RS256"),
            "payload tampered": record(db, f"{h}.{segment(forged)}.{s}"),
            "signature tampered": record(db, f"{h}.{p}.{flip_inside(s)}"),
            "signature cut": record(db, f"{h}.{p}.{s[:len(s) // 4 * 4 - 4]}"),
            "header says RS512": record(db, f"{segment({'alg': 'RS512', 'typ': 'JWT'})}.{p}.{s}"),
        }
        got = {what: reason_of(app, token) for what, token in cases.items()}
        assert got == dict.fromkeys(cases, "bad_signature")
        rejected(app, cases["HS256 keyed with the RSA public PEM"], "bad_signature")
    name, key = unique("hsig"), secret()
    iss = f"https://{name}.example"
    with issuer(su, name, ["HS256"], key, issuer=iss):
        rejected(app, hs256(db, claims(account, iss), secret()), "bad_signature")
        rejected(app, signed(db, claims(account, iss), rsa_key(), "RS256"), "bad_signature")


def test_expiry_leeway_and_nbf(db, su):
    name, key, account = unique("exp"), secret(), unique("acct")
    iss = f"https://{name}.example"
    with issuer(su, name, ["HS256"], key, issuer=iss):
        with db.connect("e2e_app", autocommit=True) as app:
            assert app.execute("SELECT current_setting('token.jwt_leeway')").fetchone()[0] in ("30", "30s")
            long_gone = hs256(db, claims(account, iss, ttl=-120), key)
            just_gone = hs256(db, claims(account, iss, ttl=-10), key)
            early = hs256(db, claims(account, iss, nbf=now() + 120), key)
            nearly = hs256(db, claims(account, iss, nbf=now() + 10), key)
            rejected(app, long_gone, "expired")
            rejected(app, early, "expired")
            assert reason_of(app, just_gone) is None, "within the 30 s leeway"
            assert reason_of(app, nearly) is None, "nbf within the leeway"
        with db.su() as s:  # a superuser setting
            s.execute("SET token.jwt_leeway = 0")
            assert reason_of(s, just_gone) == "expired"
            assert reason_of(s, nearly) == "expired"
        with db.su() as s:  # the same session: a verdict cached under a wider leeway is not reused
            assert reason_of(s, just_gone) is None
            s.execute("SET token.jwt_leeway = 0")
            assert reason_of(s, just_gone) == "expired", "the cached verdict ignored the new leeway"
            payload = claims(account, iss, ttl=2)
            soon = hs256(db, payload, key)
            assert reason_of(s, soon) is None
            time.sleep(max(0.0, payload["exp"] - time.time()) + 1.1)  # no clock to pass in over TCP
            assert reason_of(s, soon) == "expired", "a cached JWT expires on time"


def test_issuer_and_audience_route_and_must_match(db, su, app):
    key, account = secret(), unique("acct")
    a, b = unique("aud"), unique("noaud")
    with issuer(su, a, ["HS256"], key, issuer=f"https://{a}.example", audience="https://api.example"), \
            issuer(su, b, ["HS256"], key, issuer=f"https://{b}.example"):
        ia, ib = f"https://{a}.example", f"https://{b}.example"
        assert reason_of(app, hs256(db, claims(account, ia, aud="https://api.example"), key)) is None
        assert reason_of(app, hs256(db, claims(account, ia, aud=["https://other.example", "https://api.example"]),
                                    key)) is None, "aud as a list naming it"
        rejected(app, hs256(db, claims(account, ia, aud="https://other.example"), key), "unknown_issuer")
        rejected(app, hs256(db, claims(account, ia), key), "unknown_issuer")  # audience required, none given
        assert reason_of(app, hs256(db, claims(account, ib), key)) is None
        rejected(app, hs256(db, claims(account, ib, aud="https://api.example"), key), "unknown_issuer")
        rejected(app, hs256(db, claims(account, f"https://{unique('nobody')}.example"), key), "unknown_issuer")
        assert reason_of(app, hs256(db, claims(account, ia + "/", aud="https://api.example"), key)) == "unknown_issuer", \
            "iss compared exactly"


def test_an_issuer_without_iss_takes_the_unrouted_jwts(db, su, app):
    routed, fallback = unique("routed"), unique("fallback")
    k1, k2, account = secret(), secret(), unique("acct")
    with issuer(su, routed, ["HS256"], k1, issuer=f"https://{routed}.example"), issuer(su, fallback, ["HS256"], k2):
        assert validated(app, hs256(db, claims(account, f"https://{routed}.example"), k1))["metadata"]["legacy_jwt"][
            "issuer"] == routed
        row = validated(app, hs256(db, claims(account, "https://anything.example"), k2))
        assert row["metadata"]["legacy_jwt"]["issuer"] == fallback
        no_iss = hs256(db, claims(account, None), k2)
        assert validated(app, no_iss)["metadata"]["legacy_jwt"]["issuer"] == fallback
        # Signed with the fallback's key but claiming the routed issuer: checked against the routed one.
        rejected(app, hs256(db, claims(account, f"https://{routed}.example"), k2), "bad_signature")


def test_an_issuer_of_another_environment_is_environment_mismatch(db, su, app):
    name, key = unique("prd"), secret()
    iss = f"https://{name}.example"
    with issuer(su, name, ["HS256"], key, environment="prod", issuer=iss):
        rejected(app, hs256(db, claims(unique("acct"), iss), key), "environment_mismatch")


def test_after_the_cutoff_a_jwt_is_retired_with_the_migration_message(db, su, admin):
    name, key = unique("cut"), secret()
    iss = f"https://{name}.example"
    with issuer(admin, name, ["HS256"], key, migration_message=MIGRATION, issuer=iss):
        token = hs256(db, claims(unique("acct"), iss), key)
        with db.connect("e2e_app", autocommit=True) as other:
            assert reason_of(other, token) is None and reason_of(other, token) is None  # cached
            admin.execute("SELECT token.alter_legacy_issuer(%s, migration_message => 'Use pg_token keys now')", (name,))
            assert "Use pg_token keys now" in validated(other, token)["deprecation"]
            assert admin.execute("SELECT migration_message, cutoff_at FROM token.legacy_issuers WHERE name = %s",
                                 (name,)).fetchone() == ("Use pg_token keys now", CUTOFF), "NULL cutoff_at: unchanged"
            admin.execute("SELECT token.alter_legacy_issuer(%s, cutoff_at => now() - interval '1 second', "
                          "migration_message => %s)", (name, MIGRATION))
            err = rejected(other, token, "legacy_token_retired")
            assert MIGRATION in (err.diag.message_detail or ""), err.diag.message_detail
            assert token not in (err.diag.message_detail or "") + str(err)
            admin.execute("SELECT token.alter_legacy_issuer(%s, cutoff_at => %s)", (name, CUTOFF))
            assert reason_of(other, token) is None, "moving the cut-off back brings the JWTs back"


def test_alter_replaces_algorithms_and_key_together(db, su):
    name, old, new = unique("rot"), secret(), secret()
    iss = f"https://{name}.example"
    with issuer(su, name, ["HS256"], old, issuer=iss):
        account = unique("acct")
        before = hs256(db, claims(account, iss), old)
        with db.connect("e2e_app", autocommit=True) as app:
            assert reason_of(app, before) is None
            err = refusal(su, "SELECT token.alter_legacy_issuer(%s, key => %s)", (name, new))
            assert err.sqlstate == "22023" and new not in str(err), "a key alone: algorithms and key change together"
            err = refusal(su, "SELECT token.alter_legacy_issuer(%s, algorithms => '{HS256}', key => 'short')", (name,))
            assert err.sqlstate == "22023"
            su.execute("SELECT token.alter_legacy_issuer(%s, algorithms => '{HS256}', key => %s)", (name, new))
            assert reason_of(app, before) == "bad_signature", "the old key is gone at the next call"
            assert reason_of(app, hs256(db, claims(account, iss), new)) is None
            rsa_private = rsa_key()
            su.execute("SELECT token.alter_legacy_issuer(%s, algorithms => '{RS256}', key => %s)", (name, spki_pem(rsa_private)))
            assert su.execute("SELECT algorithms FROM token.legacy_issuers WHERE name = %s", (name,)).fetchone()[0] == ["RS256"]
            assert reason_of(app, hs256(db, claims(account, iss), new)) == "bad_signature"
            assert reason_of(app, signed(db, claims(account, iss), rsa_private, "RS256")) is None
        assert refusal(su, "SELECT token.alter_legacy_issuer(%s, cutoff_at => now())", (unique("ghost"),)).sqlstate \
            in ("42704", "P0002")


def test_dropping_an_issuer_refuses_its_jwts(db, su, app):
    name, key = unique("drop"), secret()
    iss = f"https://{name}.example"
    with issuer(su, name, ["HS256"], key, issuer=iss):
        token = hs256(db, claims(unique("acct"), iss), key)
        assert reason_of(app, token) is None
    assert reason_of(app, token) == "unknown_issuer"


def test_revocation_by_jti_and_by_account(db, su, admin):
    name, key = unique("rev"), secret()
    iss = f"https://{name}.example"
    with issuer(su, name, ["HS256"], key, issuer=iss):
        account, bystander = unique("acct"), unique("acct")
        jti = str(uuid.uuid4())
        by_jti = hs256(db, claims(account, iss, jti=jti), key)
        same_jti = hs256(db, claims(account, iss, jti=jti, ttl=1200), key)
        other_jti = hs256(db, claims(account, iss), key)
        old_no_jti = hs256(db, claims(account, iss, jti=None), key)
        no_iat = hs256(db, claims(account, iss, iat=None), key)
        theirs = hs256(db, claims(bystander, iss), key)
        with db.connect("e2e_app", autocommit=True) as app:
            for t in (by_jti, same_jti, other_jti, old_no_jti, no_iat, theirs):
                assert reason_of(app, t) is None
            assert admin.execute("SELECT token.revoke_legacy_jwt(%s, %s, 'leaked')", (name, jti)).fetchone()[0] is True
            assert admin.execute("SELECT token.revoke_legacy_jwt(%s, %s)", (name, jti)).fetchone()[0] is False
            rejected(app, by_jti, "revoked")
            assert reason_of(app, same_jti) == "revoked", "revoked by (issuer, jti), whatever else differs"
            assert reason_of(app, other_jti) is None
            admin.execute("SELECT token.revoke_account_tokens(%s, 'compromised')", (account,))
            assert [reason_of(app, t) for t in (other_jti, old_no_jti, no_iat, theirs)] == \
                ["revoked", "revoked", "revoked", None]
            # A JWT issued after the account's revocation is accepted.
            after = su.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()[0]
            fresh = hs256(db, claims(account, iss, iat=math.floor(after) + 1), key)
            assert reason_of(app, fresh) is None, "issued after the revocation"


def test_caller_tokens_and_required_scopes_apply_to_jwts(db, su, admin, app):
    name, key = unique("cal"), secret()
    iss = f"https://{name}.example"
    account, stranger = unique("acct"), unique("acct")
    with issuer(su, name, ["HS256"], key, issuer=iss):
        token = hs256(db, claims(account, iss, scope="read"), key)
        _, mid_same = generate(admin, db, account, key_type="mid")
        _, mid_other = generate(admin, db, stranger, key_type="mid")
        _, agent_same = generate(admin, db, account)
        assert validated(app, token, mid_same)["account"] == account
        rejected(app, token, "cross_account", caller=mid_other)
        rejected(app, token, "caller_not_permitted", caller=agent_same)
        typo = mid_same[:-1] + ("x" if mid_same[-1] != "x" else "y")
        assert reason_of(app, token, caller=typo) == "caller_invalid"
        assert reason_of(app, token, scope="read") is None
        rejected(app, token, "insufficient_scope", scope="write")
        assert reason_of(app, token, mid_same, "read") is None



def test_a_jwt_carries_only_the_scopes_its_key_type_allows(db, su, app):
    """A JWT counts as a token of its issuer's key type, so it carries no scope that type
    forbids: the claim's other scopes are dropped (an issuer signing `deploy` does not make an
    agent key a deploy key), for validation, required scopes, RLS and exchange alike; and a
    redefined key type applies at once, to JWTs a backend has already verified."""
    name, key = unique("scp"), secret()
    iss = f"https://{name}.example"
    account, kt = unique("acct"), unique("jwt_kt")
    su.execute("SELECT token.create_key_type(%s, allowed_scopes => '{read}')", (kt,))
    su.execute("SELECT token.register_prefix(%s, %s, 'dev')", (f"j{secrets.token_hex(3)}-", kt))  # for the exchange
    with issuer(su, name, ["HS256"], key, key_type=kt, issuer=iss):
        token = hs256(db, claims(account, iss, scope="read write deploy"), key)
        assert validated(app, token)["scopes"] == ["read"]
        rejected(app, token, "insufficient_scope", scope="deploy")
        assert reason_of(app, token, scope="read") is None
        su.execute("SELECT token.create_key_type(%s, allowed_scopes => '{read,deploy}', replace => true)", (kt,))
        assert validated(app, token)["scopes"] == ["read", "deploy"], "the same session, the new definition"
        assert reason_of(app, token, scope="deploy") is None
        su.execute("SELECT token.create_key_type(%s, replace => true)", (kt,))  # allowed_scopes NULL: any
        assert validated(app, token)["scopes"] == ["read", "write", "deploy"]
        su.execute("SELECT token.create_key_type(%s, allowed_scopes => '{read}', replace => true)", (kt,))
        new, new_id, _, first = app.execute("SELECT * FROM token.exchange_legacy_jwt(%s)", (token,)).fetchone()
        db.record(new)
        assert first is True and validated(app, new)["scopes"] == ["read"], "exchanged for what the JWT may carry"


# ---- exchange ----

def test_a_client_exchanges_its_jwt_once_for_an_opaque_token(db, su, app):
    name, key = unique("exc"), secret()
    iss = f"https://{name}.example"
    account = unique("acct")
    with issuer(su, name, ["HS256"], key, issuer=iss, exchange_ttl="7 days"):
        jti = str(uuid.uuid4())
        token = hs256(db, claims(account, iss, scope="read write", jti=jti), key)
        cur = app.execute("SELECT * FROM token.exchange_legacy_jwt(%s, name => 'migrated')", (token,))
        assert [c.name for c in cur.description] == ["token", "token_id", "expires_at", "first_exchange"]
        new, new_id, expires_at, first = cur.fetchone()
        db.record(new)
        assert first is True and new and not new.startswith("eyJ"), "an opaque pg_token token"
        server_now = app.execute("SELECT now()").fetchone()[0]
        assert abs((expires_at - server_now) - datetime.timedelta(days=7)) < datetime.timedelta(minutes=1)
        row = validated(app, new)
        assert (row["token_id"], row["account"], row["key_type"], row["environment"], row["scopes"], row["name"]) == \
            (new_id, account, "agent", "dev", ["read", "write"], "migrated")
        assert (row["deprecation"], row["sunset_at"]) == (None, None)
        assert row["expires_at"] == expires_at
        again = app.execute("SELECT * FROM token.exchange_legacy_jwt(%s)", (token,)).fetchone()
        assert again[0] is None and again[1] == new_id and again[3] is False, "once per jti"
        same_jti = hs256(db, claims(account, iss, scope="read write", jti=jti, ttl=1200), key)
        assert app.execute("SELECT token, token_id, first_exchange FROM token.exchange_legacy_jwt(%s)",
                           (same_jti,)).fetchone() == (None, new_id, False)
        # Without a jti: once per JWT.
        plain = hs256(db, claims(account, iss, jti=None), key)
        t1, id1, _, f1 = app.execute("SELECT * FROM token.exchange_legacy_jwt(%s)", (plain,)).fetchone()
        db.record(t1)
        assert f1 is True and id1 != new_id
        assert app.execute("SELECT token, token_id, first_exchange FROM token.exchange_legacy_jwt(%s)",
                           (plain,)).fetchone() == (None, id1, False)
        # A refused JWT is refused here too.
        err = refusal(app, "SELECT * FROM token.exchange_legacy_jwt(%s)", (hs256(db, claims(account, iss), secret()),))
        assert err.sqlstate == "28000" and "bad_signature" in str(err)
        # The exchanged token is pg_token's own: revoking the account revokes it like any other.
        su.execute("SELECT token.revoke_account_tokens(%s)", (account,))
        assert reason_of(app, new) == "revoked"


def test_an_exchanged_token_outlives_its_issuer(db, su, app):
    name, key, account = unique("out"), secret(), unique("acct")
    iss = f"https://{name}.example"
    with issuer(su, name, ["HS256"], key, issuer=iss, exchange_ttl="1 day"):
        jwt_token = hs256(db, claims(account, iss), key)
        new = db.record(app.execute("SELECT token FROM token.exchange_legacy_jwt(%s)", (jwt_token,)).fetchone()[0])
        assert reason_of(app, new) is None
    assert reason_of(app, jwt_token) == "unknown_issuer"
    assert validated(app, new)["account"] == account, "the exchanged token is pg_token's own"


# ---- events and logs ----

def test_uses_are_counted_as_deprecation_events_and_no_event_holds_a_jwt(db, su):
    name, key = unique("evt"), secret()
    iss = f"https://{name}.example"
    marker = f"legacy-{uuid.uuid4()}"
    jti = "jti" + secrets.token_hex(12)
    with issuer(su, name, ["HS256"], key, issuer=iss):
        good = hs256(db, claims(unique("acct"), iss, jti=jti), key)
        forged = hs256(db, claims(unique("acct"), iss, jti=jti), secret())
        stranger = hs256(db, claims(unique("acct"), f"https://{unique('nobody')}.example"), key)
        with db.connect("e2e_app", application_name=marker, autocommit=True) as app:
            for _ in range(3):
                validated(app, good)
            assert reason_of(app, good) is None
            app.execute("SELECT token.authenticate(%s)", (good,))  # autocommit: its own transaction
            assert reason_of(app, forged) == "bad_signature"
            assert reason_of(app, stranger) == "unknown_issuer"
        flush(su)
        cur = su.execute("SELECT * FROM token.events WHERE application_name = %s ORDER BY id", (marker,))
        names = [c.name for c in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
    used = [r for r in rows if r["event"] == "legacy_jwt_used"]
    assert used and all(r["reason"] is None and r["prefix"] == name for r in used), used
    assert sum(r["count"] for r in used) == 5, "every accepted use counted"
    refused = {r["reason"]: r for r in rows if r["event"] == "refused"}
    assert set(refused) == {"bad_signature", "unknown_issuer"}, rows
    assert refused["bad_signature"]["prefix"] == name
    assert refused["unknown_issuer"]["prefix"] == "jwt"
    for r in rows:
        for column, value in r.items():
            if isinstance(value, str):
                for token in (good, forged, stranger):
                    for part in token.split("."):
                        assert part not in value, f"events.{column} holds part of a JWT"
    hint = refused["bad_signature"]["hint"] or ""
    assert hint.startswith("jti=" + jti[:4]) and jti not in hint, f"hint {hint!r}: the jti's first characters"


JWT_SHAPE = re.compile(r"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def test_a_jwt_never_reaches_the_server_log(db, su):
    """log_statement = 'all' (conftest): a JWT as a literal in the statement text, as a bind
    parameter, in refused calls and with the notice at WARNING (which the log keeps); then every
    JWT-shaped string this module made, whole or its payload or signature. (Strings that are not
    JWT-shaped, such as the one with '!!' in it, are not JWTs to the log hook either.)"""
    name, key = unique("log"), secret()
    iss = f"https://{name}.example"
    marker = f"legacy-log-{uuid.uuid4()}"
    with issuer(su, name, ["HS256"], key, migration_message=MIGRATION, issuer=iss):
        good = hs256(db, claims(unique("acct"), iss), key)
        bad = hs256(db, claims(unique("acct"), iss), secret())
        with db.connect("e2e_app", autocommit=True) as app:
            try:
                app.execute("SET token.legacy_notice = warning")
                warned = True
            except psycopg.Error:  # reported by test_the_notice_follows_token_legacy_notice
                warned = False
            for token in (good, bad):
                app.execute(f"SELECT valid FROM token.check_token('{token}')")  # a literal, as a careless app would
                app.execute("SELECT valid FROM token.check_token(%s)", (token,))
            refusal(app, f"SELECT * FROM token.validate_token('{bad}')")
            refusal(app, f"SELECT * FROM token.exchange_legacy_jwt('{bad}')")
            app.execute(f"SELECT * FROM token.validate_token('{good}')")
            app.execute(f"SELECT '{marker}'")
    flush(su)
    log = (db.data / "server.log").read_text(errors="replace")
    assert marker in log, "statements are logged (log_statement = 'all'): the search below means something"
    if warned:
        assert "pg_token: legacy JWT" in log, "at WARNING the legacy-JWT line reaches the log"
    shaped = [t for t in MADE if JWT_SHAPE.match(t)]
    assert len(shaped) >= 2, len(shaped)
    leaked = []
    for token in shaped:
        for part in [token] + [p for p in token.split(".")[1:] if len(p) >= 16]:
            at = log.find(part)
            if at >= 0:  # say where, without the JWT
                line = log[log.rfind("\n", 0, at) + 1:at] + "<JWT part>"
                leaked.append(line[-160:])
                break
    assert not leaked, f"{len(leaked)} of {len(shaped)} JWTs (or their payload or signature) are in the server log:\n" + \
        "\n".join(leaked)


def test_an_issuers_secret_never_reaches_the_server_log(db, su, admin):
    """Key material is a literal or a bind parameter of register/alter_legacy_issuer: with
    log_statement = 'all' the log hook masks every literal of those statements' lines."""
    name, literal_key, bound_key, new_key = unique("keylog"), secret(), secret(), secret()
    marker = f"legacy-keylog-{uuid.uuid4()}"
    su.execute(f"SELECT token.register_legacy_issuer('{name}', '{{HS256}}', '{literal_key}', 'agent', 'dev', now() + interval '1 day')")
    admin.execute("SELECT token.alter_legacy_issuer(%s, algorithms => %s, key => %s)", (name, ["HS256"], bound_key))
    admin.execute(f"SELECT token.alter_legacy_issuer('{name}', algorithms => '{{HS256}}', key => '{new_key}')")
    err = refusal(admin, f"SELECT token.register_legacy_issuer('{name}2', '{{HS256}}', 'short-{new_key[:8]}', 'agent', 'dev', now())")
    assert err.sqlstate == "22023"
    su.execute(f"SELECT '{marker}'")
    su.execute("SELECT token.drop_legacy_issuer(%s)", (name,))
    flush(su)
    log = (db.data / "server.log").read_text(errors="replace")
    assert marker in log and "legacy_issuer" in log, "the statements are logged, masked"
    for key in (literal_key, bound_key, new_key, f"short-{new_key[:8]}"):
        assert key not in log and key[:16] not in log, "an issuer's key is in the server log"
