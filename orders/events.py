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
REFUND_CREATED = "refund-created"
REFUND_UPDATED = "refund-updated"
TOPICS = (ORDER_CREATED, CHANNEL_ALLOCATED, ORDER_UPDATED, REFUND_CREATED, REFUND_UPDATED)

# The stage tasks, by their pinned names (queued messages carry these names: never rename one).
ALLOCATE = "allocation.allocate"
CHARGE = "gateway.charge"
CONFIRM = "gateway.confirm"
POLL = "gateway.poll"
CALLBACK = "callbacks.callback"
REFUND = "gateway.refund"
REFUND_CONFIRM = "gateway.refund_confirm"
REFUND_POLL = "gateway.refund_poll"
REFUND_CALLBACK = "callbacks.refund_callback"


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


def _refund_settled(payload: dict) -> bool:
    """A refund succeeded or failed: the client is told (SPEC 10)."""
    return payload.get("status") in ("succeeded", "failed")


SUBSCRIBERS: dict[str, tuple[Subscriber, ...]] = {
    ORDER_CREATED: (Subscriber(ALLOCATE),),
    CHANNEL_ALLOCATED: (Subscriber(CHARGE),),
    ORDER_UPDATED: (Subscriber(POLL, when=_processing_redelivered), Subscriber(CALLBACK, when=_settled)),
    # A refund is sent when created, and again when the sweep finds it still pending (a 503's
    # backoff, or a lost message); a processing one re-announced by the sweep is polled.
    REFUND_CREATED: (Subscriber(REFUND),),
    REFUND_UPDATED: (
        Subscriber(REFUND_POLL, when=_processing_redelivered),
        Subscriber(REFUND_CALLBACK, when=_refund_settled),
    ),
}

# How the sweep moves an overdue order on, by status: the event whose subscribers act on it.
REANNOUNCE = {
    "pending": ORDER_CREATED,
    "assigned": CHANNEL_ALLOCATED,
    "processing": ORDER_UPDATED,
    "paid": ORDER_UPDATED,
    "failed": ORDER_UPDATED,
}


# How many times the sweep re-announces one stage of an order or refund before it gives up on it
# (a processing one: settings.POLL_MAX_COUNT status checks): its next check is cleared, and the
# console lists it as needing a person.
MAX_SWEEP_CHECKS = 30

# The same for an overdue refund: pending is sent again, processing polled, settled ones called back.
REFUND_REANNOUNCE = {
    "pending": REFUND_CREATED,
    "processing": REFUND_UPDATED,
    "succeeded": REFUND_UPDATED,
    "failed": REFUND_UPDATED,
}


def subscribers_for(topic: str, payload: dict) -> list[str]:
    return [s.task_name for s in SUBSCRIBERS[topic] if s.when is None or s.when(payload)]
