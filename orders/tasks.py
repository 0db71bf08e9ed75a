"""Beat tasks of the orders service: the outbox relay, the stuck-order sweep, key pruning."""

from celery import current_app, shared_task
from django.conf import settings

from core.retention import retention_cutoff
from orders import outbox, services


@shared_task(name="orders.relay_outbox")
def relay_outbox() -> int:
    return outbox.outbox_relay(
        older_than_seconds=settings.OUTBOX_RELAY_AGE_SECONDS, batch=settings.OUTBOX_RELAY_BATCH
    )


@shared_task(name="orders.sweep_orders")
def sweep_orders() -> int:
    return services.orders_sweep(batch=settings.SWEEP_BATCH)


@shared_task(name="orders.sweep_refunds")
def sweep_refunds() -> int:
    return services.refunds_sweep(batch=settings.SWEEP_BATCH)


@shared_task(name="orders.prune_idempotency_keys")
def prune_idempotency_keys() -> int:
    return services.idempotency_keys_prune(older_than_hours=settings.IDEMPOTENCY_KEY_TTL_HOURS)


@shared_task(name="orders.prune_history")
def prune_history() -> dict[str, int]:
    """The one beat entry of retention (SPEC 12): prunes the orders service's history here and
    asks every other service to prune its own (RETENTION_TASKS), each on its own queue."""
    for name in settings.RETENTION_TASKS:
        current_app.send_task(name)
    return services.history_prune(
        before=retention_cutoff(), batch=settings.RETENTION_BATCH, max_batches=settings.RETENTION_MAX_BATCHES
    )
