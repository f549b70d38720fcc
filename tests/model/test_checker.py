"""The checker is honest: fabricated histories with a known violation are reported, and the
orderings the model allows are not. Runs before every model-checked load (tests/model/run.sh)."""

from checker import check

S = 1_000_000  # one second in microseconds


def token(tid="t1", **over):
    st = {"kind": "opaque", "token_id": tid, "hint": "mdl-abcd", "account": "acct-1", "key_type": "model",
          "scopes": ["read"], "expires_at": None, "revoke_after": None, "revoked_at": None, "disabled_at": None}
    st.update(over)
    return st


def op(seq, start, end, state, name="op", key="t1"):
    return {"t": "op", "key": key, "seq": seq, "op": name, "start": start, "end": end, "state": state}


def val(start, end, valid, reason=None, scope=None, key="t1", **identity):
    res = {"valid": valid, "reason": reason, "server_ts": (start + end) // 2}
    if valid:
        res.update({"token_id": "t1", "account": "acct-1", "key_type": "model", "scopes": ["read"],
                    "expires_at": None, "revoke_after": None})
        res.update(identity)
    return {"t": "v", "key": key, "fn": "check", "scope": scope, "start": start, "end": end, "result": res}


def kinds(history):
    return [a["kind"] for a in check(history)[1]]


BASE = [op(0, 0, 10, token(), "generate"), op(1, 100, 110, token(revoked_at=105), "revoke")]


def test_acceptance_after_a_committed_revoke_is_reported():
    assert kinds(BASE + [val(120, 130, True)]) == ["verdict"]


def test_acceptance_overlapping_the_revoke_is_allowed():
    assert kinds(BASE + [val(105, 130, True), val(50, 101, True), val(108, 112, False, "revoked")]) == []


def test_refusal_before_the_revoke_started_is_reported():
    assert kinds(BASE + [val(20, 90, False, "revoked")]) == ["verdict"]


def test_wrong_identity_is_reported():
    assert kinds(BASE + [val(20, 30, True, account="acct-2")]) == ["wrong_identity"]
    assert kinds(BASE + [val(20, 30, True, scopes=["read", "write"])]) == ["wrong_identity"]


def test_stale_scopes_after_an_update_are_reported():
    h = [op(0, 0, 10, token(), "generate"), op(1, 100, 110, token(scopes=["read", "write"]), "update"),
         val(200, 210, True)]
    assert kinds(h) == ["wrong_identity"]
    h[-1] = val(105, 210, True)  # the update may not be visible yet
    assert kinds(h) == []


def test_rotation_grace_is_judged_by_the_clock():
    h = [op(0, 0, 10, token(), "generate"), op(1, 100, 110, token(revoke_after=5 * S), "rotate")]
    ok = dict(revoke_after=5 * S)
    assert kinds(h + [val(200, 300, True, **ok), val(5 * S - 10, 5 * S + 10, True, **ok),
                      val(5 * S - 10, 5 * S + 10, False, "revoked"), val(5 * S, 5 * S + 5, False, "revoked")]) == []
    assert kinds(h + [val(5 * S + 1, 5 * S + 10, True, **ok)]) == ["verdict"]
    assert kinds(h + [val(200, 300, False, "revoked")]) == ["verdict"]


def test_expiry_and_disable_and_scope():
    h = [op(0, 0, 10, token(expires_at=9 * S), "generate"), op(1, 100, 110, token(expires_at=9 * S, disabled_at=105), "disable")]
    assert kinds(h + [val(200, 300, False, "disabled"), val(9 * S, 9 * S + 1, False, "expired"),
                      val(20, 30, False, "insufficient_scope", scope="write")]) == []
    assert kinds(h + [val(9 * S + 2, 9 * S + 3, False, "disabled")]) == ["verdict"]
    assert kinds(h + [val(20, 30, True, scope="write", expires_at=9 * S)]) == ["verdict"]


def test_jwt_revocation():
    jwt = {"kind": "jwt", "hint": "jti:ab", "account": "acct-1", "key_type": "model", "scopes": ["read"], "exp": 100 * S,
           "leeway": 0, "revoked": False}
    h = [op(0, 0, 10, jwt, "mint", key="jwt:1"), op(1, 100, 110, dict(jwt, revoked=True), "revoke_legacy_jwt", key="jwt:1")]
    good = {"account": "acct-1", "key_type": "model", "scopes": ["read"], "expires_at": 100 * S, "revoke_after": None}
    v = lambda s, e, ok, r=None: {"t": "v", "key": "jwt:1", "fn": "validate", "scope": None, "start": s, "end": e,
                                  "result": dict(good, valid=ok, reason=r) if ok else {"valid": False, "reason": r}}
    assert kinds(h + [v(20, 30, True), v(105, 120, True), v(120, 130, False, "revoked")]) == []
    assert kinds(h + [v(120, 130, True)]) == ["verdict"]


def test_errors_and_clock_are_reported():
    e = {"t": "v", "key": "t1", "fn": "check", "scope": None, "start": 20, "end": 30,
         "result": {"error": {"sqlstate": "XX000", "message": "boom"}}}
    assert kinds(BASE + [e]) == ["unexpected_error"]
    crash = dict(e, key="?", fn="crash")  # a validator thread that died
    assert kinds(BASE + [crash]) == ["unexpected_error"]
    bad_clock = val(20, 30, True)
    bad_clock["result"]["server_ts"] = 31
    assert kinds(BASE + [bad_clock]) == ["clock"]
