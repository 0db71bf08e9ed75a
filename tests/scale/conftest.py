"""Stacks beyond one machine (SPEC 12), each on brokers of its own (tests/scale/servers.py):

- `sentinel_stack`: the whole pipeline on a Redis Sentinel group, with two beats running;
- `rabbit_stack`: the whole pipeline on RabbitMQ (quorum queues), every queue served by two
  workers as two "hosts" (distinct node names `<queue>@host-a`, `<queue>@host-b`).

Web, sandbox, workers and beat are the real processes (tests/e2e's Stack); workers load the app
through tests/faults/probe.py, which writes a start and an end marker for every task, so tests
count sweeps and see what a killed worker was running. Loads and the per-order invariants (lost,
double charges, callbacks) are the fault suite's (tests/faults/harness.py). Each stack has its
own database on the test PostgreSQL (cloned from one migrated template) and a plain Redis of its
own for rate limits and circuits (CACHE_URL's role).
"""

import json
import os
import shutil
import subprocess

import psycopg2
import pytest
from celery import Celery
from django.conf import settings

from config.broker import broker_settings
from tests.e2e.conftest import QUEUES, ROOT, VENV, Stack, _ok, wait_for
from tests.faults import harness
from tests.faults.servers import RedisServer
from tests.scale.servers import RabbitNode, SentinelGroup

SCALE = ROOT / ".run" / "scale"
# Ports: SCALE_PORT_BASE moves them all (two suites on one machine). Below Linux's ephemeral
# range (32768-60999): these servers start late in the run, when thousands of client sockets
# (established or in TIME_WAIT) hold ephemeral ports, and a listener cannot bind a port one of
# them holds, SO_REUSEADDR or not; CI saw Redis and gunicorn fail to bind 388xx that way.
BASE = int(os.environ.get("SCALE_PORT_BASE", "29800"))
TEMPLATE_DB = f"scale_template_{BASE}"


def _admin_dsn(dbname: str) -> str:
    main = settings.DATABASES["default"]
    return f"postgres://{main['USER']}@{main['HOST']}:{main['PORT']}/{dbname}"


def _admin_sql(*statements: str) -> None:
    conn = psycopg2.connect(_admin_dsn("postgres"))
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        conn.close()


def celery_for(url: str) -> Celery:
    """A client of the stack's broker, configured as the stack's processes are."""
    conf = broker_settings(
        url, sentinel_master=SentinelGroup.MASTER_NAME, visibility_timeout=20, queues=tuple(QUEUES)
    )
    app = Celery("scale", broker=url, set_as_current=False)
    app.conf.update({key.removeprefix("CELERY_").lower(): value for key, value in conf.items()})
    return app


class ScaleStack(Stack):
    """Web, sandbox, `beats` beats and one worker per queue per host, on ports `base`..`base+2`."""

    def __init__(self, name: str, *, base: int, broker_url: str, cache_url: str, hosts, beats: int) -> None:
        self.name = name
        self.web = f"127.0.0.1:{base}"
        self.sandbox = f"127.0.0.1:{base + 1}"
        self.receiver_port = base + 2
        self.hosts = tuple(hosts)
        self.beats = beats
        self.dir = SCALE / name
        self.task_dir = self.dir / "tasks"
        self.point_dir = self.dir / "points"
        self.db = f"scale_{name}_{BASE}"
        self.sandbox_db = f"scale_{name}_sandbox_{BASE}"
        self.broker_url = broker_url
        self.celery = celery_for(broker_url)
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("FAULT_POINTS", "PROMETHEUS_MULTIPROC_DIR", "CELERY_BROKER_URL", "CACHE_URL")
        }
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "config.settings.test",
                "DATABASE_URL": _admin_dsn(self.db),
                "TEST_REDIS_URL": cache_url,
                "TEST_CACHE_URL": cache_url,
                "TEST_CELERY_BROKER_URL": broker_url,
                "CELERY_VISIBILITY_TIMEOUT": "20",
                "WEB_BIND": self.web,
                "WEB_WORKERS": "2",
                "SANDBOX_BIND": self.sandbox,
                "SANDBOX_WORKERS": "1",
                "SANDBOX_DATABASE_URL": _admin_dsn(self.sandbox_db),
                "SANDBOX_WEBHOOK_DELAY": "0.3",
                "SANDBOX_SLOW_SECONDS": "3",
                "SANDBOX_SECRET": settings.SANDBOX_SECRET,
                "SANDBOX_URL": f"http://{self.sandbox}",
                "PUBLIC_BASE_URL": f"http://{self.web}",
                "GATEWAY_READ_TIMEOUT": "1.5",
                "CIRCUIT_COOLDOWN_SECONDS": "3",
                "POLL_FIRST_SECONDS": "2",
                "POLL_INTERVAL_SECONDS": "1",
                "CALLBACK_RETRY_SCHEDULE": "0.5,1,1,2,3,5,8,13",
                "CALLBACK_CONNECT_TIMEOUT": "1",
                "CALLBACK_TOTAL_TIMEOUT": "3",
                "BEAT_INTERVAL_SECONDS": "1",
                "FAULT_TASK_DIR": str(self.task_dir),
                "FAULT_DIR": str(self.point_dir),
                "LOG_LEVEL": "INFO",
            }
        )
        super().__init__(env, logs=self.dir / "log", tag=name)
        self.receiver = None
        self.api_key = self.webhook_secret = ""

    # --- processes ---

    def commands(self) -> dict[str, list[str]]:
        base = super().commands()
        cmds = {"web": base["web"], "sandbox": base["sandbox"]}
        for number in range(1, self.beats + 1):
            cmds[f"beat-{number}"] = [
                str(VENV / "celery"), "-A", "config", "beat", "-s", str(self.dir / f"beat-{number}-schedule"),
                "--pidfile=", "-l", "warning",
            ]  # fmt: skip
        for host in self.hosts:
            for queue in QUEUES:
                cmds[f"worker-{queue}-{host}"] = [
                    str(VENV / "celery"), "-A", "tests.faults.probe", "worker", "-Q", queue, "-c", "1",
                    "-n", f"{queue}@host-{host}", "--without-gossip", "--without-mingle", "-l", "warning",
                ]  # fmt: skip
        return cmds

    def process_env(self, name: str) -> dict[str, str]:
        points = self.env.get(f"POINTS_{name}", "")
        return {**self.env, "FAULT_POINTS": points}

    def arm(self, name: str, point: str) -> None:
        """Give process `name` fault point `point` (from its next start), armed."""
        self.env[f"POINTS_{name}"] = point
        (self.point_dir / f"{point}.fired").unlink(missing_ok=True)

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def kill(self, name: str) -> None:
        """kill -9 the process group: a worker's main process with its pool, or a beat."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)

    def workers(self) -> set[str]:
        try:
            replies = self.celery.control.ping(timeout=0.5) or []
        except Exception:  # the broker is failing over: nobody is known to be consuming yet
            return set()
        return {name for reply in replies for name in reply}

    def ensure_running(self) -> None:
        for name in self.commands():
            if not self.alive(name):
                self.procs.pop(name, None)
                self.start(name)
        try:
            wait_for(
                lambda: _ok(f"http://{self.web}/readyz") and _ok(f"http://{self.sandbox}/healthz"), 90, "web"
            )
        except AssertionError as timeout:
            tails = "\n".join(f"--- {name}.log:\n{self.log(name)[-1500:]}" for name in ("web", "sandbox"))
            raise AssertionError(f"{timeout}\n{tails}") from None
        expected = len(self.hosts) * len(QUEUES)
        wait_for(lambda: len(self.workers()) >= expected, 90, f"{self.name} workers consuming")

    # --- evidence ---

    def sql(self, query: str, params=()) -> list[tuple]:
        conn = psycopg2.connect(_admin_dsn(self.db))
        try:
            with conn, conn.cursor() as cursor:
                cursor.execute(query, params)
                return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()

    def task_starts(self, task: str) -> list[float]:
        """When each run of `task` started, from the workers' own markers."""
        starts = []
        for path in self.task_dir.glob("*.log"):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # cut short by kill -9
                    continue
                if record["ev"] == "start" and record["task"] == task:
                    starts.append(record["t"])
        return sorted(starts)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def load(self, scenario: str) -> harness.Load:
        return harness.Load(
            api_key=self.api_key,
            scenario=scenario,
            receiver=self.receiver,
            web=self.web,
            sandbox=self.sandbox,
        )

    # --- life ---

    def setup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        for path in (self.task_dir, self.point_dir, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        _admin_sql(
            f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)',
            f'DROP DATABASE IF EXISTS "{self.sandbox_db}" WITH (FORCE)',
            f'CREATE DATABASE "{self.db}" TEMPLATE "{TEMPLATE_DB}"',
        )
        # seed_sandbox and create_merchant in one interpreter (one Django start instead of two)
        out = subprocess.run(
            [str(VENV / "python"), "-c", _SEED, self.name],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        creds = json.loads(out.strip().splitlines()[-1])
        self.api_key, self.webhook_secret = creds["api_key"], creds["webhook_secret"]
        self.receiver = harness.Receiver(self.receiver_port)
        self.ensure_running()

    def teardown(self) -> None:
        """kill -9 all of it: nothing of a test stack is worth a graceful stop."""
        for name in list(self.procs):
            if self.alive(name):
                self.kill(name)
            self.procs.pop(name, None)
        if self.receiver is not None:
            self.receiver.stop()


_SEED = """
import io, sys, django
django.setup()
from django.core.management import call_command
call_command("seed_sandbox", stdout=io.StringIO())
call_command("create_merchant", sys.argv[1])
"""


@pytest.fixture(scope="session")
def scale_template():
    """One migrated database; each stack's database is a copy (CREATE DATABASE ... TEMPLATE)."""
    _admin_sql(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)', f'CREATE DATABASE "{TEMPLATE_DB}"')
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": _admin_dsn(TEMPLATE_DB),
    }
    subprocess.run(
        [str(VENV / "python"), "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    yield TEMPLATE_DB


@pytest.fixture(scope="session")
def cache_redis():
    server = RedisServer(SCALE / "cache", BASE + 30)
    server.start()
    server.client().flushall()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sentinel_group():
    group = SentinelGroup(
        SCALE / "sentinel-group",
        master_port=BASE + 20,
        replica_port=BASE + 21,
        sentinel_ports=(BASE + 25, BASE + 26, BASE + 27),
    )
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="module")
def sentinel_stack(scale_template, cache_redis, sentinel_group, rabbit_node):
    # rabbit_node: launched here already, so its boot overlaps the Sentinel scenarios
    stack = ScaleStack(
        "sentinel",
        base=BASE,
        broker_url=sentinel_group.url,
        cache_url=f"redis://127.0.0.1:{cache_redis.port}/0",
        hosts=("a",),
        beats=2,
    )
    stack.group = sentinel_group
    try:
        stack.setup()
        yield stack
    finally:
        stack.teardown()


@pytest.fixture(scope="session")
def rabbit_node():
    """Launched, not waited for: rabbit_stack waits until it is ready."""
    if not RabbitNode.available():
        pytest.fail(
            "rabbitmq-server is not installed (scripts/services.sh ensure-test, run by make test, installs it)"
        )
    node = RabbitNode(SCALE / "rabbitmq-node", port=BASE + 35, dist_port=BASE + 36, epmd_port=BASE + 37)
    try:
        node.launch()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def rabbit_stack(scale_template, cache_redis, rabbit_node):
    stack = ScaleStack(
        "rabbit",
        base=BASE + 10,
        broker_url=rabbit_node.url,
        cache_url=f"redis://127.0.0.1:{cache_redis.port}/1",
        hosts=("a", "b"),
        beats=1,
    )
    stack.node = rabbit_node
    rabbit_node.ready()
    try:
        stack.setup()
        yield stack
    finally:
        stack.teardown()


@pytest.fixture(autouse=True)
def _report_fault_lines(request):
    """Put the count lines this test's scenarios printed on its report (tests/conftest.py's summary)."""
    before = len(harness.FAULT_LINES)
    yield
    for line in harness.FAULT_LINES[before:]:
        request.node.user_properties.append(("fault_line", line))
