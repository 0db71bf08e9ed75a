"""The transactional outbox: events are rows written with the change, sent to Celery after commit."""

import json
import logging
from datetime import timedelta

from django.db import connection, transaction
from django.utils import timezone

from core import prepared
from core.faults import fault_point
from core.logging import request_id_var
from core.tasks import stage_send
from orders.events import subscribers_for
from orders.models import OutboxEvent

logger = logging.getLogger(__name__)

# The one spelling of an outbox row's insert; orders/transitions.py feeds it from a SELECT.
OUTBOX_INSERT = "INSERT INTO orders_outboxevent (topic, order_id, payload, created_at, published_at)"
_INSERT_SQL = OUTBOX_INSERT + " VALUES (%s, %s, %s::jsonb, %s, %s) RETURNING id"
_MARK_PUBLISHED_SQL = (
    "UPDATE orders_outboxevent SET published_at = %s WHERE id = ANY(%s) AND published_at IS NULL"
)


def event_prepare(*, topic: str, order_id, payload: dict) -> OutboxEvent:
    """The event row to write, not yet written: the payload carries the request id."""
    payload = {**payload, "request_id": request_id_var.get()}
    now = timezone.now()
    # Nobody listens: nothing to deliver, so nothing for the relay to retry either.
    published = None if subscribers_for(topic, payload) else now
    return OutboxEvent(
        topic=topic, order_id=order_id, payload=payload, created_at=now, published_at=published
    )


def event_written(event: OutboxEvent, event_id: int) -> OutboxEvent:
    """`event` was inserted as row `event_id` in the caller's transaction: publish it after commit."""
    event.id = event_id
    event._state.adding, event._state.db = False, connection.alias
    if event.published_at is None:
        transaction.on_commit(lambda: fault_point("outbox.before_publish"))
        transaction.on_commit(lambda: outbox_publish(events=[event]))
    return event


def event_emit(*, topic: str, order_id, payload: dict) -> OutboxEvent:
    """Write an event in the caller's transaction; it is published once that transaction commits."""
    event = event_prepare(topic=topic, order_id=order_id, payload=payload)
    # A plain INSERT spares the ORM's per-call query compilation.
    with connection.cursor() as cursor:
        prepared.execute(
            cursor,
            _INSERT_SQL,
            [topic, order_id, json.dumps(event.payload), event.created_at, event.published_at],
        )
        return event_written(event, cursor.fetchone()[0])


def _message(event: OutboxEvent) -> dict:
    return {
        "event_id": event.id,
        "topic": event.topic,
        "order_id": str(event.order_id),
        "payload": event.payload,
    }


def outbox_publish(*, events: list[OutboxEvent]) -> int:
    """Send events to their subscribers' queues and mark them published. Returns how many went out.

    A broker failure leaves the events unpublished for the relay; it never reaches the caller,
    because the change the events announce is already committed.
    """
    sent = []
    for event in events:
        try:
            for task_name in subscribers_for(event.topic, event.payload):
                message = _message(event)
                # A short argsrepr (what monitoring shows) spares Celery's saferepr walk over
                # the whole payload on every publish.
                short = {key: message[key] for key in ("event_id", "topic", "order_id")}
                stage_send(task_name, message, argsrepr=repr([short]))
        except Exception as exc:  # the broker is down or unreachable: the relay retries later
            logger.warning(
                "outbox.publish_failed",
                extra={"event_id": event.id, "order_id": str(event.order_id), "error": repr(exc)},
            )
            break
        sent.append(event.id)
    if sent:
        with connection.cursor() as cursor:
            prepared.execute(cursor, _MARK_PUBLISHED_SQL, [timezone.now(), sent])
    return len(sent)


def outbox_relay(*, older_than_seconds: float, batch: int) -> int:
    """Publish events that were committed but not published (crash or broker outage)."""
    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    total = 0
    while True:
        with transaction.atomic():
            events = list(
                OutboxEvent.objects.select_for_update(skip_locked=True)
                .filter(published_at__isnull=True, created_at__lt=cutoff)
                .order_by("id")[:batch]
            )
            if not events:
                return total
            published = outbox_publish(events=events)
        total += published
        if published < len(events):
            return total
        logger.info("outbox.relayed", extra={"count": published})
