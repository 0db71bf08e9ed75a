"""The callback stage, and the beat sweep that makes due retries happen."""

from celery import shared_task
from django.conf import settings
from django.db import OperationalError

from callbacks import services
from config.celery_app import app as celery_app


@shared_task(
    name="callbacks.callback",
    autoretry_for=(OperationalError,),
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=5,
)
def callback(event: dict) -> None:
    services.callback_deliver(order_id=event["order_id"])


@shared_task(
    name="callbacks.refund_callback",
    autoretry_for=(OperationalError,),
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=5,
)
def refund_callback(event: dict) -> None:
    services.refund_callback_deliver(refund_id=event["payload"]["refund_id"])


@shared_task(name="callbacks.sweep_deliveries")
def sweep_deliveries() -> int:
    due = services.deliveries_due(batch=settings.SWEEP_BATCH)
    for order_id, refund_id in due:
        if refund_id is None:
            celery_app.send_task("callbacks.callback", args=[{"order_id": order_id, "redelivery": True}])
        else:
            message = {"order_id": order_id, "payload": {"refund_id": refund_id}, "redelivery": True}
            celery_app.send_task("callbacks.refund_callback", args=[message])
    return len(due)
