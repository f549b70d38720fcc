"""Leak reports (issue 15): a secret scanner finds tokens in text with the patterns
scanner_patterns() gives (run here through grep -E, as the README shows), and reports them with
report_leaked() as a token_reporter: live ones are revoked with reason `leaked`, one row per
input says what happened, and no token is ever echoed back, logged or recorded."""

import pathlib
import subprocess

from conftest import compose, flush, generate, reason_of, refusal


def test_scanner_patterns_find_exactly_the_tokens_in_a_file(db, admin, tmp_path):
    _, dev1 = generate(admin, db, "acme-scan")
    _, dev2 = generate(admin, db, "acme-scan")
    _, mid = generate(admin, db, "acme-scan", key_type="mid")
    sample = tmp_path / "leaky.env"
    sample.write_text(
        f"# committed by mistake\nAPI_KEY={dev1}\nexport OTHER='{mid}'\n"
        f'{{"token": "{dev2}"}}\n'
        "decoys: e2e-tooShort123 xe2e-AAAAAAAAAAAAAAAAAAAAAAAAAAAA1 e2e-" + "A" * 29 + "\n"
        "ghp_0123456789abcdefghijklmnopqrstuvwxyzAB sk_live_abcdefghijklmnopqrstuvwx\n"
    )
    with db.connect("e2e_reporter", autocommit=True) as reporter:
        patterns = reporter.execute("SELECT prefix, pattern, bounded_pattern FROM token.scanner_patterns()").fetchall()
    assert {p for p, _, _ in patterns} >= {"e2e-", "e2eprd-", "e2emid_"}
    found = set()
    for _, _, bounded in patterns:
        out = subprocess.run(["grep", "-oE", bounded, str(sample)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            # The bounded pattern includes the characters around the token.
            found.update(m for m in (dev1, dev2, mid) if m in line)
            assert any(m in line for m in (dev1, dev2, mid)), f"a decoy matched: {line!r}"
    assert found == {dev1, dev2, mid}
    # The plain pattern is what ripgrep or a scanner's custom pattern takes.
    plain = dict((p, pat) for p, pat, _ in patterns)["e2e-"]
    assert plain == "e2e-[0-9A-Za-z]{28}"


def test_report_leaked_revokes_what_it_finds_and_answers_per_input(db, su, admin, app):
    live_id, live = generate(admin, db, "acme-leak")
    dead_id, dead = generate(admin, db, "acme-leak")
    admin.execute("SELECT token.revoke_token(%s)", (dead_id,))
    never = compose("e2e-", "L" * 22)
    typo = live[:-1] + ("B" if live[-1] == "A" else "A")
    inputs = [live, dead, never, typo, "not a token at all", None, live]
    with db.connect("e2e_reporter", autocommit=True, application_name="scanner-test") as reporter:
        rows = reporter.execute("SELECT hint, outcome FROM token.report_leaked(%s)", (inputs,)).fetchall()
    hint = live[:len("e2e-") + 4]
    assert rows == [
        (hint, "revoked"),
        (dead[:8], "already_revoked"),
        (never[:8], "unknown"),
        (None, "malformed"),
        (None, "malformed"),
        (None, "malformed"),
        (hint, "already_revoked"),
    ]
    assert reason_of(app, live) == "revoked"
    assert admin.execute("SELECT revoked_reason FROM token.token_list WHERE id = %s", (live_id,)).fetchone()[0] == "leaked"
    events = su.execute("SELECT detail, db_user, client_addr, application_name, hint FROM token.events "
                        "WHERE event = 'leak_reported' AND token_id = %s ORDER BY id", (live_id,)).fetchall()
    assert events[0] == ("outcome=revoked", "e2e_reporter", "127.0.0.1", "scanner-test", hint), "who reported from where"
    flush(su)
    everything = repr(su.execute("SELECT * FROM token.events").fetchall()) + repr(rows)
    for secret in (live, dead, never, typo):
        assert secret not in everything and secret[-28:] not in everything


def test_a_reporter_may_do_nothing_else(db, admin):
    _, token = generate(admin, db, "acme-rep")
    with db.connect("e2e_reporter", autocommit=True) as reporter:
        for sql in ("SELECT * FROM token.validate_token(%s)", "SELECT * FROM token.check_token(%s)"):
            assert refusal(reporter, sql, (token,)).sqlstate == "42501"
        assert refusal(reporter, "SELECT * FROM token.generate_token('x', 'agent')").sqlstate == "42501"
        assert refusal(reporter, "SELECT * FROM token.token_list").sqlstate == "42501"
        assert refusal(reporter, "SELECT * FROM token.report_leaked(%s)", (["x"] * 1001,)).sqlstate == "22023"
