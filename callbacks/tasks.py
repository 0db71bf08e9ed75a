"""The callback stage, and the beat sweep that makes due retries happen."""

from celery import shared_task
from django.conf import settings
from django.db import OperationalError

from callbacks import services
from config.celery_app import app as celery_app
from config.retention import retention_cutoff


@shared_task(
    name="callbacks.callback",
    autoretry_for=(OperationalError,),
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=5,
)
def callback(event: dict) -> None:
    services.callback_deliver(order_id=event["order_id"])


@shared_task(name="callbacks.sweep_deliveries")
def sweep_deliveries() -> int:
    due = services.deliveries_due(batch=settings.SWEEP_BATCH)
    for order_id in due:
        celery_app.send_task("callbacks.callback", args=[{"order_id": order_id, "redelivery": True}])
    return len(due)


@shared_task(name="callbacks.prune_history")
def prune_history() -> dict[str, int]:
    """Retention of this service's history (SPEC 12), asked for by orders.prune_history."""
    return services.attempts_prune(
        before=retention_cutoff(), batch=settings.RETENTION_BATCH, max_batches=settings.RETENTION_MAX_BATCHES
    )
