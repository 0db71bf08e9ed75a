"""Gateway stages: charge an assigned order, confirm a provider's answer, poll a silent provider;
and the same for refunds: send, confirm, poll."""

from celery import shared_task
from django.conf import settings

from core.retention import retention_cutoff
from core.tasks import stage_task
from gateway import services
from orders import events


@stage_task(events.CHARGE)
def charge(event: dict) -> None:
    services.order_charge(order_id=event["order_id"])


@stage_task(events.CONFIRM)
def confirm(message: dict) -> None:
    services.order_confirm(
        order_id=message["order_id"],
        idempotency_key=message["idempotency_key"],
        status=message["status"],
        failure_code=message.get("failure_code") or "",
        source="provider webhook",
        # Messages queued before the channel was carried settle as they always did.
        channel=message.get("channel"),
        provider=message.get("provider"),
        provider_reference=message.get("provider_reference") or "",
    )


@stage_task(events.POLL)
def poll(event: dict) -> None:
    services.order_poll(order_id=event["order_id"])


@stage_task(events.REFUND)
def refund(event: dict) -> None:
    services.refund_send(refund_id=event["payload"]["refund_id"])


@stage_task(events.REFUND_CONFIRM)
def refund_confirm(message: dict) -> None:
    services.refund_confirm(
        idempotency_key=message["idempotency_key"],
        status=message["status"],
        failure_code=message.get("failure_code") or "",
        source="provider webhook",
        channel=message.get("channel"),
        provider=message.get("provider"),
        # The order the signed word names (messages queued before it was carried: none to check).
        order_id=message.get("order_id"),
    )


@stage_task(events.REFUND_POLL)
def refund_poll(event: dict) -> None:
    services.refund_poll(refund_id=event["payload"]["refund_id"])


@shared_task(name="gateway.prune_history")
def prune_history() -> dict[str, int]:
    """Retention of this service's history (SPEC 12), asked for by orders.prune_history."""
    return services.webhooks_prune(
        before=retention_cutoff(), batch=settings.RETENTION_BATCH, max_batches=settings.RETENTION_MAX_BATCHES
    )
