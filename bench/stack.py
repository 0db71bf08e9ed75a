"""The stack under test: where it listens, restarting it with the bench's environment, credentials."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run"
CREDENTIALS = RUN / "bench-merchant.json"
PYTHON = ROOT / ".venv" / "bin" / "python"
# What the bench needs from the stack: a provider that answers without delay (SPEC 8), and the
# recovery sweep on its production timings (config/settings/base.py) instead of the 3-5 s that
# `make up` uses so a demo's stuck rows settle quickly. A 2000-order burst keeps orders queued
# longer than 5 s on any 2-core machine; with the demo timings the sweep re-announces queued work
# (measured: 1,196 polls and 516 repeated charges for 1,000 orders) and the bench would measure
# the sweep fighting the backlog instead of the pipeline.
BENCH_ENV = {
    "SANDBOX_WEBHOOK_DELAY": "0",
    "PENDING_TIMEOUT_SECONDS": "60",
    "ASSIGNED_TIMEOUT_SECONDS": "60",
    "POLL_FIRST_SECONDS": "60",
    "CALLBACK_GRACE_SECONDS": "60",
}


@dataclass(frozen=True)
class Endpoints:
    api: str
    sandbox: str
    database: str
    redis: str
    sandbox_database_name: str

    @classmethod
    def from_env(cls) -> "Endpoints":
        # The same variables and defaults as config/settings/base.py, read without importing Django.
        redis = os.environ.get("REDIS_URL") or "redis://127.0.0.1:56379/0"
        return cls(
            api=os.environ.get("API_URL") or f"http://{os.environ.get('WEB_BIND') or '127.0.0.1:8000'}",
            sandbox=os.environ.get("SANDBOX_URL") or "http://127.0.0.1:8001",
            database=os.environ.get("DATABASE_URL") or "postgres://payments@127.0.0.1:55432/payments",
            redis=os.environ.get("CELERY_BROKER_URL") or redis,
            # gateway/sandbox_server/store.py: the provider keeps its ledger in a database of its own.
            sandbox_database_name=(
                os.environ.get("SANDBOX_DATABASE_URL")
                or f"postgres://payments@127.0.0.1:{os.environ.get('PG_PORT', '55432')}/sandbox"
            ).rsplit("/", 1)[-1],
        )


def _stack(command: str, env: dict[str, str]) -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "stack.sh"), command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise RuntimeError(f"scripts/stack.sh {command} failed ({result.returncode})")


def stack_restart(*, extra_env: dict[str, str]) -> None:
    """`scripts/stack.sh down` then `up` with `extra_env` on top of ours (Procfile commands inherit it).

    Only the app processes restart; PostgreSQL and Redis are left alone.
    """
    env = {**os.environ, **extra_env}
    _stack("down", env)
    _stack("up", env)


def stack_stop() -> None:
    """`scripts/stack.sh down`: the app processes only; PostgreSQL and Redis are left alone."""
    _stack("down", dict(os.environ))


def process_env(name: str) -> dict[str, str] | None:
    """The environment a stack process (a Procfile name) was started with, or None if it is not up."""
    try:
        pid = int((RUN / "pids" / f"{name}.pid").read_text().strip())
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, ValueError):
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def stack_env_differences(wanted: dict[str, str]) -> dict[str, str | None]:
    """Variables of `wanted` the running stack was not started with (name -> what it has)."""
    differences: dict[str, str | None] = {}
    for name in ("sandbox", "worker-orders"):
        env = process_env(name)
        if env is None:
            return dict.fromkeys(wanted)
        differences |= {key: env.get(key) for key, value in wanted.items() if env.get(key) != value}
    return differences


def _create_merchant(name: str, callback_url: str) -> dict:
    args = [str(PYTHON), "manage.py", "create_merchant", name]
    if callback_url:
        args += ["--callback-url", callback_url]
    output = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def merchants_ensure(*, sandbox_url: str, exists) -> dict:
    """The bench's two merchants, created once with manage.py and kept in .run/bench-merchant.json.

    `driver` places the orders (its callbacks go to the sandbox's merchant receiver); `stored`
    owns the pre-seeded completed orders of the growth run. `exists(id)` checks the database.
    """
    creds = json.loads(CREDENTIALS.read_text()) if CREDENTIALS.exists() else {}
    changed = False
    for role, callback_url in (("driver", f"{sandbox_url}/sandbox/callbacks"), ("stored", "")):
        if role not in creds or not exists(creds[role]["id"]):
            creds[role] = _create_merchant(f"bench-{role}", callback_url)
            changed = True
    if changed:
        CREDENTIALS.parent.mkdir(parents=True, exist_ok=True)
        CREDENTIALS.write_text(json.dumps(creds, indent=2))
        CREDENTIALS.chmod(0o600)
    return creds
