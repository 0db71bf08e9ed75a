"""Minimal versions of one stage hop, measured beside the bare-chain ceiling (issue 15).

When the CPU target is missed, issue 15 asks what the least version of each step costs here and
what design would meet the target. `python -m bench.minimal` measures the part the broker
decides, on the ceiling's own stack (the shared reference folder copied to `.run/bench-minimal`,
its venv /tmp/ceil-venv, its PostgreSQL 127.0.0.1:55532 and Redis :56479):

- `chain`: the reference's bare chain, one Celery message per order per stage (4 tasks of one
  UPDATE each), its worker as `make bench` runs it (prefork -c 4, prefetch 4);
- `chain, K per message`: the same worker and tasks, each message carrying K orders; a task still
  makes one UPDATE, in its own transaction, per order: only the broker hop is shared;
- `no broker`: four stages that claim the order row itself (FOR UPDATE SKIP LOCKED, one
  autocommit statement per hop) from two processes.

Each prints orders/s and CPU ms per order of the workers, PostgreSQL (the whole server: the
driver's one backend included) and Redis, read from /proc.

Then the rest of the plumbing an order of this design pays, each without its load generator:

- `insert`: the reference's bare DRF insert (`POST /orders`, gunicorn -w 2 gthread, 2 threads),
  driven by wrk for a fixed time: gunicorn's and PostgreSQL's CPU per request. An order takes two
  (the merchant's create and the provider's webhook);
- `call`: the client side of one outbound JSON POST over a kept-alive `requests.Session`, CPU of
  this process alone. An order makes two (the charge and the merchant's callback).

The floor of one order is four hops + two inserts + two calls, for the chain (this design) and
for row claims (the design without a broker), set against issue 15's 25 ms target.

Last, `rows`: the writes SPEC asks of every order beyond those six statements, at their least (one
process, psycopg2, prepared statements, no ORM, no Celery): the API key's lookup, a transition row
per status (SPEC 1: "every transition is recorded"), an outbox event per state change written in
its transaction and marked published after (SPEC 1's transactional outbox, which a relay must be
able to tell apart), and the charge attempt, callback delivery and callback attempt the console
shows (SPEC 7). It runs the five stages' transactions as the product does, then only the floor's
six statements, and prints the difference: what those rows add to any design's floor.
"""

import argparse
import json
import multiprocessing
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg2
import redis
import requests

from bench import ceiling
from bench.stack import RUN
from bench.system import tree_cpu

WORK = RUN / "bench-minimal"
DSN = "host=127.0.0.1 port=55532 user=ceil dbname=ceil"
GUNICORN = ("127.0.0.1", 58000)  # the reference's bench_http.sh address
TARGET_MS = 25.0  # issue 15: product CPU per order
POSTMASTER_PID = Path("/tmp/ceil-pg/postmaster.pid")  # noqa: S108 - the reference's own paths
REDIS_PID = Path("/tmp/ceil-redis.pid")  # noqa: S108

# The two edits that let the reference's chain carry K orders per message, each checked to apply.
PATCHES = {
    "orders/tasks.py": (
        "def _set(order_id, status):\n"
        "    Order.objects.filter(pk=order_id).update(status=status, updated_at=timezone.now())",
        "def _set(order_id, status):\n"
        "    for one in order_id if isinstance(order_id, list) else [order_id]:\n"
        "        Order.objects.filter(pk=one).update(status=status, updated_at=timezone.now())",
    ),
    "ceiling.py": (
        "    for k, oid in enumerate(ids):\n"
        "        if a.rate and (wait := t0 + k / a.rate - time.time()) > 0:\n"
        "            time.sleep(wait)\n"
        "        enq[oid] = time.time()\n"
        "        order_chain(str(oid)).apply_async()",
        "    per = int(os.environ.get('MINIMAL_BATCH', '1'))\n"
        "    for k in range(0, len(ids), per):\n"
        "        group = [str(oid) for oid in ids[k:k + per]]\n"
        "        for oid in ids[k:k + per]:\n"
        "            enq[oid] = time.time()\n"
        "        order_chain(group if per > 1 else group[0]).apply_async()",
    ),
}

CLAIM = (
    "UPDATE minimal_hop SET status = status + 1, updated_at = now() WHERE id = ("
    " SELECT id FROM minimal_hop WHERE status < 4 ORDER BY status DESC, id FOR UPDATE SKIP LOCKED LIMIT 1)"
    " RETURNING id"
)


def _pid(path: Path) -> int:
    return int(path.read_text().split()[0])


def _servers_cpu() -> tuple[float, float]:
    return tree_cpu(_pid(POSTMASTER_PID)), tree_cpu(_pid(REDIS_PID))


def _patch(work: Path) -> None:
    for name, (old, new) in PATCHES.items():
        path = work / name
        text = path.read_text()
        if old not in text:
            raise ceiling.CeilingError(f"{name} of the reference changed: the batching edit does not apply")
        path.write_text(text.replace(old, new))
    script = work / "ceiling.py"
    if not re.search(r"^import .*\bos\b", script.read_text(), re.MULTILINE):
        script.write_text("import os\n" + script.read_text())


def _spawn(command: str, log: str, **env: str) -> subprocess.Popen:
    """One of the reference's venv programs, run in its copy, its output to WORK/`log`."""
    program, *args = command.split()
    with (WORK / log).open("w") as out:
        return subprocess.Popen(
            [str(ceiling.VENV / "bin" / program), *args],
            cwd=WORK,
            env={**ceiling._env(), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _chain(orders: int, batch: int) -> dict:
    """The bare chain with `batch` orders per message: orders/s and CPU ms per order."""
    redis.Redis(port=ceiling.REDIS_PORT).flushall()  # no worker is running yet
    ready = WORK / "worker.ready"
    ready.unlink(missing_ok=True)
    pool = "-P prefork -c 4 --prefetch-multiplier 4"  # as `make bench` runs the chain
    worker = _spawn(
        f"celery -A ceilproj worker {pool} -l warning -n minimal@%h", "worker.log", CEIL_READY_FILE=str(ready)
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if time.monotonic() > deadline or worker.poll() is not None:
                raise ceiling.CeilingError(f"the chain's worker did not start (see {WORK / 'worker.log'})")
            time.sleep(0.1)
        time.sleep(1)
        before = (tree_cpu(worker.pid), *_servers_cpu())
        out = ceiling._run(
            [str(ceiling.VENV / "bin" / "python"), "ceiling.py", str(orders), "--label", f"batch={batch}"],
            timeout=600,
            what="ceiling.py",
            cwd=WORK,
            env={"MINIMAL_BATCH": str(batch)},
        )
        after = (tree_cpu(worker.pid), *_servers_cpu())
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    match = re.search(r"orders_per_s=([\d.]+)", out)
    if not match:
        raise ceiling.CeilingError(f"ceiling.py printed no orders/s: {out.strip()[-200:]!r}")
    return _figures(float(match.group(1)), orders, before, after)


def _hop_worker(done) -> None:
    # (not `with connect()`: psycopg2 opens a transaction there even in autocommit)
    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    cursor = conn.cursor()
    while True:
        cursor.execute(CLAIM)
        if cursor.fetchone() is None:
            if done.is_set():
                conn.close()
                return
            time.sleep(0.005)


def _no_broker(orders: int, processes: int = 2) -> dict:
    """Four hops per order by row claims alone: orders/s and CPU ms per order."""
    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    cursor = conn.cursor()
    cursor.execute("DROP TABLE IF EXISTS minimal_hop")
    cursor.execute(
        "CREATE TABLE minimal_hop (id uuid PRIMARY KEY, status smallint NOT NULL, updated_at timestamptz)"
    )
    cursor.execute("CREATE INDEX minimal_hop_open ON minimal_hop (status, id) WHERE status < 4")
    cursor.execute(
        "INSERT INTO minimal_hop (id, status) SELECT unnest(%s::uuid[]), 0",
        ([str(uuid.uuid4()) for _ in range(orders)],),
    )
    cursor.execute("VACUUM ANALYZE minimal_hop")
    done = multiprocessing.get_context("fork").Event()
    workers = [
        multiprocessing.get_context("fork").Process(target=_hop_worker, args=(done,))
        for _ in range(processes)
    ]
    servers = _servers_cpu()
    started = time.monotonic()
    for worker in workers:
        worker.start()
    cursor.execute("SELECT count(*) FROM minimal_hop WHERE status < 4")
    while cursor.fetchone()[0]:
        time.sleep(0.05)
        cursor.execute("SELECT count(*) FROM minimal_hop WHERE status < 4")
    wall = time.monotonic() - started
    after = (sum(tree_cpu(worker.pid) for worker in workers), *_servers_cpu())
    done.set()
    for worker in workers:
        worker.join(timeout=30)
    cursor.execute("DROP TABLE minimal_hop")
    conn.close()
    return _figures(orders / wall, orders, (0.0, *servers), after)


def _gunicorn() -> subprocess.Popen:
    """The reference's API as its bench_http.sh serves it, answering /ping (or CeilingError)."""
    host, port = GUNICORN
    server = _spawn(
        f"gunicorn ceilproj.wsgi:application -w 2 -k {ceiling.HTTP_CLASS} --threads {ceiling.HTTP_THREADS}"
        f" -b {host}:{port} --log-level warning",
        "gunicorn.log",
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if requests.get(f"http://{host}:{port}/ping", timeout=1).ok:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.1)
    server.terminate()
    server.wait(timeout=30)
    raise ceiling.CeilingError(f"the reference's gunicorn did not answer (see {WORK / 'gunicorn.log'})")


def _order_count(cursor) -> int:
    cursor.execute("SELECT count(*) FROM orders_order")
    return cursor.fetchone()[0]


def _insert(server: subprocess.Popen, seconds: int) -> dict:
    """The bare DRF insert under wrk for `seconds`: requests/s and the server's CPU per request."""
    host, port = GUNICORN
    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    cursor = conn.cursor()
    cursor.execute("TRUNCATE orders_order")
    before = (tree_cpu(server.pid), *_servers_cpu())
    ceiling._run(
        ["wrk", "-t1", "-c4", f"-d{seconds}s", "-s", "post_order.lua", f"http://{host}:{port}/orders"],
        timeout=seconds + 60,
        what="wrk",
        cwd=WORK,
    )
    after = (tree_cpu(server.pid), *_servers_cpu())
    inserted = _order_count(cursor)
    conn.close()
    if not inserted:
        raise ceiling.CeilingError("wrk's POST /orders inserted no row")
    return _figures(inserted / seconds, inserted, before, after)


def _call(calls: int) -> dict:
    """One outbound JSON POST, the client's side: CPU of this process per call."""
    host, port = GUNICORN
    body = json.dumps({"amount": 1000, "currency": "EUR", "reference": "minimal", "pad": "x" * 200})
    headers = {"Content-Type": "application/json", "Idempotency-Key": str(uuid.uuid4())}
    url = f"http://{host}:{port}/orders"
    with requests.Session() as session:
        session.post(url, data=body, headers=headers, timeout=(2, 10)).close()
        started, cpu = time.monotonic(), time.process_time()
        for _ in range(calls):
            with session.post(url, data=body, headers=headers, timeout=(2, 10)) as answer:
                if answer.status_code != 201:
                    raise ceiling.CeilingError(f"POST /orders answered {answer.status_code}")
        cpu, wall = time.process_time() - cpu, time.monotonic() - started
    return {"calls_per_s": round(calls / wall, 1), "client_cpu_ms_per_call": round(cpu * 1000 / calls, 3)}


def _plumbing(orders: int, seconds: int) -> dict:
    """Two inserts and two calls per order, each measured without its load generator."""
    server = ceiling._retried(_gunicorn)
    try:
        insert = _insert(server, seconds)
        call = _call(orders)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"insert": insert, "call": call}


def floor_ms(hops: dict, plumbing: dict) -> float:
    """CPU per order of four hops, two bare inserts and two outbound calls."""
    return round(
        hops["cpu_ms_per_order"]["total"]
        + 2 * plumbing["insert"]["cpu_ms_per_order"]["total"]
        + 2 * plumbing["call"]["client_cpu_ms_per_call"],
        2,
    )


# SPEC's per-order writes at their least (see the module's docstring), five transactions as the
# stages have them; `floor` is the six statements the floor above already counts.
_ROWS_SCHEMA = (
    "DROP TABLE IF EXISTS minimal_key, minimal_order, minimal_transition, minimal_event, minimal_attempt",
    "CREATE TABLE minimal_key (hash text PRIMARY KEY, merchant int NOT NULL)",
    "CREATE TABLE minimal_order (id uuid PRIMARY KEY, merchant int NOT NULL, idem text NOT NULL,"
    " amount bigint NOT NULL, status smallint NOT NULL, updated_at timestamptz NOT NULL,"
    " UNIQUE (merchant, idem))",
    "CREATE TABLE minimal_transition (id bigserial PRIMARY KEY, order_id uuid NOT NULL,"
    " from_status smallint, to_status smallint NOT NULL, at timestamptz NOT NULL, why text NOT NULL,"
    " channel text NOT NULL)",
    "CREATE INDEX ON minimal_transition (order_id)",
    "CREATE TABLE minimal_event (id bigserial PRIMARY KEY, topic text NOT NULL, payload jsonb NOT NULL,"
    " created_at timestamptz NOT NULL, published_at timestamptz)",
    "CREATE INDEX ON minimal_event (created_at) WHERE published_at IS NULL",
    "CREATE TABLE minimal_attempt (id bigserial PRIMARY KEY, order_id uuid NOT NULL, kind text NOT NULL,"
    " at timestamptz NOT NULL, status int)",
    "CREATE INDEX ON minimal_attempt (order_id)",
    "INSERT INTO minimal_key VALUES ('k', 1)",
    "PREPARE auth (text) AS SELECT merchant FROM minimal_key WHERE hash = $1",
    "PREPARE new_order (uuid, text) AS INSERT INTO minimal_order VALUES ($1, 1, $2, 1000, 0, now())",
    "PREPARE move (uuid, smallint) AS UPDATE minimal_order SET status = $2, updated_at = now()"
    " WHERE id = $1 AND status = $2 - 1",
    "PREPARE log (uuid, smallint) AS INSERT INTO minimal_transition"
    " (order_id, from_status, to_status, at, why, channel)"
    " VALUES ($1, $2 - 1, $2, now(), 'stage', 'sandbox-a')",
    "PREPARE event (uuid, smallint) AS INSERT INTO minimal_event (topic, payload, created_at)"
    " VALUES ('order-updated', jsonb_build_object('order_id', $1::text, 'status', $2), now()) RETURNING id",
    "PREPARE published (bigint) AS UPDATE minimal_event SET published_at = now() WHERE id = $1",
    "PREPARE attempt (uuid, text) AS INSERT INTO minimal_attempt (order_id, kind, at, status)"
    " VALUES ($1, $2, now(), 200)",
)


def _stage(cursor, order: str, status: int, *, attempts: tuple[str, ...] = ()) -> None:
    """One stage's transaction: its compare-and-set (or the insert), log, event; then the mark."""
    cursor.execute("BEGIN")
    if status:
        cursor.execute("EXECUTE move(%s, %s)", (order, status))
    else:
        cursor.execute("EXECUTE new_order(%s, %s)", (order, order))
    cursor.execute("EXECUTE log(%s, %s)", (order, status))
    for kind in attempts:
        cursor.execute("EXECUTE attempt(%s, %s)", (order, kind))
    cursor.execute("EXECUTE event(%s, %s)", (order, status))
    event = cursor.fetchone()[0]
    cursor.execute("COMMIT")
    cursor.execute("EXECUTE published(%s)", (event,))


def _spec_rows(cursor, order: str) -> None:
    cursor.execute("EXECUTE auth('k')")
    _stage(cursor, order, 0)  # create: order-created
    _stage(cursor, order, 1)  # allocate: payment-channel-allocated
    _stage(cursor, order, 2, attempts=("charge",))  # charge
    cursor.execute("EXECUTE attempt(%s, 'webhook')", (order,))  # the provider's webhook, stored
    _stage(cursor, order, 3)  # confirm
    _stage(cursor, order, 4, attempts=("delivery", "callback"))  # callback: delivery, attempt


def _floor_rows(cursor, order: str) -> None:
    cursor.execute("EXECUTE new_order(%s, %s)", (order, order))
    cursor.execute("EXECUTE attempt(%s, 'webhook')", (order,))
    for status in range(1, 5):
        cursor.execute("EXECUTE move(%s, %s)", (order, status))


def _rows_cpu(cursor, orders: int, per_order) -> float:
    """Client and PostgreSQL CPU ms per order of `per_order`, on fresh tables."""
    cursor.execute("DEALLOCATE ALL")
    for statement in _ROWS_SCHEMA:
        cursor.execute(statement)
    ids = [str(uuid.uuid4()) for _ in range(orders)]
    client, (postgres, _) = time.process_time(), _servers_cpu()
    for order in ids:
        per_order(cursor, order)
    client, postgres = time.process_time() - client, _servers_cpu()[0] - postgres
    return (client + postgres) * 1000 / orders


def _spec_rows_added(orders: int) -> dict:
    """SPEC's per-order writes against the floor's six statements: CPU ms per order of each."""
    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    cursor = conn.cursor()
    try:
        _rows_cpu(cursor, 200, _spec_rows)  # warm the server's caches and this process
        spec = _rows_cpu(cursor, orders, _spec_rows)
        floor = _rows_cpu(cursor, orders, _floor_rows)
        cursor.execute(_ROWS_SCHEMA[0])
    finally:
        conn.close()
    return {"spec_ms": round(spec, 2), "floor_ms": round(floor, 2), "added_ms": round(spec - floor, 2)}


def _figures(per_s: float, orders: int, before: tuple, after: tuple) -> dict:
    workers, postgres, broker = ((a - b) * 1000 / orders for a, b in zip(after, before, strict=True))
    return {
        "orders_per_s": round(per_s, 1),
        "cpu_ms_per_order": {
            "workers": round(workers, 2),
            "postgres": round(postgres, 2),
            "redis": round(broker, 2),
            "total": round(workers + postgres + broker, 2),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.minimal", description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=10, help="orders per message in the batched chain")
    parser.add_argument("--seconds", type=int, default=15, help="how long wrk drives the bare insert")
    args = parser.parse_args(argv)
    folder = ceiling.source_dir()
    if folder is None:
        print("the shared ceiling folder (shared/bench/ceiling) was not found", file=sys.stderr)
        return 2
    ceiling._copy(folder, WORK)
    _patch(WORK)
    if not ceiling._venv_ready():
        ceiling._run(["./setup_venv.sh"], timeout=600, what="setup_venv.sh", cwd=WORK)
    started = not ceiling._redis_up()
    ceiling.start_services(WORK)
    try:
        ceiling._run(
            [str(ceiling.VENV / "bin" / "python"), "manage.py", "migrate", "-v0"],
            timeout=120,
            what="migrate",
            cwd=WORK,
        )
        runs = {
            "chain, 1 order per message": _chain(args.orders, 1),
            f"chain, {args.batch} orders per message": _chain(args.orders, args.batch),
            "no broker, row claims (2 processes)": _no_broker(args.orders),
        }
        plumbing = _plumbing(args.orders, args.seconds)
        rows = _spec_rows_added(args.orders)
    finally:
        if started:
            ceiling._run(["./stop_services.sh"], timeout=60, what="stop_services.sh", cwd=WORK)
    title = f"four hops per order, {args.orders} orders"
    print(f"{title:<44} {'orders/s':>9}  CPU ms/order: workers  postgres  redis  total")
    for name, figures in runs.items():
        cpu = figures["cpu_ms_per_order"]
        print(
            f"{name:<44} {figures['orders_per_s']:>9.1f}  {cpu['workers']:>20.2f}  {cpu['postgres']:>8.2f}"
            f"  {cpu['redis']:>5.2f}  {cpu['total']:>5.2f}"
        )
    insert, call = plumbing["insert"], plumbing["call"]
    cpu = insert["cpu_ms_per_order"]
    print(
        f"{'bare DRF insert (wrk -t1 -c4), per request':<44} {insert['orders_per_s']:>9.1f}"
        f"  gunicorn {cpu['workers']:.2f} + postgres {cpu['postgres']:.2f} = {cpu['total']:.2f} ms"
    )
    print(
        f"{'outbound JSON POST, client side, per call':<44} {call['calls_per_s']:>9.1f}"
        f"  {call['client_cpu_ms_per_call']:.3f} ms"
    )
    _print_floors("floor of one order (four hops + 2 inserts + 2 calls), CPU ms:", runs, plumbing, 0.0)
    print(
        "SPEC's rows per order at their least (psycopg2, prepared; client + PostgreSQL):"
        f" {rows['spec_ms']:.2f} ms, the floor's six statements alone {rows['floor_ms']:.2f} ms:"
        f" the rows add {rows['added_ms']:.2f} ms"
    )
    _print_floors("floor with SPEC's rows, CPU ms:", runs, plumbing, rows["added_ms"])
    return 0


def _print_floors(title: str, runs: dict, plumbing: dict, added: float) -> None:
    print(title)
    for name in ("chain, 1 order per message", "no broker, row claims (2 processes)"):
        floor = floor_ms(runs[name], plumbing) + added
        print(f"  {name:<42} {floor:>6.2f}  ({floor / TARGET_MS:.2f} x issue 15's {TARGET_MS:g} ms target)")


if __name__ == "__main__":
    sys.exit(main())
