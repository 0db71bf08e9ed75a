"""Gateway stages: charge an assigned order, confirm a provider's answer, poll a silent provider."""

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
        provider_reference=message.get("provider_reference") or "",
    )


@shared_task(name="gateway.poll", **RETRY)
def poll(event: dict) -> None:
    services.order_poll(order_id=event["order_id"])
