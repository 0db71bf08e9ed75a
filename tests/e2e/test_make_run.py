"""`make run` (SPEC 2): the whole stack in the foreground, and Ctrl-C stops all of it, the
PostgreSQL and Redis servers it started included.

Run in a copy of this checkout (links to everything but `.run/`, so its servers and data are its
own) with every port moved off the defaults, so neither a developer's stack nor the test servers
are touched. About half a minute: a fresh cluster, migrations, seeds, then the stack.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import closing
from pathlib import Path

import psycopg2
import pytest
import redis
import requests

ROOT = Path(__file__).resolve().parents[2]
_BASE = int(os.environ.get("RUN_PORT_BASE", "18600"))
PORTS = {
    "web": _BASE,
    "sandbox": _BASE + 1,
    "localstripe": _BASE + 2,
    "postgres": _BASE + 3,
    "redis": _BASE + 4,
}


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def checkout(tmp_path) -> Path:
    copy = tmp_path / "checkout"
    copy.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".run", ".git"):
            (copy / entry.name).symlink_to(entry)
    return copy


def test_ctrl_c_on_make_run_stops_all_of_it(checkout):
    # given nothing of this stack is running
    busy = [name for name, port in PORTS.items() if _listening(port)]
    assert not busy, f"ports of this test already in use: {busy}"
    web, pg, redis_port = PORTS["web"], PORTS["postgres"], PORTS["redis"]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.local",
        # the servers' ports alone: every process's database and Redis follow them (README)
        "PG_PORT": str(pg),
        "REDIS_PORT": str(redis_port),
        "WEB_BIND": f"127.0.0.1:{web}",
        "SANDBOX_BIND": f"127.0.0.1:{PORTS['sandbox']}",
        "SANDBOX_URL": f"http://127.0.0.1:{PORTS['sandbox']}",
        "LOCALSTRIPE_BIND": f"127.0.0.1:{PORTS['localstripe']}",
        "LOCALSTRIPE_URL": f"http://127.0.0.1:{PORTS['localstripe']}",
        "WEB_WORKERS": "1",
    }
    for name in (
        "DATABASE_URL",
        "SANDBOX_DATABASE_URL",
        "REDIS_URL",
        "CELERY_BROKER_URL",
        "CACHE_URL",
        "TEST_REDIS_URL",
        "PROMETHEUS_MULTIPROC_DIR",
        "PUBLIC_BASE_URL",  # follows WEB_BIND
    ):
        env.pop(name, None)
    log = (checkout / "run.log").open("wb")
    # when `make run` has brought the stack up (its own process group: the terminal's, for Ctrl-C)
    run = subprocess.Popen(
        ["make", "run"], cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{web}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        assert run.poll() is None, (checkout / "run.log").read_text()[-3000:]
        up = {name for name, port in PORTS.items() if _listening(port)}
        assert up == set(PORTS), f"not up: {set(PORTS) - up}\n" + (checkout / "run.log").read_text()[-3000:]
        # and it keeps its data in the servers it started, not in those on the default ports
        # (before: PG_PORT/REDIS_PORT moved only the servers; the processes used 55432 and 56379)
        with (
            closing(psycopg2.connect(f"postgres://payments@127.0.0.1:{pg}/payments")) as db,
            db.cursor() as cursor,
        ):
            cursor.execute("SELECT id::text FROM orders_merchant WHERE name = 'demo'")
            seeded = {row[0] for row in cursor.fetchall()}  # the demo merchant make run seeds
        # whose credentials are kept in this copy's .run, beside its data (before: in the
        # original checkout's, through the settings' symlink-resolved BASE_DIR, so `make test`
        # replaced a developer's demo credentials with a merchant of a deleted test database)
        demo = checkout / ".run" / "demo-merchant.json"
        assert demo.exists() and json.loads(demo.read_text())["id"] in seeded
        with (
            closing(psycopg2.connect(f"postgres://payments@127.0.0.1:{pg}/sandbox")) as db,
            db.cursor() as cursor,
        ):
            cursor.execute("SELECT count(*) FROM sandbox_charges")  # the sandbox's schema is there
        # the workers' queues, declared once each worker is up
        broker, bound = redis.Redis(port=redis_port), []
        for _ in range(120):
            if bound := broker.keys("_kombu.binding.*"):
                break
            time.sleep(0.5)
        assert bound, (checkout / "run.log").read_text()[-3000:]
        # and Ctrl-C reaches its process group
        os.killpg(run.pid, signal.SIGINT)
        run.wait(timeout=90)
        # then nothing of it is left listening: the app processes, PostgreSQL and Redis
        left = [name for name, port in PORTS.items() if _listening(port)]
        assert left == [], (
            f"still listening after Ctrl-C: {left}\n" + (checkout / "run.log").read_text()[-2000:]
        )
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        # a SIGKILLed make leaves its stack's processes running (they run in groups of their own):
        # every process working in this copy goes too, so a failed run frees its ports
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "cwd").resolve() == checkout.resolve():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, RuntimeError):
                pass
        # whatever the outcome, this copy's servers go, and its cluster with them (as root it lives
        # under postgres's home, `.run/pg` a link to it: the test's directory is closed to postgres)
        subprocess.run(["scripts/services.sh", "stop"], cwd=checkout, env=env, check=False, timeout=60)
        log.close()
        cluster = checkout / ".run" / "pg"
        if cluster.is_symlink():
            shutil.rmtree(cluster.resolve().parent, ignore_errors=True)
