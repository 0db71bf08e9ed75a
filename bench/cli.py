"""Command line of the benchmark: set the stack up for it, run the phases, print and store the figures."""

import argparse
import json
import sys
import time
import uuid
from datetime import UTC, datetime

from bench import ceiling, phases, report
from bench.database import Observer, statement_stats_enable, stored_orders_seed, stored_orders_unseed
from bench.load import OrderApi
from bench.stack import (
    BENCH_ENV,
    Endpoints,
    merchants_ensure,
    stack_env_differences,
    stack_restart,
    stack_stop,
)
from bench.system import Servers, Workers, machine, parent_pid


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Drive orders through the running stack over the HTTP API and measure it (SPEC 8).",
    )
    parser.add_argument("--mode", choices=("burst", "steady", "growth", "all"), default="all")
    parser.add_argument("--orders", type=int, default=2000, help="orders per burst (default 2000)")
    parser.add_argument("--rate", type=float, default=50.0, help="steady offered load, orders/s (default 50)")
    parser.add_argument("--seconds", type=float, default=20.0, help="steady duration (default 20)")
    parser.add_argument(
        "--stored", type=int, default=1_000_000, help="completed orders stored before the growth burst"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="client connections in a burst")
    parser.add_argument("--warmup", type=int, default=200, help="orders sent first and not measured")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for completion")
    parser.add_argument(
        "--no-ceiling",
        action="store_true",
        help="skip the bare-chain ceiling (shared/bench/ceiling) that burst and growth runs compare with",
    )
    parser.add_argument(
        "--no-ceiling-http",
        action="store_true",
        help="run the ceiling's Celery chain only, not its bare DRF insert (saves about 40 s)",
    )
    parser.add_argument(
        "--ceiling-worker",
        type=_worker_flags,
        default=ceiling.DEFAULT_WORKER,
        metavar="POOL,C,PREFETCH",
        help="the ceiling worker's pool, concurrency and prefetch multiplier (default prefork,4,4)",
    )
    parser.add_argument("--ceiling-dir", help="the ceiling reference folder (default: shared/bench/ceiling)")
    parser.add_argument(
        "--no-restart",
        action="store_true",
        help="use the running stack as it is (it must have been started with the bench environment)",
    )
    parser.add_argument(
        "--keep-stack",
        action="store_true",
        help="leave the stack running with the bench environment afterwards",
    )
    return parser.parse_args(argv)


def _worker_flags(text: str) -> tuple[str, int, int]:
    try:
        pool, concurrency, prefetch = text.split(",")
        if pool not in ("prefork", "threads", "solo"):
            raise ValueError(pool)
        return pool, int(concurrency), int(prefetch)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected POOL,CONCURRENCY,PREFETCH, e.g. prefork,4,4: {exc}"
        ) from exc


def _ceiling(args, results: dict, *, stack_stopped: bool) -> None:
    """Run the bare-chain ceiling now (same machine, same N) and put the ratios next to the product's."""
    if args.no_ceiling:
        results["ceiling"] = {"ran": False, "error": "skipped (--no-ceiling)"}
        return
    if not (results.get("burst") or results.get("growth")):
        results["ceiling"] = {
            "ran": False,
            "error": "no burst in this run (the ceiling compares with a burst)",
        }
        return
    _log("ceiling: the bare chain of shared/bench/ceiling on this machine, same order count")
    figures = ceiling.run(
        orders=args.orders,
        worker=args.ceiling_worker,
        http=not args.no_ceiling_http,
        timeout=args.timeout,
        source=args.ceiling_dir,
        log=_log,
    )
    figures["product_stack"] = (
        "app processes stopped while it ran" if stack_stopped else "app processes running (idle) while it ran"
    )
    if not figures["ran"]:
        _log(f"ceiling: not measured: {figures.get('error')}")
    results["ceiling"] = figures
    for phase in ("burst", "growth"):
        r = results.get(phase)
        if not r:
            continue
        chain = figures.get("orders_per_s")
        r["ratio_to_ceiling"] = round(r["e2e_per_s"] / chain, 3) if chain else None
        api = figures.get("api_create_per_s")
        r["api_create_ratio_to_ceiling"] = round(r["api_create_per_s"] / api, 3) if api else None


def _log(message: str) -> None:
    print(f"[bench {datetime.now(tz=UTC).strftime('%H:%M:%S')}] {message}", flush=True)


def _growth(ctx: phases.Context, args, endpoints: Endpoints, stored_merchant: str, baseline) -> dict:
    have = ctx.observer.merchant_order_count(stored_merchant)
    seeded, seed_seconds = 0, 0.0
    if have < args.stored:
        _log(f"growth: seeding {args.stored - have:,} stored completed orders (INSERT ... generate_series)")
        started = time.monotonic()
        seeded = stored_orders_seed(
            endpoints.database,
            merchant_id=stored_merchant,
            have=have,
            target=args.stored,
            progress=lambda n: _log(f"growth: {n:,} stored orders"),
        )
        seed_seconds = round(time.monotonic() - started, 1)
        _log(f"growth: seeded {seeded:,} in {seed_seconds} s")
    else:
        _log(f"growth: {have:,} stored orders already seeded")
    figures = phases.burst(ctx, orders=args.orders, label="growth")
    figures["stored_seed_orders"] = max(have, have + seeded)
    figures["seeded_now"] = seeded
    figures["seed_seconds"] = seed_seconds
    figures["comparison"] = phases.growth_compare(figures, baseline)
    return figures


def _previous_burst() -> dict | None:
    """The burst of the last stored run, as the growth baseline when this run has none."""
    try:
        previous = json.loads((report.RESULTS / "latest.json").read_text())
    except (OSError, ValueError):
        return None
    return previous.get("burst")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    endpoints = Endpoints.from_env()
    run_id = uuid.uuid4().hex[:8]
    env_note = " ".join(f"{k}={v}" for k, v in BENCH_ENV.items())
    if args.no_restart:
        differences = stack_env_differences(BENCH_ENV)
        if differences:
            print(
                f"the running stack lacks {env_note} (it has {differences}); run without --no-restart",
                file=sys.stderr,
            )
            return 2
        stack_note = f"used as running ({env_note})"
    else:
        _log(f"restarting the stack's app processes with {env_note} (scripts/stack.sh down, up)")
        stack_restart(extra_env=BENCH_ENV)
        stack_note = f"app processes restarted by the bench with {env_note}; PostgreSQL and Redis untouched"
    results: dict = {"run_id": run_id, "started_at": datetime.now(tz=UTC).isoformat(), "machine": machine()}
    results["args"] = vars(args)
    results["stack"] = stack_note
    statement_stats_enable(endpoints.database)
    observer = Observer(endpoints.database)
    workers = Workers(endpoints.redis)
    stack_stopped = False
    try:
        creds = merchants_ensure(sandbox_url=endpoints.sandbox, exists=observer.merchant_exists)
        api = OrderApi(
            base_url=endpoints.api, api_key=creds["driver"]["api_key"], connections=max(args.concurrency, 8)
        )
        ctx = phases.Context(
            api=api,
            observer=observer,
            workers=workers,
            run_id=run_id,
            concurrency=args.concurrency,
            timeout=args.timeout,
            log=_log,
            databases=frozenset({observer.database_name(), endpoints.sandbox_database_name}),
            product_database=observer.database_name(),
            servers=Servers(
                postmaster=parent_pid(observer.backend_pid()),
                redis=workers.server_pid(),
                own_backends=frozenset({observer.backend_pid()}),
            ),
        )
        stored_id = creds["stored"]["id"]
        if args.mode == "all" and ctx.observer.merchant_order_count(stored_id):
            # The growth comparison needs a baseline without the stored orders: take them out
            # now (seconds), the growth phase seeds them again (INSERT ... generate_series).
            _log("all: removing the stored orders of a previous growth run for an empty baseline")
            removed = stored_orders_unseed(endpoints.database, merchant_id=stored_id)
            _log(f"all: removed {removed:,} stored orders")
        phases.warmup(ctx, args.warmup)
        if args.mode in ("burst", "all"):
            _log(f"burst: {args.orders} orders, {args.concurrency} connections")
            results["burst"] = phases.burst(ctx, orders=args.orders)
        if args.mode in ("steady", "all"):
            _log(f"steady: {args.rate:g} orders/s for {args.seconds:g} s")
            results["steady"] = phases.steady(ctx, rate=args.rate, seconds=args.seconds)
        if args.mode in ("growth", "all"):
            baseline = results.get("burst") or _previous_burst()
            results["growth"] = _growth(ctx, args, endpoints, stored_id, baseline)
        main_phase = results.get("burst") or results.get("growth") or results.get("steady")
        results["queries_per_order"] = main_phase["queries_per_order"]
        results["app_queries_per_order"] = main_phase["app_queries_per_order"]
        results["fk_check_queries_per_order"] = main_phase["fk_check_queries_per_order"]
        for key in ("commits_per_order", "wal_records_per_order", "wal_fpi_per_order", "wal_bytes_per_order"):
            results[key] = main_phase.get(key)
        results["tasks_per_order"] = main_phase["tasks_per_order"]
        results["tasks"] = main_phase["tasks"]
        api.close()
        if not args.no_restart and not args.keep_stack and not args.no_ceiling:
            # The ceiling gets the machine as the product had it: the app processes stop now
            # (the finally below starts them again with their usual environment).
            stack_stop()
            stack_stopped = True
        _ceiling(args, results, stack_stopped=stack_stopped)
    finally:
        observer.close()
        workers.close()
        if not args.no_restart and not args.keep_stack:
            _log("restoring the stack's app processes to their usual environment")
            stack_restart(extra_env={})
    results["machine_end"] = {"loadavg": machine()["loadavg"]}
    results["targets"] = report.targets(results)
    path = report.write(results)
    print()
    print(report.table(results))
    print(f"\nwritten: {path.relative_to(report.RESULTS.parent.parent)} and bench/results/latest.json")
    return 0
