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
"""

import argparse
import multiprocessing
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg2
import redis

from bench import ceiling
from bench.stack import RUN
from bench.system import tree_cpu

WORK = RUN / "bench-minimal"
DSN = "host=127.0.0.1 port=55532 user=ceil dbname=ceil"
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


def _chain(orders: int, batch: int) -> dict:
    """The bare chain with `batch` orders per message: orders/s and CPU ms per order."""
    redis.Redis(port=ceiling.REDIS_PORT).flushall()  # no worker is running yet
    ready = WORK / "worker.ready"
    ready.unlink(missing_ok=True)
    log = (WORK / "worker.log").open("w")
    pool = ("-P", "prefork", "-c", "4", "--prefetch-multiplier", "4")  # as `make bench` runs the chain
    worker = subprocess.Popen(
        [
            str(ceiling.VENV / "bin" / "celery"),
            "-A",
            "ceilproj",
            "worker",
            *pool,
            "-l",
            "warning",
            "-n",
            "minimal@%h",
        ],
        cwd=WORK,
        env={**ceiling._env(), "CEIL_READY_FILE": str(ready)},
        stdout=log,
        stderr=subprocess.STDOUT,
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
        log.close()
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
