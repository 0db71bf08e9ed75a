"""The three measurements (burst, steady, growth) and what each one reports."""

import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench import load
from bench.database import Observer, statements_delta
from bench.stack import RUN
from bench.system import (
    BEAT_TASKS,
    Servers,
    Workers,
    cpu_busy_pct,
    cpu_by_process,
    cpu_delta,
    cpu_sample,
)

# Parts of the CPU split that are not the stack under test at all.
OUTSIDE = (
    "bench client",
    "postgres (bench observer)",
    "other processes",
    "postgres (other dbs)",
    "unattributed",
)
# Our own processes (issue 15): not the sandbox, its database, the bench client or the callback
# receiver (the sandbox's /sandbox/callbacks), which stand in for other people's machines.
PRODUCT_PROCESSES = (
    "web",
    "worker-orders",
    "worker-allocation",
    "worker-gateway",
    "worker-callbacks",
    "beat",
    "redis",
    "postgres (background)",
)
# Parts the split can only see per server, not per database: other users of the same server
# (test runs of other databases, other Redis databases) are charged to them too.
SERVER_WIDE = ("postgres (background)", "redis")


@dataclass
class Context:
    api: load.OrderApi
    observer: Observer
    workers: Workers
    run_id: str
    concurrency: int
    timeout: float
    log: Callable[[str], None]
    databases: frozenset[str]
    product_database: str
    servers: Servers


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


_TICKS = os.sysconf("SC_CLK_TCK")


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(ctx: Context, label: str, drive: Callable[[], load.LoadResult]) -> dict:
    """Drive orders, wait for them to complete, and collect the figures of that window."""
    if not ctx.workers.wait_idle():
        ctx.log(f"{label}: the queues did not drain within 60 s; measuring anyway")
    stored = ctx.observer.order_count()
    tasks_before, workers_before = ctx.workers.task_totals()
    sql_before = ctx.observer.statements()
    writes_before = ctx.observer.write_counters()
    own_before = ctx.observer.own_statements
    cpu_before, client_before = cpu_sample(), _client_cpu()
    parts_before = cpu_by_process(RUN, ctx.databases, ctx.servers)

    result = drive()
    ctx.log(
        f"{label}: {len(result.ids)} orders created in {result.finished - result.started:.1f} s;"
        " waiting for completion"
    )
    completed = ctx.observer.wait_completed(result.ids, timeout=ctx.timeout)
    waited = time.time()

    cpu_after, client_after = cpu_sample(), _client_cpu()
    parts_after = cpu_by_process(RUN, ctx.databases, ctx.servers)
    own = ctx.observer.own_statements - own_before
    sql = statements_delta(sql_before, ctx.observer.statements(), own=own)
    commits, wal_records, wal_fpi, wal_bytes = (
        after - before for after, before in zip(ctx.observer.write_counters(), writes_before, strict=True)
    )
    # Less the observer's own transactions in between: its reads, its WAL read, its statement list.
    commits -= own + 2
    tasks_after, workers_after = ctx.workers.task_totals()
    timings = ctx.observer.timings(result.ids)

    created = len(result.ids)
    latencies = [(done - start) * 1000 for start, done in timings]
    first_create = min((start for start, _ in timings), default=result.started)
    last_done = max((done for _, done in timings), default=waited)
    tasks = {
        name: tasks_after[name] - tasks_before.get(name, 0)
        for name in sorted(tasks_after)
        if tasks_after[name] - tasks_before.get(name, 0) > 0
    }
    pipeline_tasks = sum(count for name, count in tasks.items() if name not in BEAT_TASKS)
    per = max(created, 1)
    parts = dict(cpu_delta(parts_before, parts_after))
    machine_busy = (cpu_after[0] - cpu_before[0]) / _TICKS
    # Processes that ended within the window and anything the split above cannot see.
    parts["unattributed"] = max(machine_busy - sum(parts.values()), 0.0)
    pipeline_parts = {name: seconds for name, seconds in parts.items() if name not in OUTSIDE}
    stack_cpu_ms = 1000 * sum(pipeline_parts.values()) / per
    product_names = (*PRODUCT_PROCESSES, f"postgres ({ctx.product_database})")
    product_parts = {name: parts.get(name, 0.0) for name in product_names}
    # Per completed order: orders that did not complete still cost CPU, and are reported apart.
    product_cpu_ms = 1000 * sum(product_parts.values()) / max(completed, 1)
    return {
        "orders": created + len(result.failures),
        "created": created,
        "completed": completed,
        "not_completed": created - completed,
        "create_failures": len(result.failures),
        "create_failure_samples": result.failures[:5],
        "create_retries": result.retries,
        "stored_orders": stored,
        "api_create_per_s": round(created / max(result.finished - result.started, 1e-9), 1),
        "api_create_p50_ms": _ms(percentile(result.create_ms, 50)),
        "api_create_p99_ms": _ms(percentile(result.create_ms, 99)),
        "e2e_per_s": round(completed / max(last_done - first_create, 1e-9), 1) if completed else 0.0,
        "e2e_seconds": round(last_done - first_create, 2),
        "p50_ms": _ms(percentile(latencies, 50)),
        "p95_ms": _ms(percentile(latencies, 95)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "max_ms": _ms(max(latencies, default=None)),
        "queries_per_order": round(sql.toplevel / per, 1),
        "fk_check_queries_per_order": round(sql.fk_checks / per, 1),
        "app_queries_per_order": round((sql.toplevel - sql.fk_checks) / per, 1),
        "nested_queries_per_order": round(sql.nested / per, 1),
        "commits_per_order": round(max(commits, 0) / per, 1),
        # Whole server: the sandbox's ledger database shares it (a few records per order).
        "wal_records_per_order": round(wal_records / per, 1),
        "wal_fpi_per_order": round(wal_fpi / per, 2),
        "wal_bytes_per_order": round(wal_bytes / per),
        "busiest_statements": [
            {"per_order": round(calls / per, 2), "query": text[:300]} for calls, text in sql.top
        ],
        "tasks_per_order": round(pipeline_tasks / per, 2),
        "tasks": tasks,
        "celery_workers_answering": [workers_before, workers_after],
        "cpu_busy_pct": cpu_busy_pct(cpu_before, cpu_after),
        # CPU the stack spent per order (ms), by part; and CPU seconds of everything else meanwhile.
        "cpu_ms_per_order": {
            name: round(1000 * seconds / per, 2)
            for name, seconds in sorted(pipeline_parts.items(), key=lambda item: -item[1])
        }
        | {"total": round(stack_cpu_ms, 1)},
        # An estimate, not a measurement: the orders/s the machine's cores could carry at this CPU
        # cost per order if nothing else ran on it (other processes' CPU is shown apart below).
        "cpu_bound_per_s": round(1000 * (os.cpu_count() or 1) / stack_cpu_ms, 1) if stack_cpu_ms else None,
        # Issue 15: the CPU of our own processes per completed order (see PRODUCT_PROCESSES).
        "product_cpu_ms_per_order": round(product_cpu_ms, 1),
        "product_cpu_ms_per_order_parts": {
            name: round(1000 * seconds / max(completed, 1), 2)
            for name, seconds in sorted(product_parts.items(), key=lambda item: -item[1])
        },
        "product_cpu_note": (
            f"web, 4 workers, beat, PostgreSQL backends of database {ctx.product_database!r} (per database),"
            f" and, only measurable per server: {', '.join(SERVER_WIDE)}"
            " (other users of those servers meanwhile are included)"
        ),
        "cpu_s_outside_stack": {name: round(parts[name], 2) for name in OUTSIDE if name in parts},
        "client_cpu_s": round(client_after - client_before, 2),
        "_send_lag_ms": result.lag_ms,
    }


def warmup(ctx: Context, orders: int) -> None:
    """A few orders through every stage first: imports, pools and connections of fresh processes."""
    if orders <= 0:
        return
    result = load.burst(
        api=ctx.api, orders=orders, concurrency=min(ctx.concurrency, 8), prefix=f"bench-{ctx.run_id}-warmup"
    )
    done = ctx.observer.wait_completed(result.ids, timeout=ctx.timeout)
    ctx.log(f"warm-up: {done}/{len(result.ids)} orders completed")


def burst(ctx: Context, *, orders: int, label: str = "burst") -> dict:
    figures = _measure(
        ctx,
        label,
        lambda: load.burst(
            api=ctx.api, orders=orders, concurrency=ctx.concurrency, prefix=f"bench-{ctx.run_id}-{label}"
        ),
    )
    figures.pop("_send_lag_ms")
    figures["concurrency"] = ctx.concurrency
    return figures


def steady(ctx: Context, *, rate: float, seconds: float) -> dict:
    figures = _measure(
        ctx,
        "steady",
        lambda: load.steady(
            api=ctx.api,
            rate=rate,
            seconds=seconds,
            prefix=f"bench-{ctx.run_id}-steady",
            max_in_flight=max(ctx.concurrency, 8),
        ),
    )
    lag = figures.pop("_send_lag_ms")
    achieved = figures.pop("e2e_per_s")
    figures = {
        "offered_per_s": rate,
        "seconds": seconds,
        "achieved_per_s": achieved,
        **figures,
        "send_lag_p99_ms": _ms(percentile(lag, 99)),
    }
    figures.pop("api_create_per_s")
    # Kept up: everything offered was taken and completed, at the offered pace, sent on schedule.
    figures["kept_up"] = bool(
        figures["create_failures"] == 0
        and figures["not_completed"] == 0
        and achieved >= 0.95 * rate
        and (figures["send_lag_p99_ms"] or 0) <= 1000
    )
    return figures


def growth_compare(growth: dict, baseline: dict | None) -> dict:
    """Growth figures against a burst on a small table: within 10 % or not.

    Two verdicts. `within_10pct` is the brief's: end-to-end throughput no more than 10 % lower
    and p99 no more than 10 % higher. A burst's p99 is mostly queueing, so it also moves with how
    the CPU was shared between accepting and processing orders, and with whatever else ran on
    the machine. `work_within_10pct` compares the work each order cost (CPU of the stack and SQL
    statements), which is what a table that grows would make more expensive.
    """
    if baseline is None:
        return {"baseline": None, "within_10pct": None, "work_within_10pct": None}

    def change(old, new) -> float | None:
        if not old or new is None:
            return None
        return round(100.0 * (new - old) / old, 1)

    def figure(key: str):
        return change(baseline.get(key), growth.get(key))

    e2e, p99, api = figure("e2e_per_s"), figure("p99_ms"), figure("api_create_per_s")
    queries = figure("queries_per_order")
    cpu_before = (baseline.get("cpu_ms_per_order") or {}).get("total")
    cpu = change(cpu_before, (growth.get("cpu_ms_per_order") or {}).get("total"))
    comparable = baseline["stored_orders"] * 10 <= growth["stored_orders"]
    return {
        "baseline": {
            key: baseline.get(key)
            for key in ("stored_orders", "e2e_per_s", "p99_ms", "api_create_per_s", "queries_per_order")
        }
        | {"cpu_ms_per_order": cpu_before},
        "e2e_change_pct": e2e,
        "p99_change_pct": p99,
        "api_create_change_pct": api,
        "cpu_per_order_change_pct": cpu,
        "queries_per_order_change_pct": queries,
        "comparable": comparable,
        "within_10pct": bool(comparable and e2e is not None and p99 is not None and e2e >= -10 and p99 <= 10),
        "work_within_10pct": bool(
            comparable and cpu is not None and queries is not None and cpu <= 10 and queries <= 10
        ),
    }
