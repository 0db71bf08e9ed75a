"""Task names and queues are part of the deployment contract: workers are started per queue."""

from celery.fixups.django import DjangoWorkerFixup

from config.celery_app import app
from orders import events

EXPECTED = {
    "allocation.allocate": "allocation",
    "gateway.charge": "gateway",
    "gateway.confirm": "gateway",
    "gateway.poll": "gateway",
    "gateway.refund": "gateway",
    "gateway.refund_confirm": "gateway",
    "gateway.refund_poll": "gateway",
    "callbacks.callback": "callbacks",
    "callbacks.refund_callback": "callbacks",
    "callbacks.sweep_deliveries": "callbacks",
    "orders.relay_outbox": "orders",
    "orders.sweep_orders": "orders",
    "orders.sweep_refunds": "orders",
    "orders.prune_idempotency_keys": "orders",
    # retention (SPEC 12): one beat entry on orders, each service prunes its own tables
    "orders.prune_history": "orders",
    "gateway.prune_history": "gateway",
    "callbacks.prune_history": "callbacks",
}


def test_every_task_is_registered_and_routed_to_its_service_queue():
    app.loader.import_default_modules()
    registered = {name for name in app.tasks if not name.startswith("celery.")}
    assert registered == set(EXPECTED)
    router = app.amqp.router
    for name, queue in EXPECTED.items():
        route = router.route({}, name)
        assert route["queue"].name == queue, name


def test_every_stage_task_is_acknowledged_late_and_requeued_when_its_worker_dies():
    # What the worker does with the settings, not the settings: the task objects and the
    # Django fixup the worker builds from the app's configuration.
    app.loader.import_default_modules()
    for name in EXPECTED:
        task = app.tasks[name]
        assert task.acks_late is True, name
        assert task.reject_on_worker_lost is True, name
        assert task.ignore_result or app.conf.result_backend is None, name
    assert app.conf.worker_prefetch_multiplier == 1
    # Reuse the database connection across tasks (a new one per task halves throughput).
    assert (DjangoWorkerFixup(app).db_reuse_max or 0) > 1


def test_subscriptions_wire_the_pipeline():
    assert events.subscribers_for(events.ORDER_CREATED, {"status": "pending"}) == ["allocation.allocate"]
    assert events.subscribers_for(events.CHANNEL_ALLOCATED, {"status": "assigned"}) == ["gateway.charge"]
    assert events.subscribers_for(events.ORDER_UPDATED, {"status": "paid"}) == ["callbacks.callback"]
    assert events.subscribers_for(events.ORDER_UPDATED, {"status": "processing"}) == []
    assert events.subscribers_for(events.ORDER_UPDATED, {"status": "processing", "redelivery": True}) == [
        "gateway.poll"
    ]
    assert events.subscribers_for(events.ORDER_UPDATED, {"status": "completed"}) == []


def test_subscriptions_wire_the_refund_pipeline():
    assert events.subscribers_for(events.REFUND_CREATED, {"status": "pending"}) == ["gateway.refund"]
    assert events.subscribers_for(events.REFUND_UPDATED, {"status": "processing"}) == []
    assert events.subscribers_for(events.REFUND_UPDATED, {"status": "processing", "redelivery": True}) == [
        "gateway.refund_poll"
    ]
    for status in ("succeeded", "failed"):
        assert events.subscribers_for(events.REFUND_UPDATED, {"status": status}) == [
            "callbacks.refund_callback"
        ]
