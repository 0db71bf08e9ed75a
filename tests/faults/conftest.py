"""The fault stack: web, sandbox, one worker per queue and beat (as in tests/e2e), on ports 2800x,
against a PostgreSQL and a Redis of its own (tests/faults/servers.py), so that restarting and
wiping them disturbs nothing else. Every process carries its fault points (core/faults.py);
a test arms one by removing its marker. Workers load the app through tests/faults/probe.py, which
writes a start and an end marker for every task they run. Recovery timings are the test
settings' (seconds)."""

import json
import os
import shutil
import subprocess
import time

import psycopg2
import pytest
from django.conf import settings

from core.broker import redis_queue_keys
from tests.e2e.conftest import QUEUES, ROOT, VENV
from tests.faults import harness
from tests.faults.servers import PgServer, RedisServer

# Below the ephemeral port range, as the scale suite's (tests/scale/conftest.py): the fault
# scenarios restart these servers mid-run, when a client socket may hold any ephemeral port.
PG_PORT = int(os.environ.get("FAULT_PG_PORT", "25442"))
REDIS_PORT = int(os.environ.get("FAULT_REDIS_PORT", "26389"))
DB_NAME = "payments_faults"
SANDBOX_DB = "test_sandbox_faults"


class FaultEnv:
    def __init__(
        self, *, stack, pg, redis_server, receiver, api_key, webhook_secret, dsn, sandbox_dsn
    ) -> None:
        self.stack = stack
        self.pg = pg
        self.redis = redis_server
        self.receiver = receiver
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.dsn = dsn
        self.sandbox_dsn = sandbox_dsn

    def load(self, scenario: str) -> harness.Load:
        return harness.Load(api_key=self.api_key, scenario=scenario, receiver=self.receiver)

    def sql(self, query: str, params=(), *, dsn: str | None = None) -> list[tuple]:
        conn = psycopg2.connect(dsn or self.dsn)
        try:
            with conn, conn.cursor() as cursor:
                cursor.execute(query, params)
                return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()

    def busy(self) -> list[str]:
        """What is still at work from an earlier scenario: provider webhooks the sandbox has yet to
        send, messages waiting in a service queue, messages a worker holds (unacked)."""
        pending = self.sql(
            "SELECT count(*) FROM sandbox_webhooks WHERE status = 'pending'", dsn=self.sandbox_dsn
        )[0][0]
        client = self.redis.client()
        waiting = {queue: sum(map(client.llen, redis_queue_keys(queue))) for queue in QUEUES}
        busy = [f"{queue}: {n} waiting" for queue, n in waiting.items() if n]
        if pending:
            busy.append(f"sandbox: {pending} webhooks to send")
        if unacked := client.hlen("unacked"):
            busy.append(f"{unacked} unacked")
        return busy

    def settle(self, timeout: float = 60) -> None:
        """Wait until the previous scenario's work is done (twice in a row, 0.3 s apart), so that
        none of it can be the fault the next scenario arms for: a late webhook's confirm, or the
        message a killed worker held, which the broker gives back only after the visibility timeout
        (20 s here) and its next restore round (seen 40 s after delivery). Bounded: a scenario
        that starts on a stack still busy says so and goes on (its own checks decide)."""
        deadline = time.monotonic() + timeout
        quiet_once = False
        while time.monotonic() < deadline:
            busy = self.busy()
            if not busy and quiet_once:
                return
            quiet_once = not busy
            time.sleep(0.3)
        print(f"stack still busy after {timeout}s: {busy}")


def _manage(env: dict, *args: str) -> str:
    return subprocess.run(
        [str(VENV / "python"), "manage.py", *args],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture(scope="session")
def fault_env():
    pg = PgServer(harness.FAULTS, PG_PORT)
    redis_server = RedisServer(harness.FAULTS, REDIS_PORT)
    harness.LOGS.mkdir(parents=True, exist_ok=True)
    for old in harness.LOGS.glob("*.log"):
        if old.name != "postgres.log":  # the cluster, if already running, writes there
            old.unlink()
    shutil.rmtree(harness.TASK_DIR, ignore_errors=True)  # the task markers of an earlier run
    harness.TASK_DIR.mkdir(parents=True)
    pg.ensure()
    redis_server.start()
    redis_server.client().flushall()
    pg.recreate_database(DB_NAME)
    main = settings.DATABASES["default"]
    sandbox_dsn = f"postgres://{main['USER']}@{main['HOST']}:{main['PORT']}/{SANDBOX_DB}"
    admin = psycopg2.connect(sandbox_dsn.rsplit("/", 1)[0] + "/postgres")
    admin.autocommit = True
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {SANDBOX_DB} WITH (FORCE)")
    admin.close()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("FAULT_POINTS", "PROMETHEUS_MULTIPROC_DIR")
    }
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": pg.dsn(DB_NAME),
            "TEST_REDIS_URL": redis_server.url,
            # An unacked message of a dead worker comes back after this long (production: 300 s).
            "CELERY_VISIBILITY_TIMEOUT": "20",
            "WEB_BIND": harness.WEB,
            "WEB_WORKERS": "2",
            "SANDBOX_BIND": harness.SANDBOX,
            "SANDBOX_WORKERS": "1",
            "SANDBOX_DATABASE_URL": sandbox_dsn,
            "SANDBOX_WEBHOOK_DELAY": "0.3",
            "SANDBOX_SLOW_SECONDS": "3",
            "SANDBOX_SECRET": settings.SANDBOX_SECRET,
            "SANDBOX_URL": f"http://{harness.SANDBOX}",
            "PUBLIC_BASE_URL": f"http://{harness.WEB}",
            "GATEWAY_READ_TIMEOUT": "1.5",
            # A breaker opened by an outage or a burst of 503s cools down within the test's wait.
            "CIRCUIT_COOLDOWN_SECONDS": "3",
            "POLL_FIRST_SECONDS": "2",
            "POLL_INTERVAL_SECONDS": "1",
            # Re-announcements of one order stay at most 4 s apart: a scenario that kills the same
            # stage twice (poll.after_provider) must not wait out a doubling backoff of minutes.
            "SWEEP_MAX_BACKOFF_SECONDS": "4",
            # Long enough to ride out a receiver outage of a few seconds without exhausting.
            "CALLBACK_RETRY_SCHEDULE": "0.5,1,1,2,3,5,8,13",
            "CALLBACK_CONNECT_TIMEOUT": "1",
            "CALLBACK_TOTAL_TIMEOUT": "3",
            # A request killed mid-flight leaves its key in flight; the client's retry takes it over.
            "IDEMPOTENCY_IN_FLIGHT_TIMEOUT_SECONDS": "5",
            "FAULT_DIR": str(harness.POINT_DIR),
            "LOG_LEVEL": "INFO",
        }
    )
    _manage(env, "migrate", "--noinput", "-v", "0")
    _manage(env, "seed_sandbox")
    creds = json.loads(_manage(env, "create_merchant", "faults"))
    harness.disarm_all()
    receiver = harness.Receiver(harness.RECEIVER_PORT)
    stack = harness.FaultStack(env, redis_server.url)
    fault = FaultEnv(
        stack=stack,
        pg=pg,
        redis_server=redis_server,
        receiver=receiver,
        api_key=creds["api_key"],
        webhook_secret=creds["webhook_secret"],
        dsn=pg.dsn(DB_NAME),
        sandbox_dsn=sandbox_dsn,
    )
    try:
        stack.start_all()
        yield fault
    finally:
        stack.stop_all()
        receiver.stop()
        redis_server.stop()
        pg.stop()


@pytest.fixture
def faults(fault_env):
    """The fault stack whole again: servers up, every process running, no point armed, circuits shut."""
    fault_env.pg.ensure()
    fault_env.redis.start()
    fault_env.receiver.start()
    harness.disarm_all()
    fault_env.stack.ensure_running()
    fault_env.settle()
    fault_env.sql("UPDATE allocation_paymentchannel SET circuit_open_until = NULL, daily_cap = NULL")
    harness.RENDEZVOUS.unlink(missing_ok=True)
    client = fault_env.redis.client()
    for key in client.scan_iter("circuit:*"):
        client.delete(key)
    return fault_env


@pytest.fixture(autouse=True)
def _report_fault_lines(request):
    """Put the count lines this test's scenarios printed on its report (tests/conftest.py's summary)."""
    before = len(harness.FAULT_LINES)
    yield
    for line in harness.FAULT_LINES[before:]:
        request.node.user_properties.append(("fault_line", line))
