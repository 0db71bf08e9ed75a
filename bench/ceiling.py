"""The bare-chain ceiling in the same run: the workflow reduced to its least work on the same stack.

The reference is a read-only folder shared by the project (`shared/bench/ceiling/`, its README
says what it measures): Django + DRF + Celery + Redis + PostgreSQL, four chained Celery tasks of
one UPDATE each, and a DRF view that inserts one row. Its scripts write `results/` relative to
their own folder, so each run copies the folder afresh to `.run/bench-ceiling/` and runs it
there, with its own venv (/tmp/ceil-venv, from its pinned requirements), its own PostgreSQL and
Redis (127.0.0.1:55532 and :56479, data under /tmp) which it stops afterwards.

Anything that goes wrong is reported as the reason the ceiling was not measured; it never stops
the product's figures from being reported.
"""

import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.stack import ROOT, RUN
from bench.system import cpu_busy_pct, cpu_sample

WORK = RUN / "bench-ceiling"
VENV = Path("/tmp/ceil-venv")  # noqa: S108 - the path the reference's own scripts use
REDIS_PORT = 56479
# Worker flags of the chain. The product runs prefork pools (1+2+4+4 processes, prefetch 1);
# the reference's best single worker on 2 cores is prefork -c 4 --prefetch-multiplier 4 (its
# README: c=6 and c=8 lose ground, prefetch 1 costs 5-7 %), the flags issue 15's 128 orders/s
# was measured with. A ceiling is the best the bare chain does, so that is the default.
DEFAULT_WORKER = ("prefork", 4, 4)
# The product's web is gunicorn gthread with 2 threads (config/gunicorn_conf.py); the reference
# script fixes 2 workers and runs wrk -t2 -c8 for 15 s against GET /ping, then POST /orders.
HTTP_CLASS, HTTP_THREADS = "gthread", 2
# Variables of the product's environment that the reference's settings or scripts would read.
_FOREIGN_ENV = (
    "DJANGO_SETTINGS_MODULE",
    "PGPORT",
    "PGDATA",
    "PGBIN",
    "PGHOST",
    "PGUSER",
    "PGDATABASE",
    "REDIS_PORT",
    "VENV",
    "PYTHONPATH",
    "VIRTUAL_ENV",
)


def source_dir(explicit: str | None = None) -> Path | None:
    """The shared reference folder: --ceiling-dir, $BENCH_CEILING_DIR, or `shared/bench/ceiling`
    beside the checkout (/work/main) or beside its worktree folder (/work/wt/<name>)."""
    named = explicit or os.environ.get("BENCH_CEILING_DIR")
    # A folder named by the caller is the only one tried: a wrong name is an error, not a fallback.
    candidates = (
        [named]
        if named
        else [str(b / "shared" / "bench" / "ceiling") for b in (ROOT.parent, ROOT.parent.parent)]
    )
    for candidate in candidates:
        if candidate and (Path(candidate) / "ceiling.py").is_file():
            return Path(candidate)
    return None


class CeilingError(Exception):
    pass


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _FOREIGN_ENV}
    env["PATH"] = f"{VENV / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def _run(args: list[str], *, timeout: float, what: str, cwd: Path = WORK, env: dict | None = None) -> str:
    try:
        result = subprocess.run(
            args,
            cwd=cwd,
            env={**_env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CeilingError(f"{what}: no answer within {timeout:g} s") from exc
    except OSError as exc:
        raise CeilingError(f"{what}: {exc}") from exc
    if result.returncode != 0:
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
        raise CeilingError(f"{what} failed ({result.returncode}): {tail}")
    return result.stdout


def _retried(action, *, attempts: int = 4, pause: float = 20.0):
    """`action()`, tried again for a minute if it fails.

    The reference's ports (PostgreSQL 55532, Redis 56479, gunicorn 58000) lie in Linux's ephemeral
    range: right after a burst, one of the product's client sockets (open, or in TIME_WAIT for up
    to 60 s) can hold one, and the server then cannot bind it ("Address already in use"; a ceiling
    was lost so on 2026-11-30 for PostgreSQL, and the API ceiling on 2026-12-01 for gunicorn).
    """
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except CeilingError:
            if attempt == attempts:
                raise
            time.sleep(pause)


def start_services(cwd: Path = WORK, *, attempts: int = 4, pause: float = 20.0) -> None:
    """The reference's start_services.sh (_retried)."""
    _retried(
        lambda: _run(["./start_services.sh"], timeout=120, what="start_services.sh", cwd=cwd),
        attempts=attempts,
        pause=pause,
    )


def _copy(source: Path, work: Path = WORK) -> None:
    """A fresh writable copy of the reference (its files are read-only; results/ starts empty)."""
    if work.exists():
        for path in [work, *work.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | stat.S_IWUSR)
        shutil.rmtree(work)
    shutil.copytree(source, work, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for path in [work, *work.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    (work / "results").mkdir()


def _venv_ready() -> bool:
    if not (VENV / "bin" / "python").exists() or not shutil.which("wrk") or not shutil.which("redis-server"):
        return False
    probe = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", "import django, rest_framework, celery, psycopg, gunicorn"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def _redis_up() -> bool:
    if not shutil.which("redis-cli"):
        return False
    probe = subprocess.run(
        ["redis-cli", "-p", str(REDIS_PORT), "ping"], capture_output=True, text=True, check=False, timeout=5
    )
    return probe.stdout.strip() == "PONG"


def _chain(orders: int, worker: tuple[str, int, int], timeout: float) -> dict:
    pool, concurrency, prefetch = worker
    before = cpu_sample()
    started = time.monotonic()
    # One repetition, N orders: ceiling.py appends its figures to results/celery.jsonl.
    _run(
        [
            "./bench_celery.sh",
            pool,
            str(concurrency),
            str(prefetch),
            str(orders),
            "1",
            "--timeout",
            f"{timeout:g}",
        ],
        timeout=timeout + 120,
        what="bench_celery.sh",
    )
    busy = cpu_busy_pct(before, cpu_sample())
    lines = (WORK / "results" / "celery.jsonl").read_text().strip().splitlines()
    if not lines:
        raise CeilingError("bench_celery.sh wrote no result")
    figures = json.loads(lines[-1])
    return {
        "orders_per_s": figures["orders_per_s"],
        "tasks_per_s": figures["tasks_per_s"],
        "p50_ms": figures["p50_ms"],
        "p99_ms": figures["p99_ms"],
        "wall_s": figures["wall_s"],
        "run_s": round(time.monotonic() - started, 1),
        "cpu_busy_pct": busy,
    }


_WRK_LINE = re.compile(r"POST /orders: req/s=([\d.]+) avg=(\S+) p50=(\S+) p99=(\S+)(.*)")


def _http(timeout: float = 120.0, *, attempts: int = 4, pause: float = 25.0) -> dict:
    out = _retried(
        lambda: _run(
            ["./bench_http.sh", HTTP_CLASS, str(HTTP_THREADS), "1"], timeout=timeout, what="bench_http.sh"
        ),
        attempts=attempts,
        pause=pause,
    )
    match = _WRK_LINE.search(out)
    if not match:
        raise CeilingError(f"bench_http.sh printed no POST /orders figure: {out.strip()[-200:]!r}")
    figures = {"api_create_per_s": float(match.group(1)), "p50": match.group(3), "p99": match.group(4)}
    if match.group(5).strip():
        figures["errors"] = match.group(5).strip()
    return figures


def run(
    *,
    orders: int,
    worker: tuple[str, int, int] = DEFAULT_WORKER,
    http: bool = True,
    timeout: float = 180.0,
    source: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure the ceiling; always a dict: `ran` False with `error` when it could not be measured."""
    pool, concurrency, prefetch = worker
    out: dict = {
        "ran": False,
        "orders": orders,
        "worker": f"celery -P {pool} -c {concurrency} --prefetch-multiplier {prefetch}",
        "workdir": str(WORK.relative_to(ROOT)),
    }
    folder = source_dir(source)
    if folder is None:
        named = source or os.environ.get("BENCH_CEILING_DIR") or "shared/bench/ceiling"
        out["error"] = (
            f"reference folder not found: {named}"
            " (no ceiling.py there; --ceiling-dir or BENCH_CEILING_DIR name it)"
        )
        return out
    out["source"] = str(folder)
    started_services = False
    try:
        _copy(folder)
        if not _venv_ready():
            log("ceiling: setting up /tmp/ceil-venv and the tools (setup_venv.sh, about a minute)")
            _run(["./setup_venv.sh"], timeout=600, what="setup_venv.sh")
        started_services = not _redis_up()
        start_services()
        if not started_services:
            out["services_note"] = "its PostgreSQL/Redis were already running; left running"
        _run([str(VENV / "bin" / "python"), "manage.py", "migrate", "-v0"], timeout=120, what="migrate")
        log(f"ceiling: bare chain, {orders} orders, {out['worker']}")
        out["chain"] = _chain(orders, worker, timeout)
        out["orders_per_s"] = out["chain"]["orders_per_s"]
        out["ran"] = True
        if http:
            out["http_server"] = f"gunicorn -w 2 -k {HTTP_CLASS} --threads {HTTP_THREADS}; wrk -t2 -c8 -d15s"
            log(f"ceiling: bare DRF insert, {out['http_server']}")
            try:
                out["http"] = _http()
                out["api_create_per_s"] = out["http"]["api_create_per_s"]
            except CeilingError as exc:
                out["http_error"] = str(exc)
    except (CeilingError, OSError, ValueError, KeyError) as exc:
        out["error"] = str(exc)
    finally:
        if started_services and (WORK / "stop_services.sh").exists():
            try:
                _run(["./stop_services.sh"], timeout=60, what="stop_services.sh")
            except CeilingError as exc:
                out["stop_error"] = str(exc)
    return out
