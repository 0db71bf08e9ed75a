"""Reads of the callbacks service for the operators' console; each bounded by an index."""

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Count, Q

from callbacks.models import CallbackAttempt, CallbackDelivery

D = CallbackDelivery.Status


@dataclass(frozen=True)
class CallbackHealth:
    pending: int
    exhausted: int
    attempts: int  # in the window
    succeeded: int  # 2xx answers in the window

    @property
    def success_ratio(self) -> float | None:
        return self.succeeded / self.attempts if self.attempts else None


def callbacks_health(*, since: datetime) -> CallbackHealth:
    """Pending and exhausted now (partial indexes), and attempts since `since` (attempted_at index)."""
    pending = CallbackDelivery.objects.filter(status=D.PENDING).count()
    exhausted = CallbackDelivery.objects.filter(status=D.EXHAUSTED).count()
    window = CallbackAttempt.objects.filter(attempted_at__gte=since).aggregate(
        attempts=Count("id"),
        # a 2xx status whose answer then ran past the total timeout is a failed attempt
        succeeded=Count("id", filter=Q(status_code__gte=200, status_code__lt=300, error="")),
    )
    return CallbackHealth(pending, exhausted, window["attempts"], window["succeeded"])


def deliveries_exhausted(*, limit: int = 50) -> list[CallbackDelivery]:
    """The newest exhausted deliveries (the delivery_exhausted partial index)."""
    return list(
        CallbackDelivery.objects.filter(status=D.EXHAUSTED)
        .order_by("-created_at")
        .only("id", "order_id", "event_type", "webhook_id", "attempts", "last_error", "created_at")[:limit]
    )


def deliveries_exhausted_count() -> int:
    """How many deliveries are exhausted (the delivery_exhausted partial index)."""
    return CallbackDelivery.objects.filter(status=D.EXHAUSTED).count()


def callback_attempts_for_order(*, order_id, limit: int = 100) -> list[CallbackAttempt]:
    """An order's callback attempts, newest first."""
    return list(
        CallbackAttempt.objects.filter(delivery__order_id=order_id)
        .select_related("delivery")
        .order_by("-attempted_at", "-id")[:limit]
    )


def delivery_for_order(*, order_id, event_type: str) -> CallbackDelivery | None:
    return CallbackDelivery.objects.filter(order_id=order_id, event_type=event_type).first()
