"""Retention (SPEC 12): history-only rows older than RETENTION_DAYS go, in bounded batches through
indexes; orders, transitions, charge attempts, deliveries and unpublished events stay."""

import re
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from callbacks import services as callback_services
from callbacks import tasks as callback_tasks
from callbacks.models import CallbackAttempt, CallbackDelivery
from gateway import services as gateway_services
from gateway import tasks as gateway_tasks
from gateway.models import ProviderWebhook
from orders import services as order_services
from orders import tasks as order_tasks
from orders.models import IgnoredSignal, Order, OrderTransition, OutboxEvent
from tests.factories import OrderFactory, make_paid

pytestmark = pytest.mark.django_db

OLD = timedelta(days=31)
RECENT = timedelta(days=29)


@pytest.fixture
def history():
    """An old paid order with, on each side of a 30-day cutoff, rows of every history table."""
    order = OrderFactory()
    make_paid(order.pk)
    now = timezone.now()
    rows = {"old": {}, "recent": {}}
    for side, age, count in (("old", OLD, 5), ("recent", RECENT, 2)):
        at = now - age
        events = [
            OutboxEvent.objects.create(topic="order-updated", order_id=order.pk, payload={}, published_at=at)
            for _ in range(count)
        ]
        signals = [
            IgnoredSignal.objects.create(
                order=order, status_at_signal="paid", requested_status="failed", reason="t"
            )
            for _ in range(count)
        ]
        IgnoredSignal.objects.filter(pk__in=[s.pk for s in signals]).update(created_at=at)
        hooks = [
            ProviderWebhook.objects.create(
                provider="sandbox",
                webhook_id=uuid.uuid4().hex,
                order=order,
                event_type="charge.paid",
                payload={},
            )
            for _ in range(count)
        ]
        ProviderWebhook.objects.filter(pk__in=[h.pk for h in hooks]).update(received_at=at)
        delivery = CallbackDelivery.objects.create(
            order=order, event_type=f"order.paid.{side}", webhook_id=uuid.uuid4().hex
        )
        attempts = [
            CallbackAttempt.objects.create(delivery=delivery, url="http://x/", attempted_at=at, latency_ms=1)
            for _ in range(count)
        ]
        rows[side] = {
            OutboxEvent: {e.pk for e in events},
            IgnoredSignal: {s.pk for s in signals},
            ProviderWebhook: {h.pk for h in hooks},
            CallbackAttempt: {a.pk for a in attempts},
        }
    # an event the relay still owes: never pruned, however old
    unpublished = OutboxEvent.objects.create(topic="order-created", order_id=order.pk, payload={})
    OutboxEvent.objects.filter(pk=unpublished.pk).update(created_at=now - OLD * 3)
    rows["recent"][OutboxEvent].add(unpublished.pk)
    Order.objects.filter(pk=order.pk).update(created_at=now - OLD * 3)
    rows["order"] = order
    rows["transitions"] = OrderTransition.objects.filter(order=order).count()
    return rows


def left(model, ids) -> set:
    return set(model.objects.filter(pk__in=ids).values_list("pk", flat=True))


def prune_all(before, batch, max_batches) -> dict[str, int]:
    done = {}
    for prune in (
        order_services.history_prune,
        gateway_services.webhooks_prune,
        callback_services.attempts_prune,
    ):
        done.update(prune(before=before, batch=batch, max_batches=max_batches))
    return done


def test_a_pass_deletes_old_history_in_bounded_batches_and_keeps_the_rest(history):
    before = timezone.now() - timedelta(days=30)
    # batches of 2, at most 2 per pass: 4 of each table's 5 old rows go, oldest first
    first = prune_all(before, batch=2, max_batches=2)
    assert first == {"outbox": 4, "ignored_signals": 4, "provider_webhooks": 4, "callback_attempts": 4}
    for model, ids in history["old"].items():
        assert len(left(model, ids)) == 1, model
    # the next pass takes the rest and stops at its first short batch
    second = prune_all(before, batch=2, max_batches=2)
    assert set(second.values()) == {1}
    for model, ids in history["old"].items():
        assert left(model, ids) == set(), model
    # the recent side, the unpublished event, the order and its transition log are all there
    for model, ids in history["recent"].items():
        assert left(model, ids) == ids, model
    assert Order.objects.filter(pk=history["order"].pk).exists()
    assert OrderTransition.objects.filter(order=history["order"]).count() == history["transitions"] > 0
    assert CallbackDelivery.objects.filter(order=history["order"]).count() == 2
    assert set(prune_all(before, batch=2, max_batches=2).values()) == {0}


def test_the_beat_tasks_prune_with_retention_days(history, settings):
    settings.RETENTION_DAYS = 30
    settings.RETENTION_BATCH = 3
    settings.RETENTION_MAX_BATCHES = 10
    settings.RETENTION_TASKS = ()  # the others are called below instead of through the broker
    assert order_tasks.prune_history() == {"outbox": 5, "ignored_signals": 5}
    assert gateway_tasks.prune_history() == {"provider_webhooks": 5}
    assert callback_tasks.prune_history() == {"callback_attempts": 5}
    for model, ids in history["recent"].items():
        assert left(model, ids) == ids, model
    settings.RETENTION_DAYS = 28  # a shorter retention reaches the recent side too
    assert order_tasks.prune_history()["ignored_signals"] == 2


@pytest.mark.parametrize(
    ("sql", "index"),
    [
        (order_services._PRUNE_OUTBOX_SQL, "outbox_published"),
        (order_services._PRUNE_IGNORED_SQL, "ignoredsignal_created"),
        (gateway_services._PRUNE_WEBHOOKS_SQL, "providerwebhook_received"),
        (callback_services._PRUNE_ATTEMPTS_SQL, "callback_attempted"),
    ],
)
def test_each_batch_finds_its_rows_through_an_index(sql, index):
    """The plan PostgreSQL would use once the table is big (sequential scans priced out): a range
    scan of the time index, so a batch reads its rows and stops, whatever the table's size."""
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("EXPLAIN " + sql, {"before": timezone.now(), "batch": 100})
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert re.search(rf"Index Scan (using|on) {index}\b", plan), plan
    assert "Seq Scan" not in plan, plan
