"""The real stack for end-to-end tests: gunicorn web, the sandbox provider, one Celery worker per
queue and beat, all as subprocesses on test ports, against pytest-django's test database and
the test Redis database; plus a programmable merchant callback receiver in this process."""

import json
import os
import signal
import subprocess
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from django.conf import settings
from django.core.management import call_command

from core.redis import get_redis

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv" / "bin"
# Ports of the test stack; E2E_PORT_BASE moves them all (two suites on one machine).
_BASE = int(os.environ.get("E2E_PORT_BASE", "18000"))
WEB = f"127.0.0.1:{_BASE}"
SANDBOX = f"127.0.0.1:{_BASE + 1}"
RECEIVER_PORT = _BASE + 2
# localstripe (SPEC 11), on a port of this suite's own: the dev stack's is 8420.
LOCALSTRIPE = f"127.0.0.1:{_BASE + 3}"
LOGS = ROOT / ".run" / "log" / "e2e"
QUEUES = ("orders", "allocation", "gateway", "callbacks")


class Receiver:
    """A merchant's callback endpoint: records every request; answers per path from a script."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.scripts: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers.items()), "body": body.decode()}
                    )
                    script = receiver.scripts.get(self.path)
                    status = script.pop(0) if script else 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok": true}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", RECEIVER_PORT), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{RECEIVER_PORT}{path}"

    def script(self, path: str, statuses: list[int]) -> None:
        with self.lock:
            self.scripts[path] = list(statuses)

    def received(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def close(self) -> None:
        self.server.shutdown()


class Stack:
    """The stack's processes, each in its own session, logging to `logs`; workers named `<queue>-<tag>`."""

    def __init__(self, env: dict[str, str], *, logs: Path = LOGS, tag: str = "e2e") -> None:
        self.env = env
        self.logs = logs
        self.tag = tag
        self.procs: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def commands(self) -> dict[str, list[str]]:
        celery = [str(VENV / "celery"), "-A", "config"]
        cmds = {
            "web": [str(VENV / "gunicorn"), "-c", "config/gunicorn_conf.py", "config.wsgi:application"],
            "sandbox": [
                str(VENV / "gunicorn"),
                "-c",
                "gateway/sandbox_server/gunicorn_conf.py",
                "gateway.sandbox_server.app:application",
            ],
            "beat": [*celery, "beat", "-s", str(self.logs / "beat-schedule"), "--pidfile=", "-l", "warning"],
        }
        if "LOCALSTRIPE_BIND" in self.env:  # stacks that bind no port of their own for it run none
            cmds["localstripe"] = [str(VENV / "python"), "-m", "gateway.sandbox_server.localstripe"]
        for queue in QUEUES:
            cmds[f"worker-{queue}"] = [
                *celery, "worker", "-Q", queue, "-c", "2", "-n", f"{queue}-{self.tag}@%h",
                "--without-gossip", "--without-mingle", "-l", "warning",
            ]  # fmt: skip
        return cmds

    def process_env(self, name: str) -> dict[str, str]:
        return self.env

    def start(self, name: str) -> None:
        with open(self.logs / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                self.commands()[name], cwd=ROOT, env=self.process_env(name), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def start_all(self) -> None:
        for name in self.commands():
            self.start(name)
        wait_for(lambda: _ok(f"http://{WEB}/readyz") and _ok(f"http://{SANDBOX}/healthz"), 60, "stack ready")
        if "localstripe" in self.procs:
            wait_for(lambda: _answers(f"http://{self.env['LOCALSTRIPE_BIND']}/v1/charges"), 60, "localstripe")
        wait_for(self.workers_ready, 60, "workers consuming")

    def workers_ready(self) -> bool:
        from config.celery_app import app

        replies = app.control.ping(timeout=1.0) or []
        return len(replies) >= len(QUEUES)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
        return True
    except requests.RequestException:
        return False


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="package")
def stack(django_db_setup, django_db_blocker, tmp_path_factory):
    """Package scope: the workers stop when tests/e2e ends, so later unit tests see quiet queues."""
    db = settings.DATABASES["default"]
    env = {
        **os.environ,
        # As under `make up`: every process writes its metrics there and the web's /metrics sums
        # them. A fresh directory per session, so counters start from zero.
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("prometheus")),
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "TEST_REDIS_URL": settings.REDIS_URL,
        "WEB_BIND": WEB,
        "WEB_WORKERS": "2",
        "WEB_THREADS": "2",
        # A client's request must arrive within this (core/http_server.py; tests/e2e/test_web_server.py).
        "WEB_REQUEST_READ_SECONDS": "2",
        "SANDBOX_BIND": SANDBOX,
        "SANDBOX_WORKERS": "1",
        "SANDBOX_DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/test_sandbox_e2e_{_BASE}",
        "SANDBOX_WEBHOOK_DELAY": "0.3",
        "SANDBOX_SLOW_SECONDS": "3",
        "SANDBOX_SECRET": settings.SANDBOX_SECRET,
        "SANDBOX_URL": f"http://{SANDBOX}",
        "PUBLIC_BASE_URL": f"http://{WEB}",
        "LOCALSTRIPE_BIND": LOCALSTRIPE,
        "LOCALSTRIPE_URL": f"http://{LOCALSTRIPE}",
        "GATEWAY_READ_TIMEOUT": "1.5",
        "POLL_FIRST_SECONDS": "2",
        "POLL_INTERVAL_SECONDS": "1",
        # A tripped breaker (tests/e2e/test_breaker_burst.py) cools down within a test's patience.
        "CIRCUIT_COOLDOWN_SECONDS": "3",
        "LOG_LEVEL": "INFO",
    }
    get_redis().flushdb()
    # The sandbox keeps its own ledger; start each session with an empty one.
    subprocess.run(
        [str(VENV / "python"), "-c", _DROP_SANDBOX_DB, env["SANDBOX_DATABASE_URL"]], check=True, cwd=ROOT
    )
    stack = Stack(env)
    try:
        stack.start_all()
        yield stack
    finally:
        stack.stop_all()
        # The stack can write after the last test's flush (a provider's late webhook, a callback
        # attempt): with its processes gone, empty the tables once more, so that the next tests
        # on this worker's database do not find rows they did not make.
        with django_db_blocker.unblock():
            call_command("flush", interactive=False, verbosity=0)


_DROP_SANDBOX_DB = """
import sys, psycopg2
dsn = sys.argv[1]
admin = dsn.rsplit("/", 1)[0] + "/postgres"
conn = psycopg2.connect(admin); conn.autocommit = True
conn.cursor().execute(f"DROP DATABASE IF EXISTS {dsn.rsplit('/', 1)[1]} WITH (FORCE)")
"""


@pytest.fixture(scope="session")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def live(stack, transactional_db, receiver):
    """A running stack with the sandbox channels seeded in the (flushed) test database."""
    call_command("seed_sandbox", stdout=open(os.devnull, "w"))
    yield stack
    _settle(timeout=5)


def _settle(timeout: float) -> None:
    """Give the stack a few seconds to finish what the test set going (an order it did not wait
    for) before the test database is flushed: a worker's transaction and the flush's TRUNCATE of
    every table can deadlock (seen once in CI: an order still being charged). Bounded: a test that
    leaves an order polling for ever costs this much, and the flush then takes its chances."""
    from django.utils import timezone

    from callbacks.models import CallbackDelivery
    from core.broker import queue_depths
    from orders.models import Order, Refund

    def at_rest() -> bool:
        soon = timezone.now() + timedelta(seconds=3)
        return not (
            any(queue_depths().values())
            or Order.objects.filter(status__in=("pending", "assigned", "processing")).exists()
            or Refund.objects.filter(status__in=("pending", "processing")).exists()
            or CallbackDelivery.objects.filter(status="pending", next_attempt_at__lte=soon).exists()
        )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not at_rest():
        time.sleep(0.1)


class Client:
    def __init__(self, api_key: str) -> None:
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_key}"

    def create(self, amount: int, currency: str = "USD", **extra) -> dict:
        reference = extra.pop("reference", f"e2e-{time.monotonic_ns()}")
        response = self.session.post(
            f"http://{WEB}/api/v1/orders",
            json={"amount": amount, "currency": currency, "reference": reference, **extra},
            headers={"Idempotency-Key": reference},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        return response.json()

    def get(self, order_id: str) -> dict:
        return self.session.get(f"http://{WEB}/api/v1/orders/{order_id}", timeout=10).json()

    def events(self, order_id: str) -> list[dict]:
        return self.session.get(f"http://{WEB}/api/v1/orders/{order_id}/events", timeout=10).json()

    def wait_status(self, order_id: str, status: str, timeout: float = 30) -> dict:
        return wait_for(
            lambda: (o := self.get(order_id))["status"] == status and o, timeout, f"{order_id} {status}"
        )


def localstripe_get(path: str) -> dict:
    """An object as localstripe holds it (any `sk_` key reads everything there)."""
    response = requests.get(f"http://{LOCALSTRIPE}{path}", auth=("sk_test_e2e", ""), timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def sandbox_charges(order_id: str) -> list[dict]:
    return requests.get(f"http://{SANDBOX}/sandbox/charges", params={"order": order_id}, timeout=10).json()


def path_of(events: list[dict]) -> list[tuple]:
    return [(e["from"], e["to"], e["channel"]) for e in events]


def callback_bodies(receiver: Receiver, path: str) -> list[dict]:
    return [json.loads(r["body"]) for r in receiver.received(path)]
