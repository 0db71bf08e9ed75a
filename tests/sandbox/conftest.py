"""Sandbox test fixtures: the sandbox under gunicorn on a database of its own, and a webhook receiver."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
GUNICORN_CONF = REPO_ROOT / "gateway" / "sandbox_server" / "gunicorn_conf.py"
ADMIN_URL = os.environ.get("SANDBOX_TEST_ADMIN_URL", "postgres://payments@127.0.0.1:55432/postgres")
WEBHOOK_DELAY = 0.2
SLOW_SECONDS = 2.0
MASTER_SECRET = "unit-test-master-secret"
PREFERRED_PORT = 18101


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last value {value!r})")
        time.sleep(interval)


def _xdist_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


def free_port(preferred: int | None = None) -> int:
    """`preferred` when it is free, otherwise any free loopback port."""
    candidates = [preferred] if preferred else []
    for port in [*candidates, 0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


# --- webhook receiver -----------------------------------------------------------------------------------


@dataclass
class Received:
    """One request the receiver got, with the status it answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    answered: int


@dataclass
class Receiver:
    """A local HTTP endpoint that records every POST; paths can be told to fail their first N requests."""

    server: ThreadingHTTPServer
    records: list[Received] = field(default_factory=list)
    fail_first: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{name}"

    def received(self, name: str) -> list[Received]:
        path = f"/hooks/{name}"
        with self.lock:
            return [r for r in self.records if r.path == path]

    def wait_for(self, name: str, count: int, timeout: float = 5.0) -> list[Received]:
        wait_until(lambda: len(self.received(name)) >= count, timeout)
        return self.received(name)

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            remaining = self.fail_first.get(path, 0)
            if remaining:
                self.fail_first[path] = remaining - 1
            status = 500 if remaining else 200
            self.records.append(Received(path, headers, body, time.time(), status))
        return status


def make_receiver_server(receiver_ref: list[Receiver], *, activate: bool = True) -> ThreadingHTTPServer:
    """A threaded HTTP/1.1 server (keep-alive, like a real receiver) reporting to receiver_ref[0]."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            status = receiver_ref[0].handle(self.path, dict(self.headers.items()), body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output quiet

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.daemon_threads = True
    server.server_bind()
    if activate:
        server.server_activate()
    return server


@contextlib.contextmanager
def running_receiver(*, activate: bool = True) -> Iterator[Receiver]:
    """A receiver bound to a port; serving right away, or (activate=False) refusing until started."""
    ref: list[Receiver] = []
    server = make_receiver_server(ref, activate=activate)
    receiver = Receiver(server)
    ref.append(receiver)
    thread: threading.Thread | None = None

    def start() -> None:
        nonlocal thread
        if not activate:
            server.server_activate()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

    receiver.start = start  # type: ignore[attr-defined]
    if activate:
        start()
    try:
        yield receiver
    finally:
        if thread is not None:
            server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with running_receiver() as rec:
        yield rec


# --- sandbox server -------------------------------------------------------------------------------------


@dataclass
class Sandbox:
    """A running sandbox server."""

    base_url: str
    database_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    session: requests.Session

    def url(self, path: str) -> str:
        return self.base_url + path

    def ledger(self, order_id: str) -> list[dict[str, Any]]:
        response = self.session.get(self.url("/sandbox/charges"), params={"order": order_id}, timeout=5)
        assert response.status_code == 200, response.text
        return response.json()

    def query(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows of the sandbox's own database: its record of what it charged and what it sent."""
        conn = psycopg2.connect(self.database_url)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(sql, params)
                names = [column.name for column in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def webhooks_to(self, url: str) -> list[dict[str, Any]]:
        """Every webhook the sandbox queued for `url`, oldest first (queued with its charge, in the
        same statement: once the charge request is answered, this list is complete)."""
        return self.query(
            "SELECT w.*, c.final_at FROM sandbox_webhooks w JOIN sandbox_charges c ON c.id = w.charge_id"
            " WHERE w.url = %(url)s ORDER BY w.due_at, w.msg_id",
            {"url": url},
        )

    def settled_webhooks(self, url: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The webhooks for `url` once none is pending any more: after this the sandbox sends nothing
        more there, so what a receiver got by now is all it will get (no "quiet for a while" guess)."""
        return wait_until(
            lambda: (
                (rows := self.webhooks_to(url)) and all(row["status"] != "pending" for row in rows) and rows
            ),
            timeout,
        )


def _admin_execute(sql: str) -> None:
    conn = psycopg2.connect(ADMIN_URL)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def database_url_for(name: str) -> str:
    """URL of a database beside the admin one (same server and user)."""
    params = psycopg2.extensions.parse_dsn(ADMIN_URL)
    params["dbname"] = name
    return psycopg2.extensions.make_dsn(**params)


def reset_database(name: str) -> None:
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin_execute(f'CREATE DATABASE "{name}"')


def drop_database(name: str) -> None:
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def run_sandbox(database_url: str, log_path: Path, port: int) -> Iterator[Sandbox]:
    """Start the sandbox exactly as production does (gunicorn + the package's config) and stop it after."""
    env = {
        **os.environ,
        "SANDBOX_BIND": f"127.0.0.1:{port}",
        "SANDBOX_DATABASE_URL": database_url,
        "SANDBOX_WEBHOOK_DELAY": str(WEBHOOK_DELAY),
        "SANDBOX_SLOW_SECONDS": str(SLOW_SECONDS),
        "SANDBOX_SECRET": MASTER_SECRET,
        "SANDBOX_WORKERS": "2",
        "SANDBOX_THREADS": "16",
    }
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(GUNICORN_CONF),
            "gateway.sandbox_server.app:application",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    session = requests.Session()
    session.trust_env = False
    sandbox = Sandbox(f"http://127.0.0.1:{port}", database_url, process, log_path, session)
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                pytest.fail(f"sandbox exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if session.get(sandbox.url("/healthz"), timeout=1).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or too busy starting to answer within the probe's timeout
            if time.monotonic() > deadline:
                pytest.fail(f"sandbox did not become healthy:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield sandbox
    finally:
        session.close()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()


@pytest.fixture(scope="module")
def sandbox_db() -> Iterator[str]:
    # One database per xdist worker, so parallel runs do not drop each other's.
    suffix = f"_{os.environ['PYTEST_XDIST_WORKER']}" if "PYTEST_XDIST_WORKER" in os.environ else ""
    name = f"test_sandbox_unit{suffix}"
    reset_database(name)
    yield name
    drop_database(name)


@pytest.fixture(scope="module")
def sandbox(sandbox_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    log_path = tmp_path_factory.mktemp("sandbox") / "gunicorn.log"
    port = free_port(PREFERRED_PORT + _xdist_index())
    with run_sandbox(database_url_for(sandbox_db), log_path, port) as server:
        yield server
