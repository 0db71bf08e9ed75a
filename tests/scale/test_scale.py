"""SPEC 12 under fire, on brokers started by the suite (tests/scale/conftest.py):

- the whole pipeline on Redis Sentinel, the master failed over mid-load;
- two beats on one stack: exactly one schedules while both live; the active one is SIGKILLed
  mid-load and the other takes over within 60 s;
- the whole pipeline on RabbitMQ (quorum queues), two workers per queue as two hosts: one worker
  killed mid-task, then a whole host SIGKILLed mid-load.

Every scenario puts a load of orders through the HTTP API and checks every order with the fault
suite's `verify`: completed, the right outcome, at most one charge (exactly one when paid), one
callback webhook-id; 0 lost and 0 double charges. Each also proves from evidence that its fault
struck while orders were in flight.
"""

import json
import time

import pytest
import requests

from tests.e2e.conftest import QUEUES, wait_for
from tests.faults import harness
from tests.faults.test_faults import Injector, assert_clean

pytestmark = [pytest.mark.faults]

OPEN = ("pending", "assigned", "processing", "paid", "failed")
SWEEPS = ("orders.relay_outbox", "orders.sweep_orders", "callbacks.sweep_deliveries")


def assert_queue_depths_scraped(stack) -> None:
    """/metrics reads the depth of every service queue from the stack's broker."""
    text = requests.get(f"http://{stack.web}/metrics", timeout=10).text
    assert "metrics_scrape_error" not in text, text[-2000:]
    for queue in QUEUES:
        assert f'celery_queue_depth{{queue="{queue}"}}' in text, queue


def in_flight_at(stack, load, moment: float) -> set[str]:
    """Orders of the load that existed and were not completed at `moment` (their transition logs)."""
    return harness.orders_in_stage(stack.sql, list(load.orders), OPEN, moment)


def test_sentinel_master_failover_mid_load(sentinel_stack):
    stack = sentinel_stack
    stack.ensure_running()
    load = stack.load("sentinel-failover")
    injector = Injector(8, stack.group.failover)
    load.run(count=24, spacing=0.2, during=injector)
    before, after = injector.join().evidence
    assert before != after, "the master did not change"
    report = harness.verify(
        load,
        fault="sentinel-failover",
        faults_injected=1,
        in_flight=in_flight_at(stack, load, injector.started),
        webhook_secret=stack.webhook_secret,
    )
    assert_clean(report)
    # the stages went on through the new master: tasks ran after the failover had completed
    assert any(
        t > injector.ended
        for task in ("gateway.charge", "callbacks.callback")
        for t in stack.task_starts(task)
    )
    assert [name for name in stack.commands() if not stack.alive(name)] == [], (
        "a process died in the failover"
    )


def _active_beat(stack) -> str:
    holders = [name for name in ("beat-1", "beat-2") if "beat.lock_acquired" in stack.log(name)]
    assert len(holders) == 1, f"beats that took the lock: {holders}"
    return holders[0]


def _runs(stack, start: float, end: float) -> dict[str, int]:
    return {task: sum(start <= t < end for t in stack.task_starts(task)) for task in SWEEPS}


def test_two_beats_one_schedules_and_the_other_takes_over(sentinel_stack):
    stack = sentinel_stack
    stack.ensure_running()
    interval = 1.0  # BEAT_INTERVAL_SECONDS of the stack
    # both beats alive: each sweep runs once per interval, not twice
    time.sleep(1)
    start = time.time()
    time.sleep(6)
    end = time.time()
    periods = (end - start) / interval
    both_alive = _runs(stack, start, end)
    for task, runs in both_alive.items():
        # the upper bound is the check (two schedulers double it); the lower one only says the
        # sweeps ran, with room for a busy machine delaying ticks
        assert periods / 2 <= runs <= periods + 1, (
            f"{task} ran {runs} times in {periods:.1f} periods: {both_alive}"
        )
    active = _active_beat(stack)
    standby = "beat-2" if active == "beat-1" else "beat-1"

    killed = {}

    def kill_active_beat():
        killed["at"] = time.time()
        stack.kill(active)

    load = stack.load("beat-takeover")
    injector = Injector(4, kill_active_beat)
    load.run(count=20, spacing=0.15, during=injector)
    injector.join()
    # the standby takes the lock and the sweeps resume within 60 s (it retries every 5 s)
    wait_for(lambda: "beat.lock_acquired" in stack.log(standby), 60, f"{standby} to take the lock")
    resumed = wait_for(
        lambda: [t for t in stack.task_starts("orders.sweep_orders") if t > killed["at"] + 0.5],
        60,
        "sweeps to resume",
    )
    assert resumed[0] - killed["at"] < 60
    report = harness.verify(
        load,
        fault="kill-9:active-beat",
        faults_injected=1,
        in_flight=in_flight_at(stack, load, killed["at"]),
        webhook_secret=stack.webhook_secret,
    )
    assert_clean(report)
    # and the survivor alone schedules once per interval
    time.sleep(1)
    start = time.time()
    time.sleep(3)
    alone = _runs(stack, start, time.time())
    assert all(1 <= runs <= 4 for runs in alone.values()), alone


def test_rabbitmq_quorum_queues_worker_killed_mid_charge(rabbit_stack):
    """A gateway worker dies (its pool child killed right after the provider took the charge,
    then the whole worker): RabbitMQ hands its unacked message to the other host's worker, whose
    retry of the charge reuses the idempotency key, so the provider charges once."""
    stack = rabbit_stack
    name = "worker-gateway-a"
    stack.arm(name, "charge.after_provider")
    stack.kill(name)  # restarted below with the point
    stack.ensure_running()
    queues = stack.node.queues()
    assert {queue: queues.get(queue) for queue in QUEUES} == dict.fromkeys(QUEUES, "quorum"), queues
    marker = stack.point_dir / "charge.after_provider.fired"

    def kill_worker_once_its_child_died():
        wait_for(lambda: marker.exists() and marker.read_text().strip(), 30, "the charge window")
        pid, at = marker.read_text().split()
        stack.kill(name)  # and the worker's main process with it: its connection to RabbitMQ closes
        return int(pid), float(at)

    load = stack.load("rabbit-worker")
    injector = Injector(2, kill_worker_once_its_child_died)
    load.run(count=24, spacing=0.15, during=injector)
    child, _ = injector.join().evidence
    # the order the killed child was charging: started, never ended, in the charge window
    interrupted = {
        run["order"]
        for run in _runs_of(stack, child)
        if run["task"] == "gateway.charge" and run["end"] is None
    }
    assert interrupted, "the killed child was not charging anything"
    report = harness.verify(
        load, fault="kill-9:rabbit-gateway-worker", faults_injected=1, in_flight=interrupted,
        webhook_secret=stack.webhook_secret,
    )  # fmt: skip
    assert_clean(report)
    stack.env.pop(f"POINTS_{name}")  # the next start of the worker carries no point


def _runs_of(stack, pid: int) -> list[dict]:
    """The task runs process `pid` wrote markers for; `end` None: it died running it."""
    runs: dict[str, dict] = {}
    for line in (stack.task_dir / f"{pid}.log").read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # cut short by kill -9
            continue
        if record["ev"] == "start":
            runs[record["id"]] = {"task": record["task"], "order": record["order"], "end": None}
        elif record["id"] in runs:
            runs[record["id"]]["end"] = record["t"]
    return list(runs.values())


def test_rabbitmq_two_hosts_one_sigkilled_mid_load(rabbit_stack):
    stack = rabbit_stack
    stack.ensure_running()
    host_a = [f"worker-{queue}-a" for queue in QUEUES]
    killed = {}

    def kill_host_a():
        killed["at"] = time.time()
        for name in host_a:
            stack.kill(name)

    load = stack.load("rabbit-host")
    injector = Injector(8, kill_host_a)
    load.run(count=24, spacing=0.15, during=injector)
    injector.join()
    report = harness.verify(
        load,
        fault="kill-9:rabbit-host-a",
        faults_injected=1,
        in_flight=in_flight_at(stack, load, killed["at"]),
        webhook_secret=stack.webhook_secret,
    )
    assert_clean(report)
    # host b alone finished the load: every queue still had a consumer
    assert {f"{queue}@host-b" for queue in QUEUES} <= stack.workers()
    assert_queue_depths_scraped(stack)
