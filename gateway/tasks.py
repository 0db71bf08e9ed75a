"""Gateway stages: charge an assigned order, confirm a provider's answer, poll a silent provider;
and the same for refunds: send, confirm, poll."""

from celery import shared_task
from django.db import OperationalError

from gateway import services

RETRY = {"autoretry_for": (OperationalError,), "retry_backoff": 1, "retry_backoff_max": 30, "max_retries": 5}


@shared_task(name="gateway.charge", **RETRY)
def charge(event: dict) -> None:
    services.order_charge(order_id=event["order_id"])


@shared_task(name="gateway.confirm", **RETRY)
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
    )


@shared_task(name="gateway.poll", **RETRY)
def poll(event: dict) -> None:
    services.order_poll(order_id=event["order_id"])


@shared_task(name="gateway.refund", **RETRY)
def refund(event: dict) -> None:
    services.refund_send(refund_id=event["payload"]["refund_id"])


@shared_task(name="gateway.refund_confirm", **RETRY)
def refund_confirm(message: dict) -> None:
    services.refund_confirm(
        idempotency_key=message["idempotency_key"],
        status=message["status"],
        failure_code=message.get("failure_code") or "",
        source="provider webhook",
        channel=message.get("channel"),
        provider=message.get("provider"),
    )


@shared_task(name="gateway.refund_poll", **RETRY)
def refund_poll(event: dict) -> None:
    services.refund_poll(refund_id=event["payload"]["refund_id"])
