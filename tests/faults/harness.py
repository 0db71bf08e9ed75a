"""The fault stack and its tools: processes, a restartable callback receiver, fault arming, a load
of orders (and of refunds of paid orders) through the HTTP API, and the invariants every order and
every refund must satisfy afterwards."""

import itertools
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
from celery import Celery
from standardwebhooks.webhooks import Webhook

from core.faults import marker_path
from tests.e2e.conftest import QUEUES, ROOT, Stack, _ok, wait_for

FAULTS = ROOT / ".run" / "faults"
LOGS = FAULTS / "log"
POINT_DIR = FAULTS / "points"
# Task start/end markers written by the workers' pool processes (tests/faults/probe.py).
TASK_DIR = FAULTS / "tasks"
RENDEZVOUS = TASK_DIR / "rendezvous"  # while present, stage copies start in pairs (probe.py)
# Ports of the fault stack; FAULT_PORT_BASE moves them all (two suites on one machine).
_BASE = int(os.environ.get("FAULT_PORT_BASE", "28000"))
WEB = f"127.0.0.1:{_BASE}"
SANDBOX = f"127.0.0.1:{_BASE + 1}"
RECEIVER_PORT = _BASE + 2

# Which process carries which fault point: a point fires in the first process that reaches it,
# so each is compiled into the one process whose window it is meant to hit.
POINTS_BY_PROCESS = {
    "web": ("outbox.before_publish", "webhook.after_store"),
    "worker-allocation": ("allocate.before_commit", "allocate.after_commit"),
    "worker-gateway": (
        "charge.before_provider",
        "charge.after_provider",
        "charge.after_commit",
        "confirm.before_commit",
        "confirm.after_commit",
        "poll.after_provider",
        "refund.before_provider",
        "refund.after_provider",
        "refund.after_commit",
    ),
    "worker-callbacks": ("callback.after_post", "callback.after_commit"),
}
ALL_POINTS = tuple(itertools.chain.from_iterable(POINTS_BY_PROCESS.values()))

RANK = {"pending": 0, "assigned": 1, "processing": 2, "paid": 3, "failed": 3, "completed": 4}


# --- processes ----------------------------------------------------------------------------------------


class FaultStack(Stack):
    """The e2e stack's processes on the fault ports, each started with its own fault points."""

    def __init__(self, env: dict[str, str], broker_url: str) -> None:
        super().__init__(env, logs=LOGS, tag="faults")
        self._send_lock = threading.Lock()
        # The project's app speaks to the test Redis; this one, same settings, to the fault Redis.
        self.celery = Celery("faults", broker=broker_url, set_as_current=False)
        self.celery.config_from_object("django.conf:settings", namespace="CELERY")

    def commands(self) -> dict[str, list[str]]:
        """The e2e commands, except that workers load the app through tests/faults/probe.py."""
        cmds = super().commands()
        for name, cmd in cmds.items():
            if name.startswith("worker-"):
                cmds[name] = [part if part != "config" else "tests.faults.probe" for part in cmd]
        return cmds

    def process_env(self, name: str) -> dict[str, str]:
        return {
            **self.env,
            "FAULT_POINTS": ",".join(POINTS_BY_PROCESS.get(name, ())),
            "FAULT_TASK_DIR": str(TASK_DIR),
        }

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.pid if proc is not None and proc.poll() is None else None

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def kill(self, name: str) -> None:
        """kill -9 the whole process group: the worker's main process and its pool children."""
        self.stop(name, signal.SIGKILL)

    def start_all(self) -> None:
        for name in self.commands():
            self.start(name)
        self.wait_ready()

    def stop_all(self) -> None:
        """TERM everything at once, then KILL what is still there after a few seconds."""
        procs = [self.procs.pop(name) for name in list(self.procs)]
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)

    def ensure_running(self) -> None:
        """Start whatever a previous test stopped or killed, and wait until all of it answers."""
        for name in self.commands():
            if not self.alive(name):
                self.procs.pop(name, None)
                self.start(name)
        self.wait_ready()

    def wait_ready(self) -> None:
        wait_for(lambda: _ok(f"http://{WEB}/readyz") and _ok(f"http://{SANDBOX}/healthz"), 60, "fault stack")
        wait_for(lambda: len(self.workers()) >= len(QUEUES), 60, "fault workers consuming")

    def workers(self) -> set[str]:
        try:
            replies = self.celery.control.ping(timeout=0.5) or []
        except Exception:  # the broker is restarting: nobody is known to be consuming yet
            return set()
        return {name for reply in replies for name in reply}

    def send_task(self, name: str, message: dict) -> None:
        """Publish a stage task's message to the fault broker, routed as in production."""
        from config.celery_app import app

        with self._send_lock, self.celery.producer_or_acquire() as producer:
            app.send_task(name, args=[message], producer=producer)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class Receiver:
    """The merchant's callback endpoint; `stop()` closes the port (connections are refused)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        if self.server is not None:
            return
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers.items()), "body": body.decode()}
                    )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok": true}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def by_order(self, path: str) -> dict[str, list[dict]]:
        with self.lock:
            received = [r for r in self.requests if r["path"] == path]
        result: dict[str, list[dict]] = {}
        for request in received:
            result.setdefault(json.loads(request["body"])["data"]["id"], []).append(request)
        return result


# --- fault points -------------------------------------------------------------------------------------


def disarm_all() -> None:
    POINT_DIR.mkdir(parents=True, exist_ok=True)
    for name in ALL_POINTS:
        Path(marker_path(str(POINT_DIR), name)).touch()


class Armer:
    """Arms a fault point, waits for it to fire, re-arms it, up to `times` fires (in a thread)."""

    def __init__(self, point: str, times: int, gap: float = 1.0) -> None:
        self.point = point
        self.times = times
        self.gap = gap
        self.fired: list[tuple[int, float]] = []  # (pid, time) of each kill
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.marker = Path(marker_path(str(POINT_DIR), point))

    def __enter__(self) -> "Armer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.marker.touch()  # disarmed for whatever runs next

    def _run(self) -> None:
        for _ in range(self.times):
            self.marker.unlink(missing_ok=True)
            while not self.marker.exists() or not self.marker.read_text().strip():
                if self._stop.wait(0.05):
                    return
            pid, at = self.marker.read_text().split()
            self.fired.append((int(pid), float(at)))
            if self._stop.wait(self.gap):
                return

    @property
    def window(self) -> tuple[float, float] | None:
        return (self.fired[0][1], self.fired[-1][1]) if self.fired else None


# --- load and invariants ------------------------------------------------------------------------------

# amount % 100 -> (outcome, failure_code) from SPEC 5's sandbox table
EXPECTED = {
    51: ("failed", "card_declined"),
    52: ("failed", "insufficient_funds"),
    72: ("failed", "channel_unavailable"),
}
MIX = (1000, 1051, 1061, 1071, 1081, 1010, 1052, 1072, 1020, 1062, 1030, 1040)


def expected_outcome(amount: int) -> tuple[str, str | None]:
    return EXPECTED.get(amount % 100, ("paid", None))


@dataclass
class Load:
    """Orders created through the API by a few client threads, each retried under its own
    Idempotency-Key until the API answers 201 (a crashed or unavailable server is retried)."""

    api_key: str
    scenario: str
    receiver: Receiver
    on_created: object = None  # called with each order as it gets its 201
    web: str = WEB  # another stack's addresses (tests/scale runs stacks of its own)
    sandbox: str = SANDBOX
    orders: dict[str, dict] = field(default_factory=dict)
    codes: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.path = f"/hooks/{self.scenario}-{uuid.uuid4().hex[:6]}"
        self._local = threading.local()

    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            self._local.session.headers["Authorization"] = f"Bearer {self.api_key}"
        return self._local.session

    def create(self, index: int, amount: int, currency: str = "USD") -> dict:
        reference = f"{self.scenario}-{index}-{uuid.uuid4().hex[:8]}"
        body = {
            "amount": amount,
            "currency": currency,
            "reference": reference,
            "callback_url": self.receiver.url(self.path),
        }
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                response = self.session().post(
                    f"http://{self.web}/api/v1/orders",
                    json=body,
                    headers={"Idempotency-Key": reference},
                    timeout=10,
                )
            except requests.RequestException:
                self._count("connection_error")
                time.sleep(0.3)
                continue
            self._count(response.status_code)
            if response.status_code == 201:
                order = response.json()
                with self.lock:
                    self.orders[order["id"]] = order
                if self.on_created is not None:
                    self.on_created(order)
                return order
            if response.status_code in (409, 429, 500, 502, 503):
                time.sleep(0.3)
                continue
            raise AssertionError(f"unexpected answer {response.status_code}: {response.text[:300]}")
        raise AssertionError(f"order {reference} never got a 201")

    def _count(self, key) -> None:
        with self.lock:
            self.codes[key] += 1

    def run(self, count: int = 24, spacing: float = 0.12, during=None, mix=MIX) -> None:
        """Create `count` orders over about count*spacing seconds; `during(index)` is called as the
        index-th order is submitted (a test injects its fault from there)."""
        amounts = [mix[i % len(mix)] + 100 * (i // len(mix)) for i in range(count)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = []
            for index, amount in enumerate(amounts):
                if during is not None:
                    during(index)
                futures.append(pool.submit(self.create, index, amount))
                time.sleep(spacing)
            for future in futures:
                future.result()


def sandbox_charges(order_id: str, sandbox: str = SANDBOX) -> list[dict]:
    return requests.get(f"http://{sandbox}/sandbox/charges", params={"order": order_id}, timeout=10).json()


# --- evidence -----------------------------------------------------------------------------------------
# What the harness learns from the processes and the record, never from constants: which task a
# killed pool child was running (probe markers), where each order was at a given moment (its
# transition log), what the outbox and the attempts tables say happened.


@dataclass
class TaskRun:
    task: str
    order: str | None
    id: str
    pid: int
    start: float
    end: float | None  # None: the process died while running it
    refund: str | None = None  # a refund stage's refund


def task_runs() -> list[TaskRun]:
    """Every task start the workers' pool processes wrote, with its end if it had one."""
    runs: list[TaskRun] = []
    open_runs: dict[tuple[int, str], TaskRun] = {}
    for path in TASK_DIR.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by kill -9
                continue
            key = (record["pid"], record["id"])
            if record["ev"] == "start":
                run = TaskRun(
                    record["task"],
                    record["order"],
                    record["id"],
                    record["pid"],
                    record["t"],
                    None,
                    record.get("refund"),
                )
                runs.append(run)
                open_runs[key] = run
            elif key in open_runs:
                open_runs.pop(key).end = record["t"]
    return runs


def interrupted_runs(pid: int) -> list[TaskRun]:
    """The task(s) process `pid` started and never finished: what it was doing when it died."""
    return [run for run in task_runs() if run.pid == pid and run.end is None]


def overlapping_copies(runs: list[TaskRun], task: str, by: str = "order") -> set[str]:
    """Orders (`by="refund"`: refunds) for which two copies of `task` ran at once: both started
    before either ended."""
    by_order: dict[str, list[TaskRun]] = {}
    for run in runs:
        subject = getattr(run, by)
        if run.task == task and subject and run.end is not None:
            by_order.setdefault(subject, []).append(run)
    return {
        order
        for order, copies in by_order.items()
        if any(
            a.id != b.id and a.pid != b.pid and max(a.start, b.start) < min(a.end, b.end)
            for a, b in itertools.combinations(copies, 2)
        )
    }


Step = tuple[str | None, str, str | None, str, float]  # from, to, channel, reason, at (epoch seconds)


def transition_logs(sql, order_ids) -> dict[str, list[Step]]:
    """Each order's transitions from PostgreSQL, oldest first, with when each was decided."""
    rows = sql(
        "SELECT order_id::text, from_status, to_status, channel, reason, extract(epoch from created_at)"
        " FROM orders_ordertransition WHERE order_id = ANY(%s::uuid[]) ORDER BY id",
        (list(order_ids),),
    )
    logs: dict[str, list[Step]] = {str(order_id): [] for order_id in order_ids}
    for order_id, *step in rows:
        logs[order_id].append((step[0], step[1], step[2], step[3], float(step[4])))
    return logs


def status_at(log: list[Step], moment: float) -> str | None:
    """The order's status at `moment` by its log (None: it did not exist yet)."""
    status = None
    for step in log:
        if step[4] > moment:
            break
        status = step[1]
    return status


def in_stage_during(log: list[Step], statuses, start: float, end: float) -> bool:
    """True if the order held one of `statuses` at some moment of [start, end]."""
    for step, following in itertools.zip_longest(log, log[1:]):
        held_until = following[4] if following else float("inf")
        if step[1] in statuses and step[4] <= end and held_until >= start:
            return True
    return False


def orders_in_stage(sql, order_ids, statuses, start: float, end: float | None = None) -> set[str]:
    """Orders that were in one of `statuses` at `start` (or at some moment of [start, end])."""
    logs = transition_logs(sql, order_ids)
    return {
        order_id
        for order_id, log in logs.items()
        if in_stage_during(log, statuses, start, start if end is None else end)
    }


def relayed_creations(sql, order_ids, *, committed: tuple[float, float], published_after: float) -> set[str]:
    """Orders whose creation event was committed within `committed` and published only after
    `published_after`: the announcement waited in the outbox (its publisher died, or the broker
    was away) until the relay sent it."""
    rows = sql(
        "SELECT order_id::text FROM orders_outboxevent WHERE topic = 'order-created'"
        " AND order_id = ANY(%s::uuid[]) AND extract(epoch from created_at) BETWEEN %s AND %s"
        " AND extract(epoch from published_at) > %s",
        (list(order_ids), committed[0], committed[1], published_after),
    )
    return {row[0] for row in rows}


@dataclass
class Report:
    fault: str
    orders: int
    faults_injected: int
    in_flight: int
    recovered: int
    lost: int
    double_charges: int
    failed_but_charged: int
    problems: list[str]

    def line(self) -> str:
        return (
            f"fault={self.fault} orders={self.orders} faults_injected={self.faults_injected}"
            f" in_flight={self.in_flight} recovered={self.recovered} lost={self.lost}"
            f" double_charges={self.double_charges} failed_but_charged={self.failed_but_charged}"
        )


FAULT_LINES: list[str] = []


def verify(
    load: Load,
    *,
    fault: str,
    faults_injected: int,
    in_flight: set[str],
    webhook_secret: str,
    timeout: float = 90,
    may_fail=None,
) -> Report:
    """Wait for every order to complete, then check every invariant on every order.

    `in_flight`: the orders the evidence shows were in the fault's stage when it struck; those that
    end right are `recovered`. `may_fail(order, ledger)`: True when an order that ended failed,
    other than as its amount says, did so legitimately in this scenario (the check of why is the
    scenario's); it is never asked about an order with a charge in the ledger.
    """
    session = load.session()
    web = load.web
    final: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(final) < len(load.orders):
        for order_id in load.orders:
            if order_id not in final:
                order = session.get(f"http://{web}/api/v1/orders/{order_id}", timeout=10).json()
                if order["status"] == "completed":
                    final[order_id] = order
        time.sleep(0.5)
    problems: list[str] = []
    bad: set[str] = set()

    def problem(order_id: str, text: str) -> None:
        bad.add(order_id)
        problems.append(f"{order_id} {text}")

    lost = len(load.orders) - len(final)
    for order_id in load.orders:
        if order_id not in final:
            order = session.get(f"http://{web}/api/v1/orders/{order_id}", timeout=10).json()
            problem(order_id, f"({order['amount']}) stuck in {order['status']}")
    double_charges = failed_but_charged = 0
    callbacks = load.receiver.by_order(load.path)
    for order_id, order in final.items():
        amount = order["amount"]
        ledger = sandbox_charges(order_id, load.sandbox)
        # the transition log: a chain, never backwards, nothing twice
        events = session.get(f"http://{web}/api/v1/orders/{order_id}/events", timeout=10).json()
        steps = [(e["from"], e["to"], e["channel"]) for e in events]
        if steps[0][:2] != (None, "pending") or steps[-1][1] != "completed":
            problem(order_id, f"log does not run from creation to completed: {steps}")
        for previous, step in itertools.pairwise(steps):
            if step[0] != previous[1] or RANK[step[1]] < RANK[previous[1]]:
                problem(order_id, f"log breaks the chain: {previous} -> {step}")
        pairs = Counter((s[0], s[1]) for s in steps if (s[0], s[1]) != ("assigned", "assigned"))
        failovers = [s[2] for s in steps if (s[0], s[1]) == ("assigned", "assigned")]
        if any(n > 1 for n in pairs.values()) or len(failovers) != len(set(failovers)):
            problem(order_id, f"has a duplicated transition: {steps}")
        outcome, failure_code = expected_outcome(amount)
        if (order["outcome"], order["failure_code"]) != (outcome, failure_code):
            legitimate = (
                order["outcome"] == "failed"
                and not ledger
                and may_fail is not None
                and may_fail(order, ledger)
            )
            if not legitimate:
                problem(order_id, f"({amount}) ended {order['outcome']}/{order['failure_code']}: {steps}")
        # the provider's ledger: at most one charge, of this order's amount and currency; exactly
        # one, paid, on the order's channel when paid; nothing taken when failed
        if len(ledger) > 1:
            double_charges += 1
            problem(order_id, f"charged {len(ledger)} times: {ledger}")
        for charge in ledger:
            if (charge["order_id"], charge["amount"], charge["currency"]) != (
                order_id,
                amount,
                order["currency"],
            ):
                problem(
                    order_id, f"({amount} {order['currency']}) has a ledger charge that differs: {charge}"
                )
        if order["outcome"] == "paid":
            if [(c["status"], c["channel"]) for c in ledger] != [("paid", order["channel"])]:
                problem(order_id, f"paid on {order['channel']} but the ledger says {ledger}")
        elif any(c["status"] != "failed" for c in ledger):
            failed_but_charged += 1
            problem(order_id, f"failed ({order['failure_code']}) but was charged: {ledger}")
        if order["failure_code"] in ("channel_unavailable", "no_channel_available") and ledger:
            problem(order_id, f"failed before any charge but the ledger has {ledger}")
        # the merchant's callback: received, signed, one stable webhook-id, the final outcome
        received = callbacks.get(order_id, [])
        if not received:
            problem(order_id, "completed but no callback was received")
        if len({r["headers"].get("webhook-id") for r in received}) > 1:
            problem(order_id, "callback came with several webhook-ids")
        for request in received:
            body = Webhook(webhook_secret).verify(request["body"], request["headers"])
            if body["type"] != f"order.{order['outcome']}":
                problem(order_id, f"callback type {body['type']} for outcome {order['outcome']}")
    unknown = in_flight - set(load.orders)
    if unknown:
        problems.append(f"in-flight orders that are not this load's: {sorted(unknown)}")
    recovered = len({order_id for order_id in in_flight if order_id in final and order_id not in bad})
    report = Report(
        fault,
        len(load.orders),
        faults_injected,
        len(in_flight),
        recovered,
        lost,
        double_charges,
        failed_but_charged,
        problems,
    )
    FAULT_LINES.append(report.line())
    print(report.line())
    return report


def fault_log(name: str) -> str:
    path = LOGS / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def proc_alive(pid: int) -> bool:
    """True while `pid` runs (a killed child its parent has not reaped yet is a zombie: dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


# --- refunds (SPEC 10) --------------------------------------------------------------------------------

# refund amount % 100 -> (status, failure_code) from SPEC 10's sandbox table; the rest succeed
REFUND_EXPECTED = {51: ("failed", "refund_declined")}
# What each paid order of a refund load is refunded, by order index, one wave after another
# (None: everything still refundable). 61: settled by polling; 62: our request times out, the
# refund is made; 72: the first request is answered 503, the retry after a backoff is accepted.
REFUND_PLANS = ((None,), (3000, 1049), (1051, 2000), (1061, 1000), (1062, 1000), (1072, None))
REFUNDED_ORDER = 10_000  # each order's amount is this plus 100 per index: paid (SPEC 5's row 00)


def expected_refund(amount: int) -> tuple[str, str | None]:
    return REFUND_EXPECTED.get(amount % 100, ("succeeded", None))


def sandbox_refunds(order_id: str, sandbox: str = SANDBOX) -> list[dict]:
    return requests.get(f"http://{sandbox}/sandbox/refunds", params={"order": order_id}, timeout=10).json()


@dataclass
class RefundLoad(Load):
    """Paid orders, then refunds of them requested through the API (full and partial, rows of SPEC
    10's table), each retried under its own Idempotency-Key until the API answers 201."""

    refunds: dict[str, dict] = field(default_factory=dict)

    def paid_orders(self, count: int, timeout: float = 60) -> list[str]:
        """`count` orders charged and completed (called back), ready to refund."""
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda i: self.create(i, REFUNDED_ORDER + 100 * i), range(count)))
        session = self.session()

        def completed() -> bool:
            return all(
                session.get(f"http://{self.web}/api/v1/orders/{o}", timeout=10).json()["status"]
                == "completed"
                for o in self.orders
            )

        wait_for(completed, timeout, f"{count} orders of {self.scenario} paid and completed")
        return list(self.orders)

    def refund(self, order_id: str, amount: int | None, index: int) -> dict:
        reference = f"{self.scenario}-rf{index}-{uuid.uuid4().hex[:8]}"
        body = {"reason": "requested_by_customer", "reference": reference}
        if amount is not None:
            body["amount"] = amount
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                response = self.session().post(
                    f"http://{self.web}/api/v1/orders/{order_id}/refunds",
                    json=body,
                    headers={"Idempotency-Key": reference},
                    timeout=10,
                )
            except requests.RequestException:
                self._count("connection_error")
                time.sleep(0.3)
                continue
            self._count(response.status_code)
            if response.status_code == 201:
                refund = response.json()
                with self.lock:
                    self.refunds[refund["id"]] = refund
                return refund
            if response.status_code in (409, 429, 500, 502, 503):
                time.sleep(0.3)
                continue
            raise AssertionError(f"unexpected refund answer {response.status_code}: {response.text[:300]}")
        raise AssertionError(f"refund {reference} never got a 201")

    def run_refunds(self, plans=REFUND_PLANS, spacing: float = 0.1, during=None) -> None:
        """Refund each order as its plan says, a wave at a time (an order's second refund is asked
        once its first is held); `during(index)` is called as the index-th refund is submitted."""
        orders = list(self.orders)
        steps = [(order_id, plans[i % len(plans)]) for i, order_id in enumerate(orders)]
        index = 0
        with ThreadPoolExecutor(max_workers=4) as pool:
            for wave in range(max(len(plan) for plan in plans)):
                futures = []
                for order_id, plan in steps:
                    if wave < len(plan):
                        if during is not None:
                            during(index)
                        futures.append(pool.submit(self.refund, order_id, plan[wave], index))
                        index += 1
                        time.sleep(spacing)
                for future in futures:
                    future.result()


RefundStep = tuple[str | None, str, float]  # from, to, at (epoch seconds)


def refund_logs(sql, refund_ids) -> dict[str, list[RefundStep]]:
    """Each refund's transitions from PostgreSQL, oldest first, with when each was decided."""
    rows = sql(
        "SELECT refund_id::text, from_status, to_status, extract(epoch from created_at)"
        " FROM orders_refundtransition WHERE refund_id = ANY(%s::uuid[]) ORDER BY id",
        (list(refund_ids),),
    )
    logs: dict[str, list[RefundStep]] = {str(refund_id): [] for refund_id in refund_ids}
    for refund_id, from_status, to_status, at in rows:
        logs[refund_id].append((from_status, to_status, float(at)))
    return logs


def outran_by_webhook(sql, kind: str, row_id: str) -> bool:
    """Whether the provider's webhook, not the stage, took this order or refund to processing.

    Between the provider's answer and the stage's commit, the webhook the provider sends as it
    accepts (the sandbox's comes `SANDBOX_WEBHOOK_DELAY` later) can reach the web and settle the
    charge or refund first when the worker is slow; the confirm stage then writes the move to
    processing with "learned from provider webhook" (gateway.services).
    """
    table = {"order": "orders_ordertransition", "refund": "orders_refundtransition"}[kind]
    rows = sql(
        f"SELECT 1 FROM {table} WHERE {kind}_id = %s AND to_status = 'processing'"
        " AND reason LIKE '%%learned from provider webhook%%'",
        (row_id,),
    )
    return bool(rows)


def refund_status_at(log: list[RefundStep], moment: float) -> str | None:
    status = None
    for step in log:
        if step[2] > moment:
            break
        status = step[1]
    return status


def refunds_unsettled_during(sql, refund_ids, start: float, end: float) -> set[str]:
    """Refunds that existed and were not yet settled at some moment of [start, end]."""
    settled = ("succeeded", "failed")
    result = set()
    for refund_id, log in refund_logs(sql, refund_ids).items():
        if not log or log[0][2] > end:
            continue
        ended = next((step[2] for step in log if step[1] in settled), float("inf"))
        if ended >= start:
            result.add(refund_id)
    return result


@dataclass
class RefundReport:
    fault: str
    orders: int
    refunds: int
    faults_injected: int
    in_flight: int
    recovered: int
    lost: int
    double_refunds: int
    ledger_mismatches: int
    problems: list[str]

    def line(self) -> str:
        return (
            f"fault={self.fault} orders={self.orders} refunds={self.refunds}"
            f" faults_injected={self.faults_injected} in_flight={self.in_flight}"
            f" recovered={self.recovered} lost={self.lost} double_refunds={self.double_refunds}"
            f" ledger_mismatches={self.ledger_mismatches}"
        )


def verify_refunds(
    load: RefundLoad,
    *,
    sql,
    fault: str,
    faults_injected: int,
    in_flight: set[str],
    webhook_secret: str,
    timeout: float = 90,
) -> RefundReport:
    """Wait for every refund to settle and be called back, then check every refund and order.

    Per refund: the end its amount's row says, the transition chain pending -> processing -> end
    (a refusal: pending -> failed), at most one ledger entry under its key (exactly one, of its
    amount, when succeeded), one signed callback webhook-id of its end. Per order: no ledger entry
    under a key that is no refund's (a refund sent again under another key), the ledger's sum equal
    to `amount_refunded` and to the succeeded refunds' sum, never more than was charged.
    `in_flight`: the refunds the evidence shows the fault struck; those that end right are `recovered`.
    """
    session = load.session()
    web = load.web
    final: dict[str, dict] = {}

    def settled_and_called_back() -> bool:
        for refund_id in load.refunds:
            if refund_id not in final:
                refund = session.get(f"http://{web}/api/v1/refunds/{refund_id}", timeout=10).json()
                if refund["status"] in ("succeeded", "failed"):
                    final[refund_id] = refund
        callbacks = load.receiver.by_order(load.path)
        return len(final) == len(load.refunds) and all(refund_id in callbacks for refund_id in final)

    try:
        wait_for(settled_and_called_back, timeout, "every refund settled and called back")
    except AssertionError:
        pass  # counted and described below
    problems: list[str] = []
    bad: set[str] = set()

    def problem(subject: str, text: str) -> None:
        bad.add(subject)
        problems.append(f"{subject} {text}")

    lost = len(load.refunds) - len(final)
    for refund_id, refund in load.refunds.items():
        if refund_id not in final:
            now = session.get(f"http://{web}/api/v1/refunds/{refund_id}", timeout=10).json()
            problem(refund_id, f"refund ({refund['amount']}) stuck in {now['status']}")
    keys = dict(
        sql(
            "SELECT refund_id::text, idempotency_key FROM gateway_refundattempt WHERE refund_id = ANY(%s::uuid[])",
            (list(load.refunds),),
        )
    )
    callbacks = load.receiver.by_order(load.path)
    by_order: dict[str, list[dict]] = {}
    for refund in load.refunds.values():
        by_order.setdefault(refund["order_id"], []).append(refund)
    double_refunds = ledger_mismatches = 0
    for order_id, refunds in by_order.items():
        order = session.get(f"http://{web}/api/v1/orders/{order_id}", timeout=10).json()
        ledger = sandbox_refunds(order_id, load.sandbox)
        entries = Counter(entry["idempotency_key"] for entry in ledger)
        ours = {keys.get(refund["id"]) for refund in refunds}
        # the provider's ledger: nothing under a key that is not one of this order's refunds
        strangers = [entry for entry in ledger if entry["idempotency_key"] not in ours]
        if strangers:
            double_refunds += len(strangers)
            problem(order_id, f"refunded under keys of no refund (sent again under another key): {strangers}")
        succeeded = 0
        for refund in refunds:
            end = final.get(refund["id"])
            if end is None:
                continue
            key = keys.get(refund["id"])
            made = [entry for entry in ledger if entry["idempotency_key"] == key]
            if entries[key] > 1:
                double_refunds += entries[key] - 1
                problem(refund["id"], f"refunded {entries[key]} times under its key: {made}")
            status, failure_code = expected_refund(refund["amount"])
            if (end["status"], end["failure_code"]) != (status, failure_code):
                problem(refund["id"], f"({refund['amount']}) ended {end['status']}/{end['failure_code']}")
            if end["status"] == "succeeded":
                succeeded += end["amount"]
                if [(e["amount"], e["currency"]) for e in made] != [(end["amount"], end["currency"])]:
                    problem(refund["id"], f"succeeded ({end['amount']}) but the ledger says {made}")
            elif made:
                problem(refund["id"], f"failed ({end['failure_code']}) but was refunded: {made}")
            events = session.get(f"http://{web}/api/v1/refunds/{refund['id']}/events", timeout=10).json()
            path = [(e["from"], e["to"]) for e in events]
            expected_path = [(None, "pending"), ("pending", "processing"), ("processing", end["status"])]
            if path != expected_path:
                problem(refund["id"], f"log is not {expected_path}: {path}")
            received = callbacks.get(refund["id"], [])
            if not received:
                problem(refund["id"], "settled but no callback was received")
            if len({r["headers"].get("webhook-id") for r in received}) > 1:
                problem(refund["id"], "callback came with several webhook-ids")
            for request in received:
                body = Webhook(webhook_secret).verify(request["body"], request["headers"])
                if body["type"] != f"refund.{end['status']}":
                    problem(refund["id"], f"callback type {body['type']} for status {end['status']}")
        total = sum(entry["amount"] for entry in ledger)
        if not total == order["amount_refunded"] == succeeded or total > order["amount"]:
            ledger_mismatches += 1
            problem(
                order_id,
                f"ledger sum {total}, amount_refunded {order['amount_refunded']}, succeeded refunds"
                f" {succeeded}, charged {order['amount']}",
            )
    unknown = in_flight - set(load.refunds)
    if unknown:
        problems.append(f"in-flight refunds that are not this load's: {sorted(unknown)}")
    recovered = len({refund_id for refund_id in in_flight if refund_id in final and refund_id not in bad})
    report = RefundReport(
        fault,
        len(load.orders),
        len(load.refunds),
        faults_injected,
        len(in_flight),
        recovered,
        lost,
        double_refunds,
        ledger_mismatches,
        problems,
    )
    FAULT_LINES.append(report.line())
    print(report.line())
    return report
