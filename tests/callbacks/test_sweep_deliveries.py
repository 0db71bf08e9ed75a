"""The callback sweep queues each due callback once, not at every beat pass while it waits its
turn, and holds off while the callbacks queue is deep (SPEC 8, 9).

Found by a soak: with the callbacks workers behind (their parent killed for 12 s), every pass
queued every due delivery again; the queue grew by itself to 45,000 messages for 830 deliveries,
with no load, and the orders sweep then held every paid order behind it.

The queue is real: the test broker's Redis list, which no worker reads outside tests/e2e."""

from datetime import timedelta

import pytest
from django.utils import timezone

from callbacks import services
from callbacks.models import CallbackDelivery
from callbacks.tasks import sweep_deliveries
from core.broker import queue_depths, redis_queue_keys
from core.redis import get_broker_redis
from tests.factories import make_paid_order

pytestmark = pytest.mark.django_db


@pytest.fixture
def callbacks_queue(settings):
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = True
    client = get_broker_redis()
    keys = redis_queue_keys("callbacks")
    client.delete(*keys)
    yield lambda: queue_depths()["callbacks"]
    client.delete(*keys)


def due_delivery(url: str = "http://127.0.0.1:9/hook") -> CallbackDelivery:
    """A paid order whose callback failed once and whose retry is due now."""
    _, order = make_paid_order(url)
    services.callback_deliver(order_id=order.pk)  # refused: port 9 listens to nobody
    delivery = CallbackDelivery.objects.get(order=order)
    CallbackDelivery.objects.filter(pk=delivery.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    return delivery


def test_a_due_callback_is_queued_once_while_it_waits_its_turn(callbacks_queue):
    # given three due callbacks
    due = [due_delivery() for _ in range(3)]
    # when beat passes five times and no worker has taken them yet
    sent = [sweep_deliveries.run() for _ in range(5)]
    # then each was queued once (before: once per pass, 15 messages)
    assert sent == [3, 0, 0, 0, 0]
    assert callbacks_queue() == 3
    assert all(CallbackDelivery.objects.get(pk=d.pk).announced_at for d in due)


def test_one_queued_a_lease_ago_and_never_taken_is_queued_again(callbacks_queue, settings):
    # given a due callback queued longer ago than an attempt's lease (its message lost with Redis)
    delivery = due_delivery()
    assert sweep_deliveries.run() == 1
    lease = settings.CALLBACK_TOTAL_TIMEOUT + services.LEASE_EXTRA_SECONDS
    CallbackDelivery.objects.filter(pk=delivery.pk).update(
        announced_at=timezone.now() - timedelta(seconds=lease + 1)
    )
    # then the next pass queues it again
    assert sweep_deliveries.run() == 1
    assert callbacks_queue() == 2


def test_an_attempt_clears_the_mark_so_the_next_retry_is_queued_when_due(callbacks_queue):
    # given a due callback the sweep queued, and its attempt, which fails again
    delivery = due_delivery()
    assert sweep_deliveries.run() == 1
    assert services.callback_deliver(order_id=delivery.order_id) is False
    after_attempt = CallbackDelivery.objects.get(pk=delivery.pk)
    assert (after_attempt.attempts, after_attempt.announced_at) == (2, None)
    # when its retry falls due, well within a lease of the first queuing
    CallbackDelivery.objects.filter(pk=delivery.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    # then it is queued at once
    assert sweep_deliveries.run() == 1


def test_nothing_is_queued_while_the_callbacks_queue_is_deep(callbacks_queue, settings):
    # given due callbacks, and a callbacks queue at the hold limit
    settings.SWEEP_HOLD_QUEUE_DEPTH = 3
    delivery = due_delivery()
    get_broker_redis().rpush("callbacks", "m1", "m2", "m3")
    # then the sweep queues nothing and marks nothing (before: one more message per due callback)
    assert sweep_deliveries.run() == 0
    assert callbacks_queue() == 3
    assert CallbackDelivery.objects.get(pk=delivery.pk).announced_at is None
    # and once the queue is shallower, it queues them
    get_broker_redis().lpop("callbacks")
    assert sweep_deliveries.run() == 1


def test_an_operators_resend_is_queued_at_once_even_just_after_the_sweep_queued_it(callbacks_queue):
    # given a due callback the sweep has just queued
    delivery = due_delivery()
    assert sweep_deliveries.run() == 1
    # when an operator resends it
    services.callback_resend(delivery=CallbackDelivery.objects.get(pk=delivery.pk))
    # then the next pass queues it (before: not until a lease after the sweep's queuing)
    assert sweep_deliveries.run() == 1
