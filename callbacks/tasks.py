"""The callback stages (order and refund callbacks), and the beat sweep that makes due retries happen."""

import logging

from celery import shared_task
from django.conf import settings

from callbacks import services
from core.retention import retention_cutoff
from core.tasks import stage_send, stage_task
from orders import events
from orders.services import DeepQueues

logger = logging.getLogger(__name__)


@stage_task(events.CALLBACK)
def callback(event: dict) -> None:
    services.callback_deliver(order_id=event["order_id"])


@stage_task(events.REFUND_CALLBACK)
def refund_callback(event: dict) -> None:
    services.refund_callback_deliver(refund_id=event["payload"]["refund_id"])


@shared_task(name="callbacks.sweep_deliveries")
def sweep_deliveries() -> int:
    """Queue the callbacks that are due, unless the callbacks queue is already deep: they are then
    most likely waiting in it, and are queued once it is not (orders.services.DeepQueues)."""
    if DeepQueues(services.deliveries_pending_due()).holds(events.ORDER_UPDATED, {"status": "paid"}):
        logger.info("callbacks.sweep_held", extra={"queue": "callbacks"})
        return 0
    due = services.deliveries_announce(batch=settings.SWEEP_BATCH)
    for order_id, refund_id in due:
        if refund_id is None:
            stage_send(events.CALLBACK, {"order_id": order_id, "redelivery": True})
        else:
            message = {"order_id": order_id, "payload": {"refund_id": refund_id}, "redelivery": True}
            stage_send(events.REFUND_CALLBACK, message)
    return len(due)


@shared_task(name="callbacks.prune_history")
def prune_history() -> dict[str, int]:
    """Retention of this service's history (SPEC 12), asked for by orders.prune_history."""
    return services.attempts_prune(
        before=retention_cutoff(), batch=settings.RETENTION_BATCH, max_batches=settings.RETENTION_MAX_BATCHES
    )
