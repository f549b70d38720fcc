"""Key management beyond issue/rotate/revoke (issue 15): disable and enable, update in place,
child tokens (derive_token) and concealed cross-account refusals. Every change must be seen by
another session's very next call, even one that had the token cached."""

import secrets

import psycopg
import pytest

from conftest import flush, generate, reason_of, refusal


@pytest.fixture()
def other(db):
    """A second application session that caches what it validates."""
    with db.connect("e2e_app", autocommit=True) as c:
        yield c


def warm(conn, token):
    assert reason_of(conn, token) is None
    assert reason_of(conn, token) is None


def events(su, token_id, event):
    return su.execute("SELECT detail, db_user, client_addr FROM token.events WHERE token_id = %s AND event = %s ORDER BY id",
                      (token_id, event)).fetchall()


# ---- disable / enable ----

def test_disable_refuses_at_once_and_enable_brings_it_back(db, su, admin, other):
    token_id, token = generate(admin, db, "acme-dis")
    warm(other, token)
    assert admin.execute("SELECT token.disable_token(%s, 'suspicious traffic')", (token_id,)).fetchone()[0] is True
    assert reason_of(other, token) == "disabled"
    err = refusal(other, "SELECT * FROM token.validate_token(%s)", (token,))
    assert err.sqlstate == "28000" and "token rejected: disabled" in str(err)
    assert admin.execute("SELECT token.disable_token(%s)", (token_id,)).fetchone()[0] is False, "already disabled"
    row = admin.execute("SELECT status, disabled_reason, disabled_at IS NOT NULL FROM token.token_list WHERE id = %s",
                        (token_id,)).fetchone()
    assert row == ("disabled", "suspicious traffic", True)
    assert events(su, token_id, "disabled") == [("suspicious traffic", "e2e_admin", "127.0.0.1")], "who and why"
    assert admin.execute("SELECT token.enable_token(%s)", (token_id,)).fetchone()[0] is True
    assert reason_of(other, token) is None
    assert admin.execute("SELECT token.enable_token(%s)", (token_id,)).fetchone()[0] is False
    assert len(events(su, token_id, "enabled")) == 1


def test_disable_refuses_revoked_and_unknown_tokens(db, admin):
    token_id, _ = generate(admin, db, "acme-dis2")
    admin.execute("SELECT token.revoke_token(%s)", (token_id,))
    assert refusal(admin, "SELECT token.disable_token(%s)", (token_id,)).sqlstate == "55000"
    assert refusal(admin, "SELECT token.disable_token(gen_random_uuid())").sqlstate == "P0002"
    assert refusal(admin, "SELECT token.enable_token(NULL)").sqlstate == "22004"


def test_a_disabled_token_cannot_be_rotated(db, admin):
    token_id, _ = generate(admin, db, "acme-dis3")
    admin.execute("SELECT token.disable_token(%s)", (token_id,))
    err = refusal(admin, "SELECT * FROM token.rotate_token(%s)", (token_id,))
    assert err.sqlstate == "55000" and "disabled" in str(err)


# ---- update ----

def test_update_is_seen_by_the_next_call_of_every_session(db, su, admin, other):
    # A key type without max_ttl, so that the expiry can be removed.
    token_id, token = generate(admin, db, "acme-upd", key_type="mid", name="before")
    warm(other, token)
    admin.execute("SELECT token.update_token(%s, scopes => '{read}')", (token_id,))
    admin.execute("""SELECT token.update_token(%s, name => 'after', scopes => '{read,write}',
                                               metadata => '{"tier": "gold"}', expires_at => now() + interval '7 days')""",
                  (token_id,))
    row = other.execute("SELECT name, scopes, metadata->>'tier', expires_at > now() + interval '6 days' "
                        "FROM token.validate_token(%s)", (token,)).fetchone()
    assert row == ("after", ["read", "write"], "gold", True)
    assert reason_of(other, token, scope="write") is None
    admin.execute("SELECT token.update_token(%s, scopes => '{read}')", (token_id,))
    assert reason_of(other, token, scope="write") == "insufficient_scope"
    admin.execute("SELECT token.update_token(%s, unset => '{name,expires_at}')", (token_id,))
    assert other.execute("SELECT name, expires_at FROM token.validate_token(%s)", (token,)).fetchone() == (None, None)
    detail = events(su, token_id, "updated")
    assert [d[0] for d in detail] == ["changed=scopes", "changed=name,scopes,metadata,expires_at", "changed=scopes",
                                      "changed=name,expires_at"]


def test_a_key_type_narrowed_after_issue_narrows_its_tokens_at_once(db, su, admin, other):
    """Issuing and updating keep a token's scopes within its key type's allowed_scopes. A key
    type redefined narrower afterwards applies at once, like a revocation: its tokens lose the
    scopes it no longer lists in every session's next call, even one that had them cached, for
    validation, required scopes and the RLS identity alike. The table keeps them, and widening
    the key type again gives them back."""
    kt = f"narrow_{secrets.token_hex(3)}"
    su.execute("SELECT token.create_key_type(%s, allowed_scopes => '{read,write}')", (kt,))
    su.execute("SELECT token.register_prefix(%s, %s, 'dev')", (f"n{secrets.token_hex(3)}-", kt))
    token_id, token = generate(admin, db, "acme", key_type=kt, scopes=["read", "write"])
    scopes = "SELECT scopes FROM token.validate_token(%s)"
    assert other.execute(scopes, (token,)).fetchone()[0] == ["read", "write"]  # and cached
    su.execute("SELECT token.create_key_type(%s, allowed_scopes => '{read}', replace => true)", (kt,))
    assert other.execute(scopes, (token,)).fetchone()[0] == ["read"]
    assert reason_of(other, token, scope="write") == "insufficient_scope"
    assert reason_of(other, token, scope="read") is None
    with other.transaction():  # authenticate binds the identity for the transaction
        other.execute("SELECT token.authenticate(%s)", (token,))
        assert other.execute("SELECT token.current_scopes(), token.has_scope('write'), token.has_scope('read')") \
            .fetchone() == (["read"], False, True)
    assert su.execute("SELECT scopes FROM token.tokens WHERE id = %s", (token_id,)).fetchone()[0] == ["read", "write"], \
        "the table keeps what was issued"
    su.execute("SELECT token.create_key_type(%s, allowed_scopes => '{read,write,admin}', replace => true)", (kt,))
    assert other.execute(scopes, (token,)).fetchone()[0] == ["read", "write"]
    su.execute("SELECT token.create_key_type(%s, allowed_scopes => '{}', replace => true)", (kt,))
    assert other.execute(scopes, (token,)).fetchone()[0] == []
    with db.connect("e2e_app", autocommit=True) as fresh:  # a session that never cached it
        assert fresh.execute(scopes, (token,)).fetchone()[0] == []


@pytest.mark.parametrize("args, message", [
    ("scopes => '{admin,superpower}'", "not allowed"),
    ("expires_at => now() - interval '1 second'", "in the future"),
    ("expires_at => now() + interval '91 days'", "max_ttl"),
    ("unset => '{expires_at}'", "max_ttl"),
    ("unset => '{colour}'", "unknown field"),
    ("name => 'x', unset => '{name}'", "both given and unset"),
    ("metadata => '[1,2]'", "JSON object"),
    ("uses => -1", "negative"),
    ("refill_uses => 5", "go together"),
])
def test_update_refuses_what_the_rules_forbid(db, admin, args, message):
    token_id, _ = generate(admin, db, "acme-upd2", expires_in="30 days")
    err = refusal(admin, f"SELECT token.update_token(%s, {args})", (token_id,))
    assert err.sqlstate == "22023", (args, err.sqlstate, str(err))
    assert message in str(err), (args, str(err))


def test_update_refuses_revoked_and_unknown_tokens(db, admin):
    token_id, _ = generate(admin, db, "acme-upd3")
    admin.execute("SELECT token.revoke_token(%s)", (token_id,))
    assert refusal(admin, "SELECT token.update_token(%s, name => 'x')", (token_id,)).sqlstate == "55000"
    assert refusal(admin, "SELECT token.update_token(gen_random_uuid(), name => 'x')").sqlstate == "P0002"


# ---- child tokens ----

def derive(admin, db, parent_id, **named):
    args = "".join(f", {k} => %({k})s" for k in named)
    row = admin.execute(f"SELECT token_id, token FROM token.derive_token(%(p)s{args})", {"p": parent_id, **named}).fetchone()
    db.record(row[1])
    return row


def test_a_rotated_child_expires_no_later_than_its_parent(db, admin):
    """Found by tests/fuzz (seed 1): rotating a derived token gave its successor the same
    lifetime counted from the rotation's now(), so past its parent's expiry by the time between
    derivation and rotation (any two transactions); it is capped at the parent's."""
    parent_id, _ = generate(admin, db, "acme-kids-rot", expires_in="1 day")
    child_id, _ = derive(admin, db, parent_id)
    succ_id, succ = admin.execute("SELECT token_id, token FROM token.rotate_token(%s)", (child_id,)).fetchone()
    db.record(succ)
    row = admin.execute("SELECT s.parent_id, s.expires_at <= p.expires_at FROM token.token_list s, token.token_list p "
                        "WHERE s.id = %s AND p.id = %s", (succ_id, parent_id)).fetchone()
    assert row == (parent_id, True), "the successor keeps its parent and expires no later than it"


def test_a_child_holds_at_most_its_parent_s_scopes_and_lifetime(db, admin):
    parent_id, _ = generate(admin, db, "acme-kids", scopes=["read", "write"], expires_in="10 days")
    child_id, child = derive(admin, db, parent_id, scopes=["read"])
    row = admin.execute("SELECT account, scopes, parent_id, expires_at = (SELECT expires_at FROM token.token_list WHERE id = %s) "
                        "FROM token.validate_token(%s)", (parent_id, child)).fetchone()
    assert row == ("acme-kids", ["read"], parent_id, True), "same account, narrower scopes, the parent's expiry by default"
    err = refusal(admin, "SELECT * FROM token.derive_token(%s, scopes => '{read,admin}')", (parent_id,))
    assert err.sqlstate == "22023" and "parent" in str(err)
    err = refusal(admin, "SELECT * FROM token.derive_token(%s, expires_in => '11 days')", (parent_id,))
    assert err.sqlstate == "22023" and "outlive" in str(err)


def test_revoking_disabling_or_expiring_a_parent_refuses_every_descendant(db, su, admin, other):
    root_id, root = generate(admin, db, "acme-tree")
    child_id, child = derive(admin, db, root_id)
    _, grandchild = derive(admin, db, child_id)
    warm(other, grandchild)
    admin.execute("SELECT token.disable_token(%s)", (root_id,))
    assert reason_of(other, child) == "parent_invalid"
    assert reason_of(other, grandchild) == "parent_invalid"
    err = refusal(other, "SELECT * FROM token.validate_token(%s)", (grandchild,))
    assert err.sqlstate == "28000" and "an ancestor token is disabled" in err.diag.message_detail
    admin.execute("SELECT token.enable_token(%s)", (root_id,))
    assert reason_of(other, grandchild) is None
    su.execute("UPDATE token.tokens SET expires_at = now() - interval '1 second' WHERE id = %s", (child_id,))
    assert reason_of(other, grandchild) == "parent_invalid"
    su.execute("UPDATE token.tokens SET expires_at = NULL WHERE id = %s", (child_id,))
    assert reason_of(other, grandchild) is None
    admin.execute("SELECT token.revoke_token(%s)", (root_id,))
    assert [reason_of(other, t) for t in (root, child, grandchild)] == ["revoked", "parent_invalid", "parent_invalid"]


def test_rotating_a_parent_keeps_its_children_alive(db, admin, other):
    parent_id, _ = generate(admin, db, "acme-rot")
    _, child = derive(admin, db, parent_id)
    new_id, _ = admin.execute("SELECT token_id, token FROM token.rotate_token(%s, grace => '0 seconds')", (parent_id,)).fetchone()
    assert reason_of(other, child) is None, "the child now hangs from the successor"
    assert other.execute("SELECT parent_id FROM token.validate_token(%s)", (child,)).fetchone()[0] == new_id


def test_narrowing_a_parent_narrows_its_descendants(db, admin):
    parent_id, _ = generate(admin, db, "acme-narrow", scopes=["read", "write"])
    child_id, _ = derive(admin, db, parent_id)
    admin.execute("SELECT token.update_token(%s, scopes => '{read}', expires_at => now() + interval '1 day')", (parent_id,))
    row = admin.execute("SELECT scopes, expires_at <= now() + interval '1 day' FROM token.token_list WHERE id = %s",
                        (child_id,)).fetchone()
    assert row == (["read"], True)


def test_depth_and_fan_out_are_bounded(db, su, admin):
    level0, _ = generate(admin, db, "acme-deep")
    ids = [level0]
    for _ in range(3):  # token.max_token_depth defaults to 3
        ids.append(derive(admin, db, ids[-1])[0])
    err = refusal(admin, "SELECT * FROM token.derive_token(%s)", (ids[-1],))
    assert err.sqlstate == "53400" and "max_token_depth" in str(err)
    su.execute("SET token.max_child_tokens = 2")
    wide, _ = generate(admin, db, "acme-wide")
    su.execute("SELECT token.derive_token(%s)", (wide,))
    first = su.execute("SELECT token_id FROM token.derive_token(%s)", (wide,)).fetchone()[0]
    err = refusal(su, "SELECT * FROM token.derive_token(%s)", (wide,))
    assert err.sqlstate == "53400" and "max_child_tokens" in str(err)
    su.execute("SELECT token.revoke_token(%s)", (first,))
    su.execute("SELECT token.derive_token(%s)", (wide,))  # a revoked child frees its place
    su.execute("RESET token.max_child_tokens")


def test_only_a_live_token_has_children_and_holders_derive_their_own(db, admin, app):
    dead_id, _ = generate(admin, db, "acme-dead")
    admin.execute("SELECT token.revoke_token(%s)", (dead_id,))
    assert refusal(admin, "SELECT * FROM token.derive_token(%s)", (dead_id,)).sqlstate == "55000"
    _, own = generate(admin, db, "acme-own", scopes=["read", "write"])
    child = db.record(admin.execute("SELECT token FROM token.derive_own_token(%s, scopes => '{read}')", (own,)).fetchone()[0])
    assert app.execute("SELECT scopes FROM token.validate_token(%s)", (child,)).fetchone()[0] == ["read"]
    assert refusal(app, "SELECT * FROM token.derive_own_token(%s)", (own,)).sqlstate == "42501", "not granted to validators"
    mistyped = own[:-1] + ("x" if own[-1] != "x" else "y")  # never the token itself
    err = refusal(admin, "SELECT * FROM token.derive_own_token(%s)", (mistyped,))
    assert err.sqlstate == "28000"


# ---- concealed cross-account refusals ----

def test_a_concealing_key_type_answers_not_found_and_records_the_truth(db, su, admin):
    su.execute("SELECT token.create_key_type('hidden', conceal_cross_account => true)")
    su.execute("SELECT token.create_key_type('hider', can_validate => '{hidden}')")
    su.execute("SELECT token.register_prefix('e2ehid-', 'hidden', 'dev')")
    su.execute("SELECT token.register_prefix('e2ehdr-', 'hider', 'dev')")
    try:
        _, theirs = generate(admin, db, "globex-h", key_type="hidden")
        _, caller = generate(admin, db, "acme-h", key_type="hider")
        marker = "conceal-test"
        with db.connect("e2e_app", application_name=marker, autocommit=True) as app:
            assert reason_of(app, theirs, caller) == "not_found"
            err = refusal(app, "SELECT * FROM token.validate_token(%s, %s)", (theirs, caller))
            assert "token rejected: not_found" in str(err) and "no token matches" in err.diag.message_detail
            assert "account" not in err.diag.message_detail
        flush(su)
        reasons = {r for (r,) in su.execute("SELECT reason FROM token.events WHERE application_name = %s", (marker,))}
        assert reasons == {"cross_account"}, "the event keeps the truth"
    finally:
        su.execute("DELETE FROM token.tokens WHERE key_type IN ('hidden', 'hider')")
        su.execute("DELETE FROM token.prefixes WHERE key_type IN ('hidden', 'hider')")
        su.execute("DELETE FROM token.key_types WHERE name IN ('hidden', 'hider')")
