"""SPEC 10 under fire (issue 12): kill -9 of the gateway worker's pool child in each refund window,
Redis lost mid-refund, every refund delivered three times.

Each test pays a few orders, asks for refunds of them over the API (full and partial, rows of SPEC
10's table: succeeded, declined, settled by polling, timed out but made, 503 first), injects its
fault, lets the system recover on its own, then checks every refund and order (harness.
verify_refunds): 0 lost, 0 double refunds (at most one ledger entry per refund key, none under a
key of no refund, never more than charged), every refund settled as its row says and called back,
the sandbox ledger's sum per order equal to its `amount_refunded`.

As in test_faults.py, each test proves from the processes' own evidence (fault-point markers, task
markers, the refunds' transition logs) that its fault struck refunds in flight, and prints one
line of counts.
"""

import time
from collections import Counter

import pytest

from tests.faults import harness
from tests.faults.harness import Armer, verify_refunds, wait_for
from tests.faults.test_faults import Injector, assert_dead

pytestmark = [pytest.mark.faults]

ORDERS = 6  # one per plan of harness.REFUND_PLANS: 11 refunds


def assert_refunds_clean(report: harness.RefundReport) -> None:
    assert report.faults_injected > 0, f"{report.fault}: the fault was never injected"
    assert report.in_flight > 0, f"{report.fault}: no refund was in flight through the fault"
    assert report.recovered > 0, (
        f"{report.fault}: no refund that went through the fault recovered: " + "\n".join(report.problems)
    )
    assert (report.lost, report.double_refunds, report.ledger_mismatches) == (0, 0, 0), "\n".join(
        report.problems
    )
    assert report.problems == []


# Each refund fault point, and where the refund stands (by its transition log) when the pool
# child running its `gateway.refund` dies there. After the commit the refund is processing (or,
# when the provider's webhook outran the death, settled), or still pending when the provider
# answered 503 and the retry's due time was what got committed.
REFUND_POINTS = {
    "refund.before_provider": {"pending"},
    "refund.after_provider": {"pending"},
    "refund.after_commit": {"pending", "processing", "succeeded", "failed"},
}
# After the provider answered and before our commit, the provider's webhook can settle the refund
# first (a CI run saw it settled while the pool child was still alive at this point): allowed only
# where the refund's log shows the webhook did it.
OUTRUN_BY_WEBHOOK = {"refund.after_provider": {"processing", "succeeded", "failed"}}


def killed_refunds(faults, point: str, fired: list[tuple[int, float]]) -> set[str]:
    """The refunds each killed pool child was sending, checked to be in the point's window."""
    in_flight: set[str] = set()
    for pid, at in fired:
        runs = [run for run in harness.interrupted_runs(pid) if run.task == "gateway.refund"]
        assert runs, f"pid {pid} died at {point} but its task markers show no unfinished refund"
        for run in runs:
            log = harness.refund_logs(faults.sql, [run.refund])[run.refund]
            status = harness.refund_status_at(log, at)
            outran = status in OUTRUN_BY_WEBHOOK.get(point, ()) and harness.outran_by_webhook(
                faults.sql, "refund", run.refund
            )
            assert status in REFUND_POINTS[point] or outran, (
                f"{run.refund} was {status} when pid {pid} died: {log}"
            )
            if point == "refund.after_commit":
                # the provider's answer was recorded before the death
                ((sends,),) = faults.sql(
                    "SELECT sends FROM gateway_refundattempt WHERE refund_id = %s", (run.refund,)
                )
                assert sends >= 1, f"{run.refund}: died after commit but no answer was recorded"
            in_flight.add(run.refund)
    return in_flight


@pytest.mark.parametrize("point", list(REFUND_POINTS))
def test_gateway_worker_killed_in_a_refund_window(faults, point):
    # given paid orders, and the point armed in the gateway worker
    load = harness.RefundLoad(api_key=faults.api_key, scenario=point, receiver=faults.receiver)
    load.paid_orders(ORDERS)
    with Armer(point, times=2) as armer:
        # when refunds are asked for and the pool child sending one dies there, twice
        load.run_refunds()
        wait_for(lambda: len(armer.fired) == 2, 60, f"{point} to fire twice")
    assert_dead(armer.fired)
    in_flight = killed_refunds(faults, point, armer.fired)
    # then the message comes back (acks_late) or the refund sweep sends it again under the same
    # key once the dead sender's lease is out: each refund is made once and settles
    report = verify_refunds(
        load,
        sql=faults.sql,
        fault=f"kill-9:{point}",
        faults_injected=len(armer.fired),
        in_flight=in_flight,
        webhook_secret=faults.webhook_secret,
    )
    assert_refunds_clean(report)


def test_redis_lost_mid_refund(faults):
    # given paid orders, and Redis dies while their refunds go through, coming back empty
    load = harness.RefundLoad(api_key=faults.api_key, scenario="refund-redis", receiver=faults.receiver)
    load.paid_orders(ORDERS)
    before = faults.redis.client().info("server")["run_id"]

    def wipe():
        faults.redis.kill()
        faults.redis.wipe()
        empty = not any(faults.redis.dir.iterdir())
        time.sleep(1)
        faults.redis.start()
        return empty and faults.redis.client().info("server")["run_id"] != before

    injector = Injector(3, wipe)
    load.run_refunds(spacing=0.15, during=injector)
    injector.join()
    assert injector.evidence, "Redis was not seen replaced by a new, empty server"
    # the refunds that were asked for and not yet settled while Redis was away: their queued
    # stage messages, unacked ones and webhook hand-offs were lost with it
    in_flight = harness.refunds_unsettled_during(faults.sql, load.refunds, injector.started, injector.ended)
    # then the outbox relay and the refund sweep re-announce them; nothing is refunded twice
    report = verify_refunds(
        load,
        sql=faults.sql,
        fault="redis-killed-restarted-empty:refunds",
        faults_injected=int(bool(injector.evidence)),
        in_flight=in_flight,
        webhook_secret=faults.webhook_secret,
    )
    assert_refunds_clean(report)


def test_every_refund_delivered_three_times_two_at_once(faults):
    """Each refund's `gateway.refund` message is replaced by three copies: the gateway worker's two
    pool children take two at the same moment (the probe holds each at its start until its twin
    has started too), the third runs after. One ledger entry per refund, never a second."""
    stack, broker = faults.stack, faults.redis.client()
    load = harness.RefundLoad(api_key=faults.api_key, scenario="refund-dups", receiver=faults.receiver)
    load.paid_orders(ORDERS)
    # given beat and the gateway worker stopped: refund messages wait, no sweep re-announces them
    for name in ("beat", "worker-gateway"):
        stack.stop(name)
    load.run_refunds(spacing=0)
    ids = list(load.refunds)
    harness.RENDEZVOUS.touch()
    try:
        broker.delete("gateway")  # the original messages, replaced by three copies each
        for refund in load.refunds.values():
            message = {"order_id": refund["order_id"], "payload": {"refund_id": refund["id"]}}
            for _ in range(3):
                stack.send_task("gateway.refund", message)
        stack.start("worker-gateway")

        def all_copies_ran() -> bool:
            ended = Counter(run.refund for run in harness.task_runs() if run.end is not None)
            return all(ended[i] >= 3 for i in ids)

        wait_for(all_copies_ran, 60, "three copies of every refund's stage to have run")
    finally:
        harness.RENDEZVOUS.unlink(missing_ok=True)
        stack.start("beat")  # the 503 row's retry and the polled row need the sweep
    runs = [run for run in harness.task_runs() if run.refund in load.refunds and run.task == "gateway.refund"]
    copies = sum(max(0, sum(1 for run in runs if run.refund == i) - 1) for i in ids)
    overlapped = harness.overlapping_copies(runs, "gateway.refund", by="refund")
    assert overlapped == set(ids), f"copies of {len(ids) - len(overlapped)} refunds never overlapped"
    report = verify_refunds(
        load,
        sql=faults.sql,
        fault="duplicate-refund-delivery-x3",
        faults_injected=copies,
        in_flight=overlapped,
        webhook_secret=faults.webhook_secret,
    )
    assert_refunds_clean(report)
