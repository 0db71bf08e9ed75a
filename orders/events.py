"""The pipeline, declared once: the event topics, which stage task each topic goes to, and how
the sweep re-announces an overdue order.

Services emit events into the outbox (orders/outbox.py); the relay delivers each event to the
tasks listed here for its topic. Stage tasks are named `<app>.<stage>` (core/tasks.py) and
routed to their app's queue by that prefix (CELERY_TASK_ROUTES). Nothing else subscribes.
"""

from collections.abc import Callable
from dataclasses import dataclass

ORDER_CREATED = "order-created"
CHANNEL_ALLOCATED = "payment-channel-allocated"
ORDER_UPDATED = "order-updated"
TOPICS = (ORDER_CREATED, CHANNEL_ALLOCATED, ORDER_UPDATED)

# The stage tasks, by their pinned names (queued messages carry these names: never rename one).
ALLOCATE = "allocation.allocate"
CHARGE = "gateway.charge"
CONFIRM = "gateway.confirm"
POLL = "gateway.poll"
CALLBACK = "callbacks.callback"


@dataclass(frozen=True)
class Subscriber:
    task_name: str
    when: Callable[[dict], bool] | None = None


def _settled(payload: dict) -> bool:
    """Paid or failed: the client is told (SPEC 6)."""
    return payload.get("status") in ("paid", "failed")


def _processing_redelivered(payload: dict) -> bool:
    """A processing order re-announced by the sweep: ask the provider (PSync-like polling)."""
    return payload.get("status") == "processing" and bool(payload.get("redelivery"))


SUBSCRIBERS: dict[str, tuple[Subscriber, ...]] = {
    ORDER_CREATED: (Subscriber(ALLOCATE),),
    CHANNEL_ALLOCATED: (Subscriber(CHARGE),),
    ORDER_UPDATED: (Subscriber(POLL, when=_processing_redelivered), Subscriber(CALLBACK, when=_settled)),
}

# How the sweep moves an overdue order on, by status: the event whose subscribers act on it.
REANNOUNCE = {
    "pending": ORDER_CREATED,
    "assigned": CHANNEL_ALLOCATED,
    "processing": ORDER_UPDATED,
    "paid": ORDER_UPDATED,
    "failed": ORDER_UPDATED,
}


def subscribers_for(topic: str, payload: dict) -> list[str]:
    return [s.task_name for s in SUBSCRIBERS[topic] if s.when is None or s.when(payload)]
