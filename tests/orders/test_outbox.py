"""The transactional outbox (SPEC 1, 9): written with the change, published after commit, relayed."""

import base64
import json
from datetime import timedelta
from unittest import mock

import pytest
from django.db import transaction
from django.utils import timezone

from config.celery_app import app as celery_app
from orders import events
from orders.models import Order, OrderStatus, OutboxEvent
from orders.outbox import event_emit, outbox_relay
from orders.transitions import order_transition
from tests.factories import OrderFactory

# Real commits: on_commit hooks only fire when a transaction really commits.
pytestmark = pytest.mark.django_db(transaction=True)

QUEUES = ("orders", "allocation", "gateway", "callbacks")
URL = "/api/v1/orders"


@pytest.fixture(autouse=True)
def empty_queues(redis_client):
    """Celery's Redis transport keeps each queue as a Redis list named after it."""
    redis_client.delete(*QUEUES)
    yield
    redis_client.delete(*QUEUES)


def _messages(redis_client, queue: str, *order_ids) -> list[tuple[str, dict]]:
    """(task name, first argument) of the messages about `order_ids` waiting in `queue`."""
    wanted = {str(order_id) for order_id in order_ids}
    result = []
    for raw in redis_client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        if args[0]["order_id"] in wanted:
            result.append((envelope["headers"]["task"], args[0]))
    return result


def _drop(redis_client, queue: str, order_id) -> None:
    """Remove the messages about one order, as if a worker had taken them."""
    for raw in redis_client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        if json.loads(base64.b64decode(envelope["body"]))[0][0]["order_id"] == str(order_id):
            redis_client.lrem(queue, 0, raw)


def _create(api, reference: str = "inv-1"):
    return api.post(
        URL,
        {"amount": 1050, "currency": "USD", "reference": reference},
        format="json",
        HTTP_IDEMPOTENCY_KEY=f"key-{reference}",
    )


def _backdate(event: OutboxEvent, seconds: float) -> None:
    OutboxEvent.objects.filter(pk=event.pk).update(created_at=timezone.now() - timedelta(seconds=seconds))


def test_event_of_a_rolled_back_transaction_is_neither_stored_nor_published(redis_client):
    # given
    order = OrderFactory()
    # when: the transition's transaction fails after the event was written
    with pytest.raises(RuntimeError), transaction.atomic():
        order_transition(
            order_id=order.pk, to=OrderStatus.ASSIGNED, seen_status="pending", channel="ch-a", reason="x"
        )
        assert OutboxEvent.objects.filter(order_id=order.pk).count() == 1
        raise RuntimeError("the rest of the unit of work failed")
    # then
    assert not OutboxEvent.objects.filter(order_id=order.pk).exists()
    order.refresh_from_db()
    assert order.status == OrderStatus.PENDING
    assert all(_messages(redis_client, queue, order.pk) == [] for queue in QUEUES)


def test_event_is_not_published_before_commit(redis_client):
    order = OrderFactory()

    with transaction.atomic():
        event_emit(topic=events.ORDER_CREATED, order_id=order.pk, payload={"order_id": str(order.pk)})
        assert _messages(redis_client, "allocation", order.pk) == []

    assert len(_messages(redis_client, "allocation", order.pk)) == 1


def test_created_order_is_published_to_the_allocation_queue_after_commit(api, redis_client):
    # when
    response = _create(api)
    # then
    assert response.status_code == 201, response.content
    order_id = response.json()["id"]
    event = OutboxEvent.objects.get(order_id=order_id)
    assert event.topic == events.ORDER_CREATED
    assert event.published_at is not None
    assert _messages(redis_client, "allocation", order_id) == [
        (
            "allocation.allocate",
            {
                "event_id": event.id,
                "topic": events.ORDER_CREATED,
                "order_id": order_id,
                "payload": event.payload,
            },
        )
    ]
    assert event.payload["order_id"] == order_id
    assert event.payload["status"] == "pending"
    assert event.payload["request_id"] == response["X-Request-Id"]


def test_each_topic_goes_to_its_subscribers_queue(redis_client):
    # given
    order = OrderFactory()
    # when
    order_transition(
        order_id=order.pk, to=OrderStatus.ASSIGNED, seen_status="pending", channel="ch-a", reason="x"
    )
    order_transition(
        order_id=order.pk, to=OrderStatus.PROCESSING, seen_status="assigned", seen_channel="ch-a", reason="c"
    )
    order_transition(order_id=order.pk, to=OrderStatus.PAID, seen_status="processing", reason="paid")
    # then
    assert [task for task, _ in _messages(redis_client, "gateway", order.pk)] == ["gateway.charge"]
    assert [(task, m["payload"]["status"]) for task, m in _messages(redis_client, "callbacks", order.pk)] == [
        ("callbacks.callback", "paid")
    ]
    assert OutboxEvent.objects.filter(order_id=order.pk, published_at__isnull=True).count() == 0


def test_event_without_subscribers_is_stored_already_published(redis_client):
    # given: nobody listens to a processing order-updated that is not a redelivery
    order = OrderFactory(status=OrderStatus.ASSIGNED, channel="ch-a")
    assert events.subscribers_for(events.ORDER_UPDATED, {"status": "processing"}) == []
    # when
    order_transition(
        order_id=order.pk, to=OrderStatus.PROCESSING, seen_status="assigned", seen_channel="ch-a", reason="c"
    )
    # then
    event = OutboxEvent.objects.get(order_id=order.pk)
    assert event.topic == events.ORDER_UPDATED
    assert event.published_at is not None
    assert all(_messages(redis_client, queue, order.pk) == [] for queue in QUEUES)
    assert outbox_relay(older_than_seconds=0, batch=10) == 0


def test_relay_publishes_an_event_whose_publish_was_lost(api, redis_client):
    # given: an order whose event was committed but never reached the broker (crash after commit)
    order_id = _create(api).json()["id"]
    event = OutboxEvent.objects.get(order_id=order_id)
    OutboxEvent.objects.filter(pk=event.pk).update(published_at=None)
    _backdate(event, 60)
    _drop(redis_client, "allocation", order_id)
    # when
    relayed = outbox_relay(older_than_seconds=10, batch=100)
    # then
    assert relayed == 1
    event.refresh_from_db()
    assert event.published_at is not None
    assert [(task, m["order_id"]) for task, m in _messages(redis_client, "allocation", order_id)] == [
        ("allocation.allocate", order_id)
    ]
    # and a second run has nothing left to do
    assert outbox_relay(older_than_seconds=10, batch=100) == 0
    assert len(_messages(redis_client, "allocation", order_id)) == 1


def test_relay_leaves_young_events_to_their_own_publish(redis_client):
    # given: an unpublished event younger than the relay's age threshold (its on_commit may be running)
    order = OrderFactory()
    event = event_emit(topic=events.ORDER_CREATED, order_id=order.pk, payload={"order_id": str(order.pk)})
    OutboxEvent.objects.filter(pk=event.pk).update(published_at=None)
    _drop(redis_client, "allocation", order.pk)
    # when
    relayed = outbox_relay(older_than_seconds=30, batch=100)
    # then
    assert relayed == 0
    event.refresh_from_db()
    assert event.published_at is None
    assert _messages(redis_client, "allocation", order.pk) == []


def test_relay_works_through_more_events_than_one_batch(redis_client):
    # given: five lost events
    orders = OrderFactory.create_batch(5)
    for order in orders:
        event = event_emit(topic=events.ORDER_CREATED, order_id=order.pk, payload={"order_id": str(order.pk)})
        OutboxEvent.objects.filter(pk=event.pk).update(published_at=None)
        _backdate(event, 60)
        _drop(redis_client, "allocation", order.pk)
    # when
    relayed = outbox_relay(older_than_seconds=10, batch=2)
    # then
    assert relayed == 5
    assert not OutboxEvent.objects.filter(published_at__isnull=True).exists()
    assert sorted(
        m["order_id"] for _, m in _messages(redis_client, "allocation", *(o.pk for o in orders))
    ) == sorted(str(o.pk) for o in orders)


def test_broker_down_the_api_still_takes_the_order_and_the_relay_delivers_it_later(api, redis_client):
    # given: the broker refuses every publish (patched at Celery's boundary, not in our code)
    with mock.patch.object(celery_app, "send_task", side_effect=OSError("connection refused")):
        # when
        response = _create(api)
        # then: the order is taken, its event waits in the outbox
        assert response.status_code == 201, response.content
        order_id = response.json()["id"]
        event = OutboxEvent.objects.get(order_id=order_id)
        assert event.published_at is None
        # and a relay run during the outage publishes nothing and loses nothing
        _backdate(event, 60)
        assert outbox_relay(older_than_seconds=10, batch=100) == 0
        event.refresh_from_db()
        assert event.published_at is None
    assert Order.objects.filter(pk=order_id).exists()
    assert _messages(redis_client, "allocation", order_id) == []
    # when: the broker is back
    relayed = outbox_relay(older_than_seconds=10, batch=100)
    # then: delivered exactly once
    assert relayed == 1
    event.refresh_from_db()
    assert event.published_at is not None
    assert [(task, m["order_id"]) for task, m in _messages(redis_client, "allocation", order_id)] == [
        ("allocation.allocate", order_id)
    ]
    assert outbox_relay(older_than_seconds=10, batch=100) == 0
    assert len(_messages(redis_client, "allocation", order_id)) == 1
