"""A refusal flood cannot fill the disk: 10 s of garbage tokens from four connections holding
only token_validator, as an attacker behind a public API would send them. Refusals are counted
into a bounded number of rows whose counts add up exactly to the refusals made; the server log
gets one line per row; a single refusal of a real key still shows, with its hint, at once.

The flooding role runs with the refusal tarpit off (token.max_refusal_rate = 0): the row bound
must hold whatever the traffic, so it is shown at full speed (test_tarpit.py shows the tarpit)."""

import random
import string
import threading
import time
import uuid

import psycopg

from conftest import ALPHABET, compose, flush, generate

FLOOD_SECONDS = 10
MAX_EVENT_ROWS = 100  # token.max_event_rows as the test cluster runs (the default)


def garbage(rng):
    """A distinct bad token, of one of five reasons."""
    body = "".join(rng.choice(ALPHABET) for _ in range(22))
    kind = rng.randrange(5)
    if kind == 0:
        return "malformed", "e2e-" + "".join(rng.choice(string.ascii_letters) for _ in range(rng.randrange(1, 20)))
    if kind == 1:
        return "bad_checksum", "e2e-" + body + "000000"
    if kind == 2:
        return "unknown_prefix", compose("zz-", body)
    if kind == 3:
        return "environment_mismatch", compose("e2eprd-", body)
    return "not_found", compose("e2e-", body)


def flood(db, marker, make, stop, counts, lock, rollback_every=0):
    with psycopg.connect(host=db.host, port=db.port, user="e2e_app", password="e2e-password", dbname="pgt_e2e",
                         application_name=marker, autocommit=rollback_every == 0) as c:
        local = {}
        n = 0
        while not stop.is_set():
            reason, token = make()
            valid = c.execute("SELECT valid FROM token.check_token(%s)", (token,)).fetchone()[0]
            assert valid is False
            local[reason] = local.get(reason, 0) + 1
            n += 1
            if rollback_every and n % rollback_every == 0:
                c.rollback()  # refusals survive the caller's rollback
        if rollback_every:
            c.rollback()
    with lock:
        for k, v in local.items():
            counts[k] = counts.get(k, 0) + v


def status(su):
    return su.execute("SELECT refusals, refusals_written, refusals_pending, event_rows FROM token.worker_status() "
                      "WHERE database = current_database()").fetchone() or (0, 0, 0, 0)


def test_a_refusal_flood_is_counted_in_bounded_rows(db, su, admin):
    revoked_id, revoked = generate(admin, db, "flood-victim")
    admin.execute("SELECT token.revoke_token(%s)", (revoked_id,))
    _, repeated = generate(admin, db, "flood-repeat")
    repeated_bad = repeated[:-1] + ("0" if repeated[-1] != "0" else "1")  # one bad token, sent again and again
    marker = f"flood-{uuid.uuid4()}"
    repeater = f"repeat-{uuid.uuid4()}"  # a source of its own, so its one key is never folded with the garbage
    flush(su)
    before = status(su)
    log_path = db.data / "server.log"
    log_before = log_path.stat().st_size
    rows_before = su.execute("SELECT coalesce(max(id), 0) FROM token.events").fetchone()[0]

    su.execute("ALTER ROLE e2e_app SET token.max_refusal_rate = 0")  # flood at full speed
    stop, lock, counts = threading.Event(), threading.Lock(), {}
    rngs = [random.Random(seed) for seed in range(2)]
    threads = [
        threading.Thread(target=flood, args=(db, marker, (lambda r=rngs[0]: garbage(r)), stop, counts, lock)),
        threading.Thread(target=flood, args=(db, marker, (lambda r=rngs[1]: garbage(r)), stop, counts, lock, 50)),
        threading.Thread(target=flood, args=(db, repeater, lambda: ("repeated", repeated_bad), stop, counts, lock)),
        threading.Thread(target=flood, args=(db, repeater, lambda: ("repeated", repeated_bad), stop, counts, lock, 50)),
    ]
    for t in threads:
        t.start()
    time.sleep(FLOOD_SECONDS / 2)
    # Mid-flood, one refusal of a real (revoked) key from another client: visible at once.
    single = f"single-{uuid.uuid4()}"
    with psycopg.connect(host=db.host, port=db.port, user="e2e_app", password="e2e-password", dbname="pgt_e2e",
                         application_name=single, autocommit=True) as c:
        assert c.execute("SELECT reason FROM token.check_token(%s)", (revoked,)).fetchone()[0] == "revoked"
    sent = time.monotonic()
    seen_after = None
    while time.monotonic() - sent < 1.0:
        row = su.execute("SELECT hint, count FROM token.events WHERE application_name = %s", (single,)).fetchone()
        if row:
            seen_after = time.monotonic() - sent
            assert row == (revoked[:len("e2e-") + 4], 1)
            break
        time.sleep(0.02)
    assert seen_after is not None, "a single refusal of a real key was not visible within a second of the flood"
    time.sleep(FLOOD_SECONDS / 2)
    stop.set()
    for t in threads:
        t.join()
    su.execute("ALTER ROLE e2e_app RESET token.max_refusal_rate")
    flush(su)
    after = status(su)

    made = sum(counts.values())
    repeats = counts.pop("repeated")
    rows = su.execute("SELECT reason, count, folded, hint FROM token.events WHERE application_name = %s", (marker,)).fetchall()
    counted = {}
    for reason, count, _, _ in rows:
        counted[reason] = counted.get(reason, 0) + count
    repeated_rows = su.execute("SELECT reason, count, folded, hint FROM token.events WHERE application_name = %s",
                               (repeater,)).fetchall()
    new_rows = su.execute("SELECT count(*) FROM token.events WHERE id > %s AND event = 'refused'", (rows_before,)).fetchone()[0]
    log = log_path.read_bytes()[log_before:].decode(errors="replace")
    log_lines = log.count("pg_token: refused")
    print(f"\nflood: {made} refusals in {FLOOD_SECONDS} s ({made / FLOOD_SECONDS:.0f}/s) -> {len(rows)} rows "
          f"({new_rows} refusal rows in all), {log_lines} log lines; single refusal visible after {seen_after * 1000:.0f} ms")

    # Every refusal counted exactly once, by reason, and by the writer's own counters.
    assert counted == counts, (counted, counts)
    assert after[0] - before[0] == made + 1, "worker_status counted every refusal (and the single one)"
    assert after[1] - before[1] == made + 1 and after[2] == 0, "all of them written"
    # Bounded: at most max_event_rows new rows a second (plus the first second's burst and one
    # overflow row per reason), whatever the traffic; the log has one line per row.
    bound = MAX_EVENT_ROWS * (FLOOD_SECONDS + 2) + 16
    assert new_rows <= bound, (new_rows, bound)
    assert after[3] - before[3] == new_rows
    assert log_lines <= new_rows, (log_lines, new_rows)
    # The repeated token is one row (per window) with its hint and every repeat in its count;
    # the distinct garbage was folded.
    assert repeated_rows == [("bad_checksum", repeats, None, repeated[:len("e2e-") + 4])], repeated_rows
    assert any(r[2] == "hints" for r in rows), "the garbage source was folded"
    # No token in any row.
    for token in (revoked, repeated, repeated_bad):
        hit = su.execute("SELECT count(*) FROM token.events WHERE events::text LIKE %s", (f"%{token[-20:]}%",)).fetchone()[0]
        assert hit == 0
