"""Token families with reuse detection (issue 14, part 3; RFC 9700 section 4.14.2): under a key
type created with reuse_detection, a token rotated away and presented after its grace window
(at all, with grace 0) revokes its whole rotation family at once: every member, live or not, is
refused as family_revoked from then on, in every session, and an event names the family. The
end of a grace window is set in the table rather than waited for: no timing decides a test."""

import psycopg
import pytest

from conftest import flush, generate, reason_of, refusal


@pytest.fixture(scope="module")
def fam(db):
    """A key type with reuse detection and its dev prefix."""
    with db.su() as c:
        c.execute("SELECT token.create_key_type('fam', reuse_detection => true, replace => true)")
        if c.execute("SELECT 1 FROM token.prefixes WHERE prefix = 'e2efam-'").fetchone() is None:
            c.execute("SELECT token.register_prefix('e2efam-', 'fam', 'dev')")
    return "fam"


@pytest.fixture()
def other(db):
    """A second application session that caches what it validates."""
    with db.connect("e2e_app", autocommit=True) as c:
        yield c


def rotate(admin, db, token_id, grace):
    row = admin.execute("SELECT token_id, token FROM token.rotate_token(%s, %s::interval)", (token_id, grace)).fetchone()
    db.record(row[1])
    return row[0], row[1]


def end_grace(su, token_id):
    """The grace window of a rotated token is over (as if its time had come)."""
    su.execute("UPDATE token.tokens SET revoke_after = now() - interval '1 second' WHERE id = %s", (token_id,))


def family_rows(su, family_id):
    return su.execute("SELECT id, revoked_at IS NOT NULL, family_revoked_at IS NOT NULL, revoked_reason "
                      "FROM token.tokens WHERE family_id = %s ORDER BY created_at", (family_id,)).fetchall()


def family_events(su, token_id):
    return su.execute("SELECT event, reason, token_id, account, hint, detail, db_user FROM token.events "
                      "WHERE event = 'family_revoked' AND token_id = %s", (token_id,)).fetchall()


def test_reuse_after_grace_revokes_the_whole_family(db, su, admin, app, other, fam):
    t0_id, t0 = generate(admin, db, "acme-fam", key_type=fam)
    t1_id, t1 = rotate(admin, db, t0_id, "1 hour")
    t2_id, t2 = rotate(admin, db, t1_id, "1 hour")
    for t in (t1, t2):
        assert reason_of(other, t) is None, "cached as valid in another session"
    end_grace(su, t0_id)
    # The reuse is presented with validate_token, whose error rolls the caller's transaction
    # back: the revocation is committed by the writer all the same.
    app.autocommit = False
    err = refusal(app, "SELECT * FROM token.validate_token(%s)", (t0,))
    app.autocommit = True
    assert err.sqlstate == "28000" and "token rejected: family_revoked" in str(err), str(err)
    assert "rotated away" in err.diag.message_detail and t0 not in err.diag.message_detail
    for t in (t0, t1, t2):
        assert reason_of(other, t) == "family_revoked", "every member, in another session with a warm cache"
        assert reason_of(app, t) == "family_revoked"
    rows = family_rows(su, t0_id)
    assert [r[0] for r in rows] == [t0_id, t1_id, t2_id]
    assert all(r[1] and r[2] for r in rows), rows
    assert all(r[3] == f"pg_token: family revoked: reuse of {t0_id}" for r in rows), rows
    statuses = admin.execute("SELECT status FROM token.token_list WHERE id = ANY(%s)", ([t0_id, t1_id, t2_id],)).fetchall()
    assert statuses == [("revoked",)] * 3
    flush(su)
    events = family_events(su, t0_id)
    assert len(events) == 1, events
    event, reason, tid, account, hint, detail, user = events[0]
    assert (event, reason, tid, account, hint, user) == ("family_revoked", "family_revoked", t0_id, "acme-fam", t0[:11], "e2e_app")
    assert f"family={t0_id}" in detail and f"reused_token_id={t0_id}" in detail and "revoked=3" in detail, detail
    dump = repr(su.execute("SELECT * FROM token.events WHERE token_id = ANY(%s)", ([t0_id, t1_id, t2_id],)).fetchall())
    assert not any(t in dump or t[-28:] in dump for t in (t0, t1, t2)), "no token in any event"
    # Presenting again revokes nothing more.
    assert reason_of(app, t0) == "family_revoked"
    flush(su)
    assert len(family_events(su, t0_id)) == 1


def test_a_middle_token_reused_names_itself_and_the_family(db, su, admin, app, fam):
    t0_id, _ = generate(admin, db, "acme-fam2", key_type=fam)
    t1_id, t1 = rotate(admin, db, t0_id, "1 hour")
    t2_id, t2 = rotate(admin, db, t1_id, "1 hour")
    end_grace(su, t1_id)
    assert reason_of(app, t1) == "family_revoked"
    assert reason_of(app, t2) == "family_revoked"
    assert all(r[2] for r in family_rows(su, t0_id)), "the first token too, though it was never presented"
    flush(su)
    (_, _, tid, _, _, detail, _), = family_events(su, t1_id)
    assert tid == t1_id and f"family={t0_id}" in detail and f"reused_token_id={t1_id}" in detail, detail


def test_with_grace_0_any_presentation_of_the_old_token_is_a_reuse(db, su, admin, app, fam):
    old_id, old = generate(admin, db, "acme-fam3", key_type=fam)
    new_id, new = rotate(admin, db, old_id, "0")
    assert reason_of(app, old) == "family_revoked"
    assert reason_of(app, new) == "family_revoked"
    assert [r[2] for r in family_rows(su, old_id)] == [True, True]
    # A revoked family cannot be rotated on.
    err = refusal(admin, "SELECT * FROM token.rotate_token(%s)", (new_id,))
    assert err.sqlstate == "55000" and "revoked" in str(err)


def test_within_the_grace_window_nothing_is_revoked(db, su, admin, app, fam):
    old_id, old = generate(admin, db, "acme-fam4", key_type=fam)
    new_id, new = rotate(admin, db, old_id, "1 hour")
    assert reason_of(app, old) is None
    assert reason_of(app, new) is None
    assert [r[1:3] for r in family_rows(su, old_id)] == [(False, False), (False, False)]
    flush(su)
    assert family_events(su, old_id) == []


def test_without_the_option_a_rotated_token_is_plainly_revoked(db, su, admin, app):
    old_id, old = generate(admin, db, "acme-fam5")   # key type agent: no reuse detection
    assert su.execute("SELECT reuse_detection FROM token.key_types WHERE name = 'agent'").fetchone()[0] is False
    new_id, new = rotate(admin, db, old_id, "0")
    assert reason_of(app, old) == "revoked"
    assert reason_of(app, new) is None, "the successor stays valid"
    assert [r[1:3] for r in family_rows(su, old_id)] == [(False, False), (False, False)]
    flush(su)
    assert family_events(su, old_id) == []


def test_an_explicitly_revoked_token_is_not_a_reuse(db, su, admin, app, fam):
    old_id, old = generate(admin, db, "acme-fam6", key_type=fam)
    new_id, new = rotate(admin, db, old_id, "0")
    admin.execute("SELECT token.revoke_token(%s)", (old_id,))
    assert reason_of(app, old) == "revoked"
    assert reason_of(app, new) is None


def test_rotate_own_token_with_a_rotated_away_token_revokes_the_family(db, su, admin, fam):
    old_id, old = generate(admin, db, "acme-fam7", key_type=fam)
    new_id, new = rotate(admin, db, old_id, "0")
    err = refusal(admin, "SELECT * FROM token.rotate_own_token(%s, '0')", (old,))
    assert err.sqlstate == "28000" and "token rejected: family_revoked" in str(err), str(err)
    flush(su)
    assert reason_of(admin, new) == "family_revoked"
    assert [r[2] for r in family_rows(su, old_id)] == [True, True]


def test_a_child_of_a_revoked_family_is_refused_with_its_parent(db, su, admin, app, fam):
    old_id, old = generate(admin, db, "acme-fam8", key_type=fam)
    new_id, new = rotate(admin, db, old_id, "0")
    child = db.record(admin.execute("SELECT token FROM token.derive_token(%s)", (new_id,)).fetchone()[0])
    assert reason_of(app, child) is None
    assert reason_of(app, old) == "family_revoked"
    assert reason_of(app, child) == "parent_invalid"


def test_create_key_type_stores_the_option(db, su, fam):
    assert su.execute("SELECT reuse_detection FROM token.key_types WHERE name = 'fam'").fetchone()[0] is True
    su.execute("SELECT token.create_key_type('fam_off')" if su.execute(
        "SELECT 1 FROM token.key_types WHERE name = 'fam_off'").fetchone() is None else "SELECT 1")
    assert su.execute("SELECT reuse_detection FROM token.key_types WHERE name = 'fam_off'").fetchone()[0] is False
    reasons = dict(su.execute("SELECT reason, explanation FROM token.reasons()").fetchall())
    assert "family" in reasons["family_revoked"]
