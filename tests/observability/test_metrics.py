"""GET /metrics: Prometheus text whose counters move with the pipeline, and scrape-time gauges."""

import os
import subprocess
import sys

import pytest
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

from allocation.services import order_allocate
from callbacks.services import callback_deliver
from gateway.models import ChargeAttempt
from gateway.services import order_charge, order_confirm
from orders.models import OutboxEvent

# Transitions are counted when they commit, so these tests commit (and flush afterwards).
pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"amount": 1050, "currency": "USD", "reference": "metrics-1"}


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_creating_an_order_moves_the_created_and_transition_counters(client, api):
    before = scrape(client)

    response = api.post("/api/v1/orders", BODY, format="json", HTTP_IDEMPOTENCY_KEY="m-1")
    assert response.status_code == 201
    api.post("/api/v1/orders", BODY, format="json", HTTP_IDEMPOTENCY_KEY="m-1")  # a replay creates nothing

    after = scrape(client)
    assert value(after, "orders_created_total") - value(before, "orders_created_total") == 1
    created = {"from": "none", "to": "pending"}
    assert (
        value(after, "order_transitions_total", **created)
        - value(before, "order_transitions_total", **created)
        == 1
    )
    assert value(after, "orders_open", status="pending") == value(before, "orders_open", status="pending") + 1


def test_each_stage_moves_its_counter_and_the_stage_histogram(client, api, accepting_channel, settings):
    # given
    settings.CALLBACK_RETRY_SCHEDULE = [60]
    order_id = api.post("/api/v1/orders", BODY, format="json", HTTP_IDEMPOTENCY_KEY="m-2").json()["id"]
    before = scrape(client)

    # when: allocate, charge, confirm, one callback attempt (127.0.0.1:9 refuses)
    order_allocate(order_id=order_id)
    order_charge(order_id=order_id)
    order_confirm(
        order_id=order_id,
        idempotency_key=ChargeAttempt.objects.get(order_id=order_id).idempotency_key,
        status="paid",
        source="test",
    )
    callback_deliver(order_id=order_id)

    # then
    after = scrape(client)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("order_transitions_total", **{"from": "pending", "to": "assigned"}) == 1
    assert moved("order_transitions_total", **{"from": "assigned", "to": "processing"}) == 1
    assert moved("order_transitions_total", **{"from": "processing", "to": "paid"}) == 1
    assert moved("charge_attempts_total", result="accepted", channel="accepting-a") == 1
    assert moved("charge_attempts_total", result="paid", channel="accepting-a") == 1
    assert moved("callback_attempts_total", result="error") == 1
    for stage in ("assigned", "processing", "paid"):
        assert moved("order_stage_seconds_count", stage=stage) == 1
        assert moved("order_stage_seconds_bucket", stage=stage, le="+Inf") == 1


def test_a_duplicate_confirmation_is_not_counted_again(client, api, accepting_channel):
    order_id = api.post("/api/v1/orders", BODY, format="json", HTTP_IDEMPOTENCY_KEY="m-3").json()["id"]
    order_allocate(order_id=order_id)
    order_charge(order_id=order_id)
    key = ChargeAttempt.objects.get(order_id=order_id).idempotency_key
    order_confirm(order_id=order_id, idempotency_key=key, status="paid", source="test")
    before = scrape(client)

    order_confirm(order_id=order_id, idempotency_key=key, status="paid", source="test")
    order_confirm(order_id=order_id, idempotency_key=key, status="failed", source="late webhook")

    after = scrape(client)
    for result in ("paid", "failed"):
        labels = {"result": result, "channel": "accepting-a"}
        assert value(after, "charge_attempts_total", **labels) == value(
            before, "charge_attempts_total", **labels
        )


@pytest.mark.django_db  # no commit: the event stays unpublished in the outbox
def test_outbox_backlog_is_read_when_scraped(client, api):
    before = value(scrape(client), "outbox_backlog")
    api.post("/api/v1/orders", BODY, format="json", HTTP_IDEMPOTENCY_KEY="m-4")

    # in a test transaction nothing is published: the order-created event waits in the outbox
    assert OutboxEvent.objects.filter(published_at__isnull=True).count() == before + 1
    assert value(scrape(client), "outbox_backlog") == before + 1


def test_queue_depth_is_the_length_of_each_queue_in_redis(client, settings, redis_client):
    settings.SERVICE_QUEUES = ("metrics-test-q1", "metrics-test-q2")
    redis_client.delete("metrics-test-q1", "metrics-test-q2", "metrics-test-q1\x06\x163")
    try:
        redis_client.rpush("metrics-test-q1", "a", "b")
        redis_client.rpush("metrics-test-q1\x06\x163", "c")  # a priority sub-queue counts too

        samples = scrape(client)
    finally:
        redis_client.delete("metrics-test-q1", "metrics-test-q2", "metrics-test-q1\x06\x163")

    assert value(samples, "celery_queue_depth", queue="metrics-test-q1") == 3
    assert value(samples, "celery_queue_depth", queue="metrics-test-q2") == 0


def test_an_empty_multiprocess_directory_variable_means_in_process_metrics(tmp_path):
    # prometheus-client alone would take "" as a directory and write its files into the cwd
    script = (
        "import django; django.setup()\n"
        "from core import metrics\n"
        "metrics.ORDERS_CREATED.inc()\n"
        "from prometheus_client import values\n"
        "print(values.ValueClass.__name__)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": "", "PYTHONPATH": str(settings.BASE_DIR)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "MutexValue"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.django_db
def test_the_orders_that_need_a_person_and_exhausted_callbacks_are_gauges(client, settings):
    # given one order of each kind the dashboard lists for a person, and an exhausted callback
    from datetime import timedelta

    from django.utils import timezone

    from callbacks.models import CallbackDelivery
    from orders.models import Order
    from tests.factories import OrderFactory

    settings.POLL_MAX_COUNT = 20
    before = scrape(client)
    now = timezone.now()
    gave_up, overdue, unanswered = (OrderFactory(status="processing", channel="sandbox-a") for _ in range(3))
    Order.objects.filter(pk=gave_up.pk).update(next_check_at=None)
    Order.objects.filter(pk=overdue.pk).update(next_check_at=now - timedelta(minutes=10))
    Order.objects.filter(pk=unanswered.pk).update(next_check_at=now + timedelta(minutes=30), check_count=5)
    CallbackDelivery.objects.create(
        order=gave_up, event_type="order.paid", webhook_id="msg_exhausted", status="exhausted", attempts=7
    )
    # when scraped, then each is counted where an alert can see it (before: only on the dashboard,
    # whose list stopped at 50)
    after = scrape(client)
    for why in ("gave_up", "overdue", "unanswered"):
        assert (
            value(after, "orders_needing_a_person", why=why)
            == value(before, "orders_needing_a_person", why=why) + 1
        )
    assert value(after, "callback_deliveries_exhausted") == value(before, "callback_deliveries_exhausted") + 1
