"""The pipeline run in the test process, for the state machines: events, beat and a clock that moves.

No workers. `Pipeline.deliver_events` hands each outbox event written since the machine started
to the Celery task bodies its topic subscribes (the registry in orders/events.py, the real task
functions, called in this thread: no broker, no eager mode), in the order they were written;
the copies the product publishes to the broker are dropped, as workers would have taken them.
`Pipeline.beat` is what beat does: the order sweep and the callback sweep.

Time. The product has no clock of its own to control: it compares stored instants (next_check_at,
a delivery's next_attempt_at, a circuit's open-until, a lease) with now(). Waiting for them is
not an option in a test, and forcing every due time into the past (what this machine did before)
makes every order due at once: the backoff's spacing and the give-up rule are never seen as they
happen. So `VirtualClock.advance(seconds)` moves time forward by moving every stored instant of
the pipeline back by `seconds`: for the code that compares them with now(), that is the same as
time passing, and relative order is kept. `advance_to_next_due` jumps to the earliest real due
time, so orders become due one after another, exactly when their computed due time comes.
Left as they are: the transition log (append-only at the database; nothing decides from it),
daily cap volumes (keyed by UTC date; nothing here crosses a cap's day on purpose) and Redis
circuit-failure counters, which are cleared when the jump is longer than their window (they
would have expired).
"""

from __future__ import annotations

from datetime import timedelta

from django.apps import apps
from django.conf import settings
from django.db import connection, models
from django.utils import timezone

from allocation.models import PaymentChannel
from allocation.selectors import channel_cache_clear
from callbacks.models import CallbackDelivery
from callbacks.services import deliveries_due
from config.celery_app import app as celery_app
from core.broker import redis_queue_keys
from core.redis import get_broker_redis, get_redis
from orders.events import subscribers_for
from orders.models import Order, OrderTransition, OutboxEvent, Refund, RefundTransition

SHIFTED_APPS = ("orders", "allocation", "gateway", "callbacks")
NOT_SHIFTED = (OrderTransition, RefundTransition)  # append-only: their triggers refuse UPDATE


def _shifted_columns() -> list[tuple[str, list[str]]]:
    result = []
    for app_label in SHIFTED_APPS:
        for model in apps.get_app_config(app_label).get_models():
            if model in NOT_SHIFTED:
                continue
            columns = [
                field.column
                for field in model._meta.concrete_fields
                if isinstance(field, models.DateTimeField)
            ]
            if columns:
                result.append((model._meta.db_table, columns))
    return result


class VirtualClock:
    def __init__(self, circuit_prefix: str) -> None:
        self.columns = _shifted_columns()
        self.circuit_prefix = circuit_prefix
        self.moved = 0.0  # seconds this clock moved in all

    def advance(self, seconds: float) -> None:
        if seconds <= 0:
            return
        shift = timedelta(seconds=seconds)
        with connection.cursor() as cursor:
            for table, columns in self.columns:
                sets = ", ".join(f"{column} = {column} - %s" for column in columns)
                cursor.execute(f"UPDATE {table} SET {sets}", [shift] * len(columns))
        if seconds >= settings.CIRCUIT_WINDOW_SECONDS:
            redis = get_redis()
            for key in redis.scan_iter(f"circuit:{self.circuit_prefix}*"):
                redis.delete(key)
        channel_cache_clear()
        self.moved += seconds

    def next_due(self, order_ids) -> float | None:
        """Seconds from now to the earliest due time of these orders, their deliveries and circuits."""
        candidates = [
            Order.objects.filter(pk__in=order_ids, next_check_at__isnull=False)
            .order_by("next_check_at")
            .values_list("next_check_at", flat=True)
            .first(),
            Refund.objects.filter(order_id__in=order_ids, next_check_at__isnull=False)
            .order_by("next_check_at")
            .values_list("next_check_at", flat=True)
            .first(),
            CallbackDelivery.objects.filter(order_id__in=order_ids, status="pending")
            .order_by("next_attempt_at")
            .values_list("next_attempt_at", flat=True)
            .first(),
            PaymentChannel.objects.filter(
                code__startswith=self.circuit_prefix, circuit_open_until__gt=timezone.now()
            )
            .order_by("circuit_open_until")
            .values_list("circuit_open_until", flat=True)
            .first(),
        ]
        due = [moment for moment in candidates if moment is not None]
        if not due:
            return None
        return max((min(due) - timezone.now()).total_seconds(), 0.0)

    def advance_to_next_due(self, order_ids) -> bool:
        """Move to the earliest due time (plus a millisecond); False when nothing is due any more."""
        wait = self.next_due(order_ids)
        if wait is None:
            return False
        self.advance(wait + 0.001)
        return True


class Pipeline:
    """Outbox events written since it was made, handed to their subscribers like the workers do."""

    def __init__(self) -> None:
        celery_app.loader.import_default_modules()  # the task modules, as a worker loads them
        self.delivered_up_to = OutboxEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0
        self.delivered: list[dict] = []  # every message handed over, for duplicate deliveries

    def undelivered(self, order_ids) -> list[OutboxEvent]:
        return list(
            OutboxEvent.objects.filter(id__gt=self.delivered_up_to, order_id__in=order_ids).order_by("id")
        )

    def hand_over(self, message: dict) -> None:
        for task_name in subscribers_for(message["topic"], message["payload"]):
            celery_app.tasks[task_name].run(message)

    def deliver_events(self, order_ids, *, limit: int = 1000) -> int:
        """Deliver every event not yet delivered, oldest first, including those the deliveries write."""
        count = 0
        while count < limit:
            events = self.undelivered(order_ids)
            if not events:
                self.consume_broker_queues()
                return count
            event = events[0]
            self.delivered_up_to = event.id
            message = {
                "event_id": event.id,
                "topic": event.topic,
                "order_id": str(event.order_id),
                "payload": event.payload,
            }
            self.delivered.append(message)
            self.hand_over(message)
            count += 1
        raise AssertionError(f"more than {limit} events in a row: the pipeline does not settle")

    @staticmethod
    def consume_broker_queues() -> None:
        """The product also publishes each event to the broker (no worker takes it here): drop
        those copies, as the workers this pipeline stands for would have taken them. Left there,
        they pile up example after example until the sweep reads a deep queue and holds off
        (SWEEP_HOLD_QUEUE_DEPTH), which no real run with workers would see."""
        client = get_broker_redis()
        client.delete(*(key for queue in settings.SERVICE_QUEUES for key in redis_queue_keys(queue)))

    def beat(self, order_ids) -> None:
        """One round of beat: the order, refund and callback sweeps, then what they announced."""
        celery_app.tasks["orders.sweep_orders"].run()
        celery_app.tasks["orders.sweep_refunds"].run()
        mine = {str(o) for o in order_ids}
        for order_id, refund_id in deliveries_due(batch=500):
            if order_id not in mine:
                continue
            if refund_id is None:
                celery_app.tasks["callbacks.callback"].run({"order_id": order_id, "redelivery": True})
            else:
                celery_app.tasks["callbacks.refund_callback"].run(
                    {"order_id": order_id, "payload": {"refund_id": refund_id}, "redelivery": True}
                )
        self.deliver_events(order_ids)
