"""Monitoring: token.metrics() and token.refusal_metrics() move with real validations, are
readable by pg_monitor and not by applications, and a real postgres_exporter reading
examples/prometheus/queries.yaml serves them to a Prometheus scrape."""

import os
import random
import re
import shutil
import subprocess
import time
import urllib.request

import psycopg
import pytest

from conftest import CLUSTER, PASSWORD, ROOT, compose, flush, generate, reason_of, refusal

QUERIES = ROOT / "examples" / "prometheus" / "queries.yaml"
EXPORTER = shutil.which("prometheus-postgres-exporter") or shutil.which("postgres_exporter")


@pytest.fixture()
def monitor(db):
    """A login role whose only grant is pg_monitor, as postgres_exporter would connect."""
    with db.su() as c:
        c.execute("DROP ROLE IF EXISTS e2e_monitor")
        c.execute(f"CREATE ROLE e2e_monitor LOGIN PASSWORD '{PASSWORD}' IN ROLE pg_monitor")
    with db.connect("e2e_monitor", autocommit=True) as c:
        yield c
    with db.su() as c:
        c.execute("DROP ROLE IF EXISTS e2e_monitor")


def stranger():
    """A well-formed token under a prefix nobody registered, different on every call."""
    return compose("zzq-", "".join(random.choices("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789", k=22)))


def metrics(conn):
    cur = conn.execute("SELECT * FROM token.metrics()")
    return dict(zip([d.name for d in cur.description], cur.fetchone()))


def by_reason(conn):
    return dict(conn.execute("SELECT reason, refusals_total FROM token.refusal_metrics()").fetchall())


def test_counters_move_with_validations(db, admin, app, monitor):
    token_id, token = generate(admin, db, "metrics-1")
    unknown = stranger()
    before, reasons_before = metrics(monitor), by_reason(monitor)

    for _ in range(5):
        app.execute("SELECT * FROM token.validate_token(%s)", (token,))
    reason = reason_of(app, unknown)
    assert reason == "unknown_prefix"
    for _ in range(2):
        assert reason_of(app, unknown) == reason
    admin.execute("SELECT token.revoke_token(%s, 'metrics test')", (token_id,))
    assert reason_of(app, token) == "revoked"

    after, reasons_after = metrics(monitor), by_reason(monitor)
    delta = {k: after[k] - before[k] for k in ("validations_total", "refusals_total", "cache_hits_total", "cache_misses_total")}
    assert delta["validations_total"] == 5
    assert delta["refusals_total"] == 4
    assert reasons_after["unknown_prefix"] - reasons_before["unknown_prefix"] == 3
    assert reasons_after["revoked"] - reasons_before["revoked"] == 1
    # Lookups: five validations and the revoked check reach the cache; unknown prefixes do not.
    assert delta["cache_hits_total"] + delta["cache_misses_total"] == 6
    assert delta["cache_misses_total"] >= 2, "first sight of the token and the re-read after revoke"
    assert delta["cache_hits_total"] >= 3
    # Every reason is listed, and they add up to the total.
    assert set(reasons_after) == {r for (r,) in monitor.execute("SELECT reason FROM token.reasons()")}
    assert sum(reasons_after.values()) == after["refusals_total"]


def test_writer_figures(db, su, app, monitor):
    unknown = stranger()
    rows_before = metrics(monitor)["event_rows_total"]
    for _ in range(20):
        reason_of(app, unknown)
    flush(su)
    m = metrics(monitor)
    assert m["writer_running"] is True
    assert m["refusals_pending"] == 0 and m["touches_queued"] == 0
    assert m["writer_lag_seconds"] == 0.0
    assert m["event_rows_total"] > rows_before, "a new key makes a new row"


def test_applications_cannot_read_metrics(app):
    for fn in ("token.metrics()", "token.refusal_metrics()"):
        e = refusal(app, f"SELECT * FROM {fn}")
        assert e.sqlstate == "42501", (fn, e.sqlstate)


SAMPLE = re.compile(r'^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


def scrape(url):
    out = {}
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            m = SAMPLE.match(line)
            if m and m["name"].startswith("pg_token"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"] or ""))
                out[(m["name"], labels.get("reason"))] = float(m["value"])
    return out


def test_postgres_exporter_serves_the_queries(db, admin, app, monitor):
    assert EXPORTER, "prometheus-postgres-exporter is not installed (scripts/setup.sh installs it)"
    port = subprocess.run(["bash", str(CLUSTER), "free-port"], check=True, capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, DATA_SOURCE_NAME=(
        f"postgresql://e2e_monitor:{PASSWORD}@{db.host}:{db.port}/pgt_e2e?sslmode=disable"))
    log = open(db.run / "postgres_exporter.log", "w")
    proc = subprocess.Popen([EXPORTER, f"--web.listen-address=127.0.0.1:{port}", f"--extend.query-path={QUERIES}",
                             "--disable-default-metrics", "--disable-settings-metrics"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        first = None
        for _ in range(100):
            try:
                first = scrape(url)
                if ("pg_token_validations_total", None) in first:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert first and ("pg_token_validations_total", None) in first, \
            f"no pg_token metrics in the scrape; see {db.run / 'postgres_exporter.log'}"
        names = {n for n, _ in first}
        for col in ("validations_total", "refusals_total", "cache_hits_total", "cache_misses_total",
                    "refusals_pending", "refusals_dropped_total", "event_rows_total", "touches_queued",
                    "touches_dropped_total", "writer_running", "writer_lag_seconds", "rate_limit_untracked_total"):
            assert f"pg_token_{col}" in names, col
        assert first[("pg_token_writer_running", None)] == 1.0

        _, token = generate(admin, db, "metrics-exporter")
        for _ in range(3):
            app.execute("SELECT * FROM token.validate_token(%s)", (token,))
        reason_of(app, stranger())
        second = scrape(url)
        assert second[("pg_token_validations_total", None)] - first[("pg_token_validations_total", None)] == 3
        key = ("pg_token_refusals_refusals_total", "unknown_prefix")
        assert second[key] - first.get(key, 0.0) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
