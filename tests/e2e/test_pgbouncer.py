"""RLS identity behind a real pgbouncer in transaction pooling mode with one server
connection: two clients interleave transactions on the same backend, and each sees only its
own tenant's rows, every time."""

import os
import random
import shutil
import socket
import subprocess
import time

import psycopg
import pytest

from conftest import DB, PASSWORD, generate

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def bouncer(db):
    home = db.run / "pgbouncer"
    home.mkdir(exist_ok=True)
    port = free_port()
    (home / "userlist.txt").write_text(f'"e2e_tenant" "{PASSWORD}"\n')
    (home / "pgbouncer.ini").write_text(f"""[databases]
{DB} = host={db.host} port={db.port} dbname={DB}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {home}/userlist.txt
pool_mode = transaction
default_pool_size = 1
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 10
server_reset_query =
logfile = {home}/pgbouncer.log
pidfile = {home}/pgbouncer.pid
""")
    shutil.chown(home, "postgres", "postgres")
    for f in home.iterdir():
        shutil.chown(f, "postgres", "postgres")
    cmd = [PGBOUNCER, str(home / "pgbouncer.ini")]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"pgbouncer exited: {proc.stderr.read().decode()}")
            time.sleep(0.1)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def client(port, name):
    # prepare_threshold=None: no server-side prepared statements across pooled backends.
    return psycopg.connect(host="127.0.0.1", port=port, user="e2e_tenant", password=PASSWORD, dbname=DB,
                           application_name=name, prepare_threshold=None)


def rows_of(conn):
    return sorted(r[0] for r in conn.execute("SELECT name FROM app.projects"))


def test_two_clients_interleave_on_one_pooled_backend(db, admin, bouncer):
    _, acme = generate(admin, db, "acme", scopes=["read"])
    _, globex = generate(admin, db, "globex", scopes=["read"])
    expected = {"acme": ["acme-billing", "acme-website"],
                "globex": ["globex-hr", "globex-ops", "globex-research"]}
    a, b = client(bouncer, "bouncer-a"), client(bouncer, "bouncer-b")
    tokens = {a: ("acme", acme), b: ("globex", globex)}
    pids = set()
    rng = random.Random(20261122)
    try:
        for i in range(200):
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            # Open both transactions' worth of work in an interleaved order. With one server
            # connection, a client's transaction holds the backend until it ends, so
            # "interleaving" means alternating whole transactions on the same backend.
            for conn in (first, second):
                account, token = tokens[conn]
                if rng.random() < 0.2:
                    # Unauthenticated transaction right after the other client's: sees nothing.
                    assert rows_of(conn) == [], f"round {i}: unauthenticated saw rows"
                    assert conn.execute("SELECT token.current_account()").fetchone()[0] is None
                else:
                    conn.execute("SELECT token.authenticate(%s)", (token,))
                    pids.add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
                    assert rows_of(conn) == expected[account], f"round {i}: {account} saw the wrong rows"
                if rng.random() < 0.5:
                    conn.commit()
                else:
                    conn.rollback()
    finally:
        a.close()
        b.close()
    assert len(pids) == 1, f"both clients must share one pooled backend, saw {pids}"


def test_two_concurrent_clients_queue_on_one_backend(db, admin, bouncer):
    """The same, with both clients running at once: pgbouncer hands the single backend to
    whichever transaction is next, so the two clients' transactions alternate unpredictably."""
    import threading

    _, acme = generate(admin, db, "acme", scopes=["read"])
    _, globex = generate(admin, db, "globex", scopes=["read"])
    expected = {"acme": ["acme-billing", "acme-website"],
                "globex": ["globex-hr", "globex-ops", "globex-research"]}
    failures, pids = [], set()

    def run(account, token, seed):
        rng = random.Random(seed)
        try:
            with client(bouncer, f"bouncer-{account}") as c:
                for i in range(150):
                    if rng.random() < 0.2:
                        if rows_of(c) != []:
                            failures.append(f"{account} round {i}: unauthenticated saw rows")
                    else:
                        c.execute("SELECT token.authenticate(%s)", (token,))
                        pids.add(c.execute("SELECT pg_backend_pid()").fetchone()[0])
                        if rows_of(c) != expected[account]:
                            failures.append(f"{account} round {i}: saw the wrong rows")
                    c.commit() if rng.random() < 0.5 else c.rollback()
        except psycopg.Error as e:
            failures.append(f"{account}: {e}")

    threads = [threading.Thread(target=run, args=("acme", acme, 1)),
               threading.Thread(target=run, args=("globex", globex, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(pids) == 1, pids
