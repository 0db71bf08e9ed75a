"""Task names and queues are part of the deployment contract: workers are started per queue."""

from django.conf import settings

from config.celery_app import app
from orders import events

EXPECTED = {
    "allocation.allocate": "allocation",
    "gateway.charge": "gateway",
    "gateway.confirm": "gateway",
    "gateway.poll": "gateway",
    "callbacks.callback": "callbacks",
    "callbacks.sweep_deliveries": "callbacks",
    "orders.relay_outbox": "orders",
    "orders.sweep_orders": "orders",
    "orders.prune_idempotency_keys": "orders",
}


def test_every_task_is_registered_and_routed_to_its_service_queue():
    app.loader.import_default_modules()
    registered = {name for name in app.tasks if not name.startswith("celery.")}
    assert registered == set(EXPECTED)
    router = app.amqp.router
    for name, queue in EXPECTED.items():
        route = router.route({}, name)
        assert route["queue"].name == queue, name


def test_reliability_settings():
    assert settings.CELERY_TASK_ACKS_LATE is True
    assert settings.CELERY_TASK_REJECT_ON_WORKER_LOST is True
    assert settings.CELERY_WORKER_PREFETCH_MULTIPLIER == 1
    assert settings.CELERY_RESULT_BACKEND is None
    assert settings.CELERY_DB_REUSE_MAX > 1


def test_subscriptions_wire_the_pipeline():
    assert events.subscribers_for(events.ORDER_CREATED, {"status": "pending"}) == ["allocation.allocate"]
    assert events.subscribers_for(events.CHANNEL_ALLOCATED, {"status": "assigned"}) == ["gateway.charge"]
    assert events.subscribers_for(events.ORDER_UPDATED, {"status": "paid"}) == ["callbacks.callback"]
    assert events.subscribers_for(events.ORDER_UPDATED, {"status": "processing"}) == []
    assert events.subscribers_for(events.ORDER_UPDATED, {"status": "processing", "redelivery": True}) == [
        "gateway.poll"
    ]
    assert events.subscribers_for(events.ORDER_UPDATED, {"status": "completed"}) == []
