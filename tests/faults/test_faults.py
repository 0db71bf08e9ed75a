"""SPEC 9 under fire: kill -9 in every stage window, web between commit and publish, Redis wiped,
Redis down, PostgreSQL restarted, provider and receiver down, every task delivered three times.

Each test puts a load of orders through the fault stack, injects its fault, lets the system
recover on its own (sweeps, relay, redelivery), then checks every order: completed, the right
outcome, one charge at most (exactly one when paid), a transition chain with no duplicate and no
step back, one callback webhook-id. It prints one line of counts, repeated at the end of the run.
"""

import threading
import time

import pytest

from tests.faults import harness
from tests.faults.harness import WEB, Armer, verify, wait_for

pytestmark = [pytest.mark.faults]


def assert_clean(report: harness.Report) -> None:
    assert report.lost == 0, report.problems
    assert report.double_charges == 0, report.problems
    assert report.problems == []


def assert_no_process_died(faults) -> None:
    """Recovery came from the system itself, not from the harness restarting a crashed process."""
    dead = [name for name in faults.stack.commands() if not faults.stack.alive(name)]
    assert dead == [], f"died during the fault: {dead}"


class Injector:
    """Runs a fault in a thread once order `at` is submitted, so the load goes on through it."""

    def __init__(self, at: int, action) -> None:
        self.at = at
        self.action = action
        self.started: float | None = None
        self.ended: float | None = None
        self.count = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __call__(self, index: int) -> None:
        if index == self.at:
            self._thread.start()

    def _run(self) -> None:
        self.started = time.time()
        self.action()
        self.ended = time.time()
        self.count += 1

    def join(self) -> "Injector":
        self._thread.join(timeout=120)
        assert self.ended is not None, "the fault was never injected, or its action failed"
        return self

    @property
    def window(self) -> tuple[float, float]:
        return (self.started, self.ended)


@pytest.mark.parametrize(
    "point",
    [
        "allocate.before_commit",
        "allocate.after_commit",
        "charge.before_provider",
        "charge.after_provider",
        "charge.after_commit",
        "confirm.before_commit",
        "confirm.after_commit",
        "callback.after_post",
        "callback.after_commit",
    ],
)
def test_worker_killed_in_a_stage_window(faults, point):
    # given a load in flight, and the point armed in the worker of its stage
    load = faults.load(point)
    with Armer(point, times=2) as armer:
        # when the pool child running the task dies there, twice
        load.run()
        wait_for(lambda: len(armer.fired) == 2, 30, f"{point} to fire twice")
    assert not any(harness.proc_alive(pid) for pid, _ in armer.fired)
    # then Celery requeues the lost message (acks_late, reject_on_worker_lost), and the sweeps
    # pick up whatever a lease or a lost publish left behind: every order completes, exactly once
    report = verify(
        load,
        fault=f"kill-9:{point}",
        faults_injected=len(armer.fired),
        fault_window=armer.window,
        webhook_secret=faults.webhook_secret,
    )
    assert_clean(report)


def test_web_killed_between_commit_and_publish(faults):
    # given the web worker dies right after the order's transaction commits, before publishing
    load = faults.load("web")
    with Armer("outbox.before_publish", times=2) as armer:
        load.run()
        wait_for(lambda: len(armer.fired) == 2, 30, "web to die twice")
    # then the client saw the crash and retried under its key (a replayed 201, not a new order)
    assert load.codes["connection_error"] >= 2
    assert load.codes[500] == 0
    # and the outbox relay published the committed, unpublished events
    report = verify(
        load,
        fault="kill-9:web.after_commit_before_publish",
        faults_injected=len(armer.fired),
        fault_window=armer.window,
        webhook_secret=faults.webhook_secret,
    )
    assert_clean(report)


@pytest.mark.parametrize("queue", ["allocation", "gateway", "callbacks"])
def test_worker_main_process_killed_then_restarted(faults, queue):
    # given the whole worker (main process and pool) is killed -9 mid-load
    name = f"worker-{queue}"
    load = faults.load(name)
    injector = Injector(10, lambda: faults.stack.kill(name))
    load.run(during=injector)
    injector.join()
    # when it comes back a little later (what a process manager does)
    time.sleep(1)
    faults.stack.start(name)
    # then its unacked messages come back (visibility timeout) or are re-announced (sweeps)
    report = verify(
        load,
        fault=f"kill-9:{name}:main-process",
        faults_injected=injector.count,
        fault_window=injector.window,
        webhook_secret=faults.webhook_secret,
    )
    assert_clean(report)


def test_redis_killed_and_restarted_empty(faults):
    # given Redis dies mid-load and comes back with nothing: queues, unacked messages, bindings gone
    load = faults.load("redis-wiped")

    def wipe():
        faults.redis.kill()
        faults.redis.wipe()
        time.sleep(1)
        faults.redis.start()

    injector = Injector(10, wipe)
    load.run(during=injector)
    injector.join()
    # then PostgreSQL's record is enough: the relay and the sweeps re-announce every open order
    assert load.codes[500] == 0
    report = verify(
        load,
        fault="redis-killed-restarted-empty",
        faults_injected=injector.count,
        fault_window=injector.window,
        webhook_secret=faults.webhook_secret,
    )
    assert_clean(report)
    assert_no_process_died(faults)


def test_redis_down_while_orders_are_created(faults):
    # given Redis is down
    load = faults.load("redis-down")
    faults.redis.kill()
    started = time.time()
    try:
        # when orders are created
        load.run(count=12, spacing=0.2)
    finally:
        ended = time.time()
        faults.redis.start()
    # then the API took them (they wait in the outbox) or said 503; never a 500
    assert set(load.codes) <= {201, 503}, load.codes
    assert load.codes[201] >= 12
    # and once Redis is back every order goes through
    report = verify(
        load,
        fault="redis-down-during-create",
        faults_injected=1,
        fault_window=(started, ended),
        webhook_secret=faults.webhook_secret,
    )
    assert_clean(report)
    assert_no_process_died(faults)


def test_postgresql_restarted_mid_load(faults):
    # given PostgreSQL goes down (fast shutdown: open transactions roll back) and comes back
    load = faults.load("pg-restart")

    def restart():
        faults.pg.stop()
        time.sleep(2)
        faults.pg.start()

    injector = Injector(10, restart)
    load.run(during=injector)
    injector.join()
    # then nothing was lost, and no request was answered 500 (503 while the database was away)
    report = verify(
        load,
        fault="postgresql-restart",
        faults_injected=injector.count,
        fault_window=injector.window,
        webhook_secret=faults.webhook_secret,
    )
    assert_clean(report)
    assert_no_process_died(faults)
    assert load.codes[500] == 0, load.codes
    assert load.codes[503] + load.codes["connection_error"] > 0, "the restart hit no request"


def test_provider_down_then_back(faults):
    # given the sandbox provider crashes (kill -9, answers lost mid-flight) and is back 3 s later
    load = faults.load("sandbox-down")

    def crash():
        faults.stack.kill("sandbox")
        time.sleep(3)
        faults.stack.start("sandbox")

    injector = Injector(8, crash)
    load.run(during=injector)
    injector.join()
    # then orders whose charge was refused outright fail over or fail channel_unavailable with
    # no charge; those with an unknown outcome are settled by polling; none is charged twice
    report = verify(
        load,
        fault="provider-down-then-back",
        faults_injected=injector.count,
        fault_window=injector.window,
        webhook_secret=faults.webhook_secret,
        outcome_may_be_unavailable=True,
    )
    assert_clean(report)


def test_callback_receiver_down_then_back(faults):
    # given the merchant's endpoint refuses connections for about 5 s
    load = faults.load("receiver-down")
    injector = Injector(4, faults.receiver.stop)
    load.run(during=injector)
    injector.join()
    time.sleep(max(0.0, injector.started + 5 - time.time()))
    faults.receiver.start()
    # then the retries (stored due times, swept by beat) deliver every callback, same webhook-id
    report = verify(
        load,
        fault="callback-receiver-down-then-back",
        faults_injected=injector.count,
        fault_window=(injector.started, time.time()),
        webhook_secret=faults.webhook_secret,
    )
    assert_clean(report)
    assert_no_process_died(faults)


def test_every_stage_task_delivered_three_times_two_at_once(faults):
    """Each stage's message is replaced by three adjacent copies: the worker's two pool children
    take two of them at the same moment, the third runs after. One transition, one charge."""
    stack, broker = faults.stack, faults.redis.client()
    # given beat and the stage workers stopped: messages wait, no sweep re-announces anything
    for name in ("beat", "worker-allocation", "worker-gateway", "worker-callbacks"):
        stack.stop(name)
    load = faults.load("duplicates")
    # amounts ending 61: paid, learned only by asking the provider, so no webhook races the test
    for index in range(12):
        load.create(index, 1061 + 100 * index)
    ids = list(load.orders)
    session = load.session()

    def status_of(order_id: str) -> dict:
        return session.get(f"http://{WEB}/api/v1/orders/{order_id}", timeout=10).json()

    def triple(queue: str, task: str, messages: list[dict], until: str) -> None:
        broker.delete(queue)  # the original messages, replaced by three copies each
        for message in messages:
            for _ in range(3):
                stack.send_task(task, message)
        stack.start(f"worker-{queue}")
        wait_for(lambda: all(status_of(i)["status"] == until for i in ids), 60, f"all {until}")

    triple("allocation", "allocation.allocate", [{"order_id": i} for i in ids], "assigned")
    triple("gateway", "gateway.charge", [{"order_id": i} for i in ids], "processing")
    stack.stop("worker-gateway")
    keys = {i: f"{i}:{status_of(i)['channel']}" for i in ids}
    confirms = [
        {"order_id": i, "idempotency_key": keys[i], "status": "paid", "failure_code": ""} for i in ids
    ]
    triple("gateway", "gateway.confirm", confirms, "paid")
    triple("callbacks", "callbacks.callback", [{"order_id": i} for i in ids], "completed")
    stack.start("beat")
    # then every order took each step once, was charged once and called back once
    report = verify(
        load,
        fault="duplicate-delivery-x3",
        faults_injected=3 * 4 * len(ids),
        fault_window=None,
        webhook_secret=faults.webhook_secret,
    )
    assert_clean(report)
    callbacks = load.receiver.by_order(load.path)
    for order_id in ids:
        events = session.get(f"http://{WEB}/api/v1/orders/{order_id}/events", timeout=10).json()
        assert [(e["from"], e["to"]) for e in events] == [
            (None, "pending"),
            ("pending", "assigned"),
            ("assigned", "processing"),
            ("processing", "paid"),
            ("paid", "completed"),
        ]
        assert len(callbacks[order_id]) == 1
