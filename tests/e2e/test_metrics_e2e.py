"""GET /metrics on the live stack, scraped before and after a known set of orders runs through
the whole pipeline: the counters move by exactly what those orders did (SPEC 8).

The web's /metrics sums every process of the stack (gunicorn workers and each Celery worker's
pool, prometheus-client multiprocess mode), so this also proves the stages' counters, bumped in
the workers, reach the scrape. Other tests of the package share the stack, and run one at a
time: the "before" scrape waits for the counters to stand still, and the deltas are exact.
"""

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import WEB, Client, path_of, sandbox_charges, wait_for
from tests.factories import make_merchant

pytestmark = [pytest.mark.e2e]

P, AS, PR, PD, F, C = "pending", "assigned", "processing", "paid", "failed", "completed"
A, B = "sandbox-a", "sandbox-b"
COUNTERS = ("_total", "_count", "_bucket", "_sum")

# amount (SPEC 5) -> (outcome, the transition path it must take, callback answers before a 200)
ORDERS = {
    1010: (PD, [(None, P, None), (P, AS, A), (AS, PR, A), (PR, PD, A), (PD, C, A)], []),
    1020: (PD, [(None, P, None), (P, AS, A), (AS, PR, A), (PR, PD, A), (PD, C, A)], [503]),
    1051: (F, [(None, P, None), (P, AS, A), (AS, PR, A), (PR, F, A), (F, C, A)], []),  # declined
    1071: (PD, [(None, P, None), (P, AS, A), (AS, AS, B), (AS, PR, B), (PR, PD, B), (PD, C, B)], []),
    1072: (F, [(None, P, None), (P, AS, A), (AS, AS, B), (AS, F, B), (F, C, B)], []),  # all 503
}

# What those five orders must add, derived from the paths above and SPEC 5's table.
EXPECTED = {
    ("orders_created_total", ()): 5,
    # transitions by from/to
    ("order_transitions_total", (("from", "none"), ("to", P))): 5,
    ("order_transitions_total", (("from", P), ("to", AS))): 5,
    ("order_transitions_total", (("from", AS), ("to", AS))): 2,
    ("order_transitions_total", (("from", AS), ("to", PR))): 4,
    ("order_transitions_total", (("from", AS), ("to", F))): 1,
    ("order_transitions_total", (("from", PR), ("to", PD))): 3,
    ("order_transitions_total", (("from", PR), ("to", F))): 1,
    ("order_transitions_total", (("from", PD), ("to", C))): 3,
    ("order_transitions_total", (("from", F), ("to", C))): 2,
    # the provider's answer to each charge request, then its final word, by channel
    ("charge_attempts_total", (("channel", A), ("result", "accepted"))): 3,
    ("charge_attempts_total", (("channel", A), ("result", "rejected"))): 2,
    ("charge_attempts_total", (("channel", B), ("result", "accepted"))): 1,
    ("charge_attempts_total", (("channel", B), ("result", "rejected"))): 1,
    ("charge_attempts_total", (("channel", A), ("result", "paid"))): 2,
    ("charge_attempts_total", (("channel", A), ("result", "failed"))): 1,
    ("charge_attempts_total", (("channel", B), ("result", "paid"))): 1,
    # one callback per order, and the 503 before 1020's
    ("callback_attempts_total", (("result", "success"),)): 5,
    ("callback_attempts_total", (("result", "http_error"),)): 1,
    # one observation each time an order reaches a stage (a failover is not a new stage)
    ("order_stage_seconds_count", (("stage", AS),)): 5,
    ("order_stage_seconds_count", (("stage", PR),)): 4,
    ("order_stage_seconds_count", (("stage", PD),)): 3,
    ("order_stage_seconds_count", (("stage", F),)): 2,
    ("order_stage_seconds_count", (("stage", C),)): 5,
}


def scrape() -> dict[tuple[str, tuple], float]:
    response = requests.get(f"http://{WEB}/metrics", timeout=10)
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def counters(samples: dict) -> dict:
    return {key: value for key, value in samples.items() if key[0].endswith(COUNTERS)}


def quiet_scrape(settle: float = 1.5, timeout: float = 60) -> dict:
    """A scrape after which no counter moved for `settle` seconds and no queue holds work."""

    def still():
        first = scrape()
        time.sleep(settle)
        second = scrape()
        depth = sum(v for (name, _), v in second.items() if name == "celery_queue_depth")
        return second if counters(first) == counters(second) and depth == 0 else None

    return wait_for(still, timeout, "the stack's counters to stand still", interval=0)


def deltas(before: dict, after: dict) -> dict:
    keys = set(counters(before)) | set(counters(after))
    moved = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in keys}
    return {key: value for key, value in moved.items() if value}


def test_counters_move_by_exactly_what_the_orders_did(live, receiver):
    # given a quiet stack, and a callback endpoint per order (1020's answers 503 once)
    before = quiet_scrape()
    hooks = {amount: f"/hooks/metrics-{amount}" for amount in ORDERS}
    for amount, (_, _, refusals) in ORDERS.items():
        receiver.script(hooks[amount], [*refusals, 200])
    started = time.time()

    # when each order runs through the whole pipeline until its callback is taken
    orders = {}
    for amount in ORDERS:
        client = Client(make_merchant(callback_url=receiver.url(hooks[amount])).api_key)
        orders[amount] = (client, client.create(amount, "EUR" if amount == 1020 else "USD"))
    for amount, (client, order) in orders.items():
        outcome, path, refusals = ORDERS[amount]
        assert client.wait_status(order["id"], C, timeout=60)["outcome"] == outcome
        assert path_of(client.events(order["id"])) == path, amount
        assert len(receiver.received(hooks[amount])) == len(refusals) + 1
    assert len(sandbox_charges(orders[1071][1]["id"])) == 1
    assert sandbox_charges(orders[1072][1]["id"]) == []
    elapsed = time.time() - started

    # then, once every process has counted what it did, the counters moved by exactly that, and
    # nothing else moved (no charge of unknown outcome, no callback error, no extra transition)
    moved = deltas(before, quiet_scrape())
    timing = ("_sum", "_bucket")  # which bucket an observation falls in depends on the machine
    assert {key: value for key, value in moved.items() if not key[0].endswith(timing)} == {
        key: value for key, value in EXPECTED.items() if not key[0].endswith(timing)
    }
    # and the stage histogram holds together: every observation in the +Inf bucket, durations
    # positive and no longer than the run
    for stage in (AS, PR, PD, F, C):
        count = EXPECTED[("order_stage_seconds_count", (("stage", stage),))]
        assert moved[("order_stage_seconds_bucket", (("le", "+Inf"), ("stage", stage)))] == count
        assert 0 < moved[("order_stage_seconds_sum", (("stage", stage),))] <= count * elapsed
