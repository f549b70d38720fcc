"""Hostile and broken input over TCP: a clear reason and SQLSTATE, the backend stays up, no row."""

import pytest

from conftest import compose, generate, reason_of, refusal

TEN_MB = "e2e-" + "a" * (10 * 1024 * 1024)


def flip_last(token):
    return token[:-1] + ("B" if token[-1] == "A" else "A")


CASES = [
    ("NULL", lambda t: None, "malformed"),
    ("empty", lambda t: "", "malformed"),
    ("10 MB", lambda t: TEN_MB, "malformed"),
    ("quote and comment", lambda t: "e2e-'; DROP TABLE token.tokens; --", "malformed"),
    ("backslash and semicolon", lambda t: "e2e-\\';SELECT pg_sleep(10);--", "malformed"),
    ("like wildcards", lambda t: "e2e-%%%%_____", "malformed"),
    ("whitespace around a token", lambda t: " " + t, "malformed"),
    ("truncated", lambda t: t[:-1], "malformed"),
    ("one extra char", lambda t: t + "x", "malformed"),
    ("wrong checksum", flip_last, "bad_checksum"),
    ("unknown prefix", lambda t: compose("zz-", t[len("e2e-"):-6]), "unknown_prefix"),
    ("unknown prefix, checksum not recomputed", lambda t: "zz-" + t[len("e2e-"):], "bad_checksum"),
]


@pytest.mark.parametrize("name, make, reason", CASES, ids=[c[0] for c in CASES])
def test_bad_tokens_get_a_reason_and_sqlstate(db, su, admin, app, name, make, reason):
    _, good = generate(admin, db, "acme")
    bad = make(good)
    rows = su.execute("SELECT count(*) FROM token.tokens").fetchone()[0]
    assert reason_of(app, bad) == reason
    err = refusal(app, "SELECT * FROM token.validate_token(%s)", (bad,))
    assert err.sqlstate == "28000"
    assert f"token rejected: {reason}" in str(err)
    assert good not in str(err) and (bad is None or len(bad) < 8 or bad not in str(err))
    assert app.execute("SELECT 1").fetchone()[0] == 1, "the same backend keeps serving"
    assert su.execute("SELECT count(*) FROM token.tokens").fetchone()[0] == rows, "no row written"


def test_non_utf8_looking_bytes_are_malformed(db, app):
    for expr in ["convert_from('\\xc3a9c3a9'::bytea, 'UTF8') || 'e2e-'",
                 "convert_from('\\xe282ac'::bytea, 'UTF8')",
                 "convert_from('\\xff41'::bytea, 'LATIN1')"]:
        row = app.execute(f"SELECT valid, reason FROM token.check_token({expr})").fetchone()
        assert row == (False, "malformed"), expr
    err = refusal(app, "SELECT token.hash_token(repeat('x', 300))")
    assert err.sqlstate == "22023", "hash_token refuses oversized input before hashing"


def test_an_unregistered_prefix_with_a_valid_checksum_is_unknown_prefix(db, app):
    token = compose("nope-", "Q" * 22)
    assert reason_of(app, token) == "unknown_prefix"
    err = refusal(app, "SELECT * FROM token.validate_token(%s)", (token,))
    assert err.sqlstate == "28000" and "token rejected: unknown_prefix" in str(err)


def test_a_never_issued_token_is_not_found(db, app):
    token = compose("e2e-", "Q" * 22)
    assert reason_of(app, token) == "not_found"


def test_bad_admin_input_writes_nothing(db, su, admin):
    rows = su.execute("SELECT count(*) FROM token.tokens").fetchone()[0]
    for sql, params, sqlstate in [
        ("SELECT token.generate_token(NULL, 'agent')", (), "22004"),
        ("SELECT token.generate_token(%s, 'agent')", ("x" * (10 * 1024 * 1024),), "22023"),
        ("SELECT token.generate_token('acme', %s)", ("agent'; DROP TABLE token.tokens; --",), "42704"),
        ("SELECT token.register_prefix(%s, 'agent', 'dev')", ("bad prefix",), "22023"),
        ("SELECT token.register_prefix('e2e-x-', 'agent', 'dev')", (), "22023"),
        ("SELECT token.revoke_token(NULL)", (), "22004"),
    ]:
        err = refusal(admin, sql, params)
        assert err.sqlstate == sqlstate, (sql, err.sqlstate, str(err))
    assert su.execute("SELECT count(*) FROM token.tokens").fetchone()[0] == rows
    assert su.execute("SELECT to_regclass('token.tokens') IS NOT NULL").fetchone()[0]


@pytest.mark.parametrize("arg", ["replace", "conceal_cross_account", "reuse_detection"])
def test_null_boolean_option_is_22004_not_an_internal_error(su, admin, arg):
    """Found by tests/fuzz (seed 1): a NULL for one of create_key_type's boolean options was
    refused by pgrx with XX000 ("argument 6 must not be null"); it is a NULL argument, 22004."""
    err = refusal(admin, f"SELECT token.create_key_type('fz_null_bool', {arg} => NULL)")
    assert err.sqlstate == "22004", err
    assert f"{arg} must not be NULL" in str(err)
    assert su.execute("SELECT count(*) FROM token.key_types WHERE name = 'fz_null_bool'").fetchone()[0] == 0


@pytest.mark.parametrize("ttl", ["-2147483648 seconds", "0", "1 day -48 hours", "1 month -31 days"])
def test_legacy_issuer_exchange_ttl_not_positive_is_22023_not_a_check_violation(su, admin, ttl):
    """Found by tests/fuzz (seed 202195857): an exchange_ttl of '-2147483648 seconds' reached the
    table's check constraint (23514); it is a bad argument, 22023, and nothing is registered.
    Intervals compare as Postgres compares them: '1 month -31 days' is negative."""
    err = refusal(admin, "SELECT token.register_legacy_issuer('fz_ttl', '{HS256}', %s, 'agent', 'dev', "
                         "now() + interval '1 day', exchange_ttl => %s::interval)", ("k" * 40, ttl))
    assert err.sqlstate == "22023", err
    assert "exchange_ttl must be positive" in str(err)
    assert su.execute("SELECT count(*) FROM token.legacy_issuers WHERE name = 'fz_ttl'").fetchone()[0] == 0


def test_legacy_issuer_exchange_ttl_mixed_but_positive_is_accepted(su, admin):
    """'1 month -29 days' is a day to Postgres (and to the table's check): accepted."""
    admin.execute("SELECT token.register_legacy_issuer('fz_ttl_ok', '{HS256}', %s, 'agent', 'dev', "
                  "now() + interval '1 day', exchange_ttl => '1 month -29 days')", ("k" * 40,))
    try:
        assert su.execute("SELECT exchange_ttl > interval '0' FROM token.legacy_issuers WHERE name = 'fz_ttl_ok'").fetchone()[0]
    finally:
        su.execute("SELECT token.drop_legacy_issuer('fz_ttl_ok')")


def test_legacy_issuer_environment_too_long_is_22023_not_a_check_violation(su, admin):
    """Found by tests/fuzz (seed 1): an environment over 31 characters reached the table's
    check constraint (23514); it is a bad argument, 22023, and nothing is registered."""
    err = refusal(admin, "SELECT token.register_legacy_issuer('fz_env_long', '{HS256}', %s, 'agent', %s, now() + interval '1 day')",
                  ("k" * 40, "e" * 32))
    assert err.sqlstate == "22023", err
    assert su.execute("SELECT count(*) FROM token.legacy_issuers WHERE name = 'fz_env_long'").fetchone()[0] == 0


@pytest.mark.parametrize("field, value", [("account_claim", "c" * 129), ("scopes_claim", ""), ("issuer", "i" * 1025),
                                          ("audience", "")])
def test_legacy_issuer_fields_beyond_the_tables_bounds_are_22023(su, admin, field, value):
    """Found by tests/fuzz (seed 2250082437): an account claim over 128 characters reached the
    table's check constraint (23514); every bounded field is a bad argument, and nothing is
    registered."""
    err = refusal(admin, f"SELECT token.register_legacy_issuer('fz_field', '{{HS256}}', %s, 'agent', 'dev', "
                         f"now() + interval '1 day', {field} => %s)", ("k" * 40, value))
    assert err.sqlstate == "22023" and field in str(err), err
    assert su.execute("SELECT count(*) FROM token.legacy_issuers WHERE name = 'fz_field'").fetchone()[0] == 0
