"""The machine and the workers: cores, load, CPU busy time, Celery task counters, queue depth."""

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import redis
from celery import Celery

QUEUES = ("orders", "allocation", "gateway", "callbacks")
# Periodic tasks (config/settings/base.py CELERY_BEAT_SCHEDULE): counted apart from the pipeline's.
BEAT_TASKS = frozenset(
    {
        "orders.relay_outbox",
        "orders.sweep_orders",
        "callbacks.sweep_deliveries",
        "orders.prune_idempotency_keys",
    }
)


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "cpu_model": model,
    }


def cpu_sample() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat", encoding="utf-8") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def cpu_busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    busy, total = after[0] - before[0], after[1] - before[1]
    return round(100.0 * busy / total, 1) if total else 0.0


_TICKS = os.sysconf("SC_CLK_TCK")
STACK_PROCESSES = (
    "web",
    "sandbox",
    "worker-orders",
    "worker-allocation",
    "worker-gateway",
    "worker-callbacks",
    "beat",
)


def _processes() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command line, CPU seconds so far) of every process we may read."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry.name)] = (int(fields[1]), cmdline, (int(fields[11]) + int(fields[12])) / _TICKS)
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds so far of a process and every descendant of it alive now."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += procs.get(pid, (0, "", 0.0))[2]
        todo.extend(children.get(pid, ()))
    return total


def parent_pid(pid: int) -> int | None:
    """The parent of a local process (None if it is not visible here)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Servers:
    """Which PostgreSQL and Redis servers are the stack's, told apart from others on the machine.

    Other servers run here too (test runs start their own redis-server and PostgreSQL), so a
    process is charged to the stack's PostgreSQL only if the stack's postmaster is its parent
    (or it is that postmaster), and to the broker only if it is the broker's redis-server.
    """

    postmaster: int | None  # pid of the stack's PostgreSQL server (parent of every backend)
    redis: int | None  # pid of the broker's redis-server (INFO server: process_id)
    own_backends: frozenset[int] = frozenset()  # the bench's own connections (the observer)


def cpu_by_process(
    run_dir: Path, databases: frozenset[str], servers: Servers
) -> dict[int, tuple[str, float]]:
    """pid -> (part of the stack it belongs to, CPU seconds so far): Procfile name, PostgreSQL, Redis.

    PostgreSQL backends are told apart by database name: the stack's databases (the service's
    and the sandbox provider's) are charged to it, other users of the server (test runs) are not.
    A backend's CPU is per database; the server's background processes (checkpointer, WAL writer,
    background writer, autovacuum) work for every database at once and are counted as one part,
    "postgres (background)". The broker's redis-server is one process for every Redis database.
    """
    roots = {}
    for name in STACK_PROCESSES:
        try:
            roots[int((run_dir / "pids" / f"{name}.pid").read_text().strip())] = name
        except (OSError, ValueError):
            pass
    procs = _processes()
    me = os.getpid()
    owners: dict[int, tuple[str, float]] = {}
    for pid, (ppid, cmdline, cpu) in procs.items():
        owner, cursor, hops = None, pid, 0
        while cursor and hops < 10 and owner is None:
            owner = roots.get(cursor)
            cursor = procs.get(cursor, (0, "", 0))[0]
            hops += 1
        if owner is None:
            if pid == me:
                owner = "bench client"
            elif servers.postmaster and pid == servers.postmaster:
                owner = "postgres (background)"
            elif servers.postmaster and ppid == servers.postmaster:
                words = cmdline.split()
                if pid in servers.own_backends:
                    owner = "postgres (bench observer)"
                elif cmdline.startswith("postgres: ") and len(words) >= 3 and "(" in cmdline:
                    # a backend: "postgres: user db host(port) state"
                    owner = f"postgres ({words[2]})" if words[2] in databases else "postgres (other dbs)"
                else:
                    owner = "postgres (background)"
            elif servers.redis and pid == servers.redis:
                owner = "redis"
            else:
                owner = "other processes"
        owners[pid] = (owner, cpu)
    return owners


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> Counter:
    """CPU seconds spent between two cpu_by_process() samples, by part, over the processes alive at
    the second one (a process that ended in between is not seen: the caller counts it apart)."""
    spent: Counter = Counter()
    for pid, (owner, cpu) in after.items():
        previous = before.get(pid)
        spent[owner] += cpu - (previous[1] if previous and previous[0] == owner else 0.0)
    return spent


class Workers:
    """Celery's own counters (`inspect().stats()["total"]`) and the Redis queue lengths."""

    def __init__(self, broker_url: str) -> None:
        self.app = Celery("bench", broker=broker_url)
        self.redis = redis.Redis.from_url(broker_url, socket_timeout=5)

    def task_totals(self) -> tuple[Counter, int]:
        """Tasks accepted so far, by name, summed over the workers that answered; and how many answered."""
        stats = self.app.control.inspect(timeout=1.5).stats() or {}
        totals: Counter = Counter()
        for worker in stats.values():
            totals.update(worker.get("total") or {})
        return totals, len(stats)

    def server_pid(self) -> int | None:
        """The broker's redis-server process id (None if Redis does not say)."""
        try:
            return int(self.redis.info("server")["process_id"])
        except (redis.RedisError, KeyError, ValueError):
            return None

    def queued(self) -> int:
        return sum(self.redis.llen(name) for name in QUEUES)

    def wait_idle(self, *, timeout: float = 60.0) -> bool:
        """Wait until no message is waiting in any service queue."""
        deadline = time.monotonic() + timeout
        while self.queued():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def close(self) -> None:
        self.redis.close()
        self.app.close()
