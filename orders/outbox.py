"""The transactional outbox: events are rows written with the change, sent to Celery after commit."""

import logging
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from config.celery_app import app as celery_app
from config.logging import request_id_var
from orders.events import subscribers_for
from orders.models import OutboxEvent

logger = logging.getLogger(__name__)


def event_emit(*, topic: str, order_id, payload: dict) -> OutboxEvent:
    """Write an event in the caller's transaction; it is published once that transaction commits."""
    payload = {**payload, "request_id": request_id_var.get()}
    has_subscribers = bool(subscribers_for(topic, payload))
    event = OutboxEvent.objects.create(
        topic=topic,
        order_id=order_id,
        payload=payload,
        # Nobody listens: nothing to deliver, so nothing for the relay to retry either.
        published_at=None if has_subscribers else timezone.now(),
    )
    if has_subscribers:
        transaction.on_commit(lambda: outbox_publish(events=[event]))
    return event


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
                celery_app.send_task(task_name, args=[_message(event)])
        except Exception as exc:  # the broker is down or unreachable: the relay retries later
            logger.warning(
                "outbox.publish_failed",
                extra={"event_id": event.id, "order_id": str(event.order_id), "error": repr(exc)},
            )
            break
        sent.append(event.id)
    if sent:
        OutboxEvent.objects.filter(id__in=sent, published_at__isnull=True).update(published_at=timezone.now())
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
