"""The beat sweeps hold off a stage whose queue is already deep: an overdue order or refund is most
likely waiting in it, and a second message behind the first would only deepen an overloaded
queue. Held rows are looked at again a stage timeout later, their check not counted; a shallow
queue, SWEEP_HOLD_QUEUE_DEPTH = 0 or a broker that cannot be read re-announce as before.

The queues are real: the test broker's Redis lists, which no worker reads outside tests/e2e."""

from datetime import timedelta

import pytest
from django.utils import timezone

from core.redis import get_broker_redis
from orders import events, services
from orders.models import Order, OrderStatus, OutboxEvent, Refund
from tests.factories import OrderFactory, overdue_refund

pytestmark = pytest.mark.django_db

QUEUES = ("orders", "allocation", "gateway", "callbacks")


@pytest.fixture
def broker(settings):
    settings.SWEEP_HOLD_QUEUE_DEPTH = 3
    client = get_broker_redis()
    client.delete(*QUEUES)
    yield client
    client.delete(*QUEUES)


def _overdue(status: str, **fields) -> Order:
    order = OrderFactory(status=status, **fields)
    Order.objects.filter(pk=order.pk).update(next_check_at=timezone.now() - timedelta(seconds=1))
    return Order.objects.get(pk=order.pk)


def _due_again(model, pk) -> None:
    model.objects.filter(pk=pk).update(next_check_at=timezone.now() - timedelta(seconds=1))


def _announced(order_id) -> list[str]:
    return list(OutboxEvent.objects.filter(order_id=order_id).order_by("id").values_list("topic", flat=True))


def test_an_overdue_order_is_held_while_its_stages_queue_is_deep_and_re_announced_once_it_is_not(
    broker, settings
):
    order = _overdue(OrderStatus.ASSIGNED, channel="sandbox-a")
    broker.rpush("gateway", "m1", "m2", "m3")  # three messages waiting for the charge stage
    before = timezone.now()

    assert services.orders_sweep(batch=10) == 0
    held = Order.objects.get(pk=order.pk)
    assert _announced(order.pk) == []
    assert held.check_count == 0  # holding is not a check: the backoff is not spent
    timeout = timedelta(seconds=settings.STAGE_TIMEOUT_SECONDS["assigned"])
    assert before + timeout <= held.next_check_at <= timezone.now() + timeout

    broker.lpop("gateway")  # two left: below the limit
    _due_again(Order, order.pk)
    assert services.orders_sweep(batch=10) == 1
    assert _announced(order.pk) == [events.CHANNEL_ALLOCATED]
    assert Order.objects.get(pk=order.pk).check_count == 1


def test_a_deep_queue_holds_back_only_the_orders_bound_for_it(broker):
    bound_for_gateway = _overdue(OrderStatus.ASSIGNED, channel="sandbox-a")
    bound_for_allocation = _overdue(OrderStatus.PENDING)
    broker.rpush("gateway", "m1", "m2", "m3")

    assert services.orders_sweep(batch=10) == 1
    assert _announced(bound_for_gateway.pk) == []
    assert _announced(bound_for_allocation.pk) == [events.ORDER_CREATED]


def test_a_deep_queue_holds_back_an_overdue_refund_too(broker):
    refund_id = overdue_refund("pending").pk
    refunds_announced = OutboxEvent.objects.filter(topic=events.REFUND_CREATED).count
    before = refunds_announced()
    broker.rpush("gateway", "m1", "m2", "m3")  # the refund stage runs on the gateway queue

    assert services.refunds_sweep(batch=10) == 0
    assert refunds_announced() == before
    assert Refund.objects.get(pk=refund_id).check_count == 0

    broker.delete("gateway")
    _due_again(Refund, refund_id)
    assert services.refunds_sweep(batch=10) == 1
    assert refunds_announced() == before + 1


def test_a_limit_of_zero_never_holds(broker, settings):
    settings.SWEEP_HOLD_QUEUE_DEPTH = 0
    order = _overdue(OrderStatus.ASSIGNED, channel="sandbox-a")
    broker.rpush("gateway", *[f"m{i}" for i in range(50)])

    assert services.orders_sweep(batch=10) == 1
    assert _announced(order.pk) == [events.CHANNEL_ALLOCATED]


def test_a_broker_that_cannot_be_read_holds_nothing_back(broker, settings):
    order = _overdue(OrderStatus.ASSIGNED, channel="sandbox-a")
    broker.rpush("gateway", "m1", "m2", "m3")
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    get_broker_redis.cache_clear()
    try:
        assert services.orders_sweep(batch=10) == 1
    finally:
        get_broker_redis.cache_clear()
    assert _announced(order.pk) == [events.CHANNEL_ALLOCATED]
