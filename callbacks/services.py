"""Client callbacks: one signed delivery per order outcome or refund outcome, retried on a stored
schedule (SPEC 6, 10). Orders and refunds are two kinds of `_Subject` of the one machinery."""

import json
import logging
import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from django.conf import settings
from django.db import DatabaseError, OperationalError, connection, transaction
from django.utils import timezone

from callbacks.http import PostResult, post_json, storable_text
from callbacks.models import CallbackDelivery
from callbacks.signing import signature_headers
from core import metrics, prepared
from core.faults import fault_point
from core.redis import get_redis
from core.retention import delete_in_batches
from orders.models import Order, OrderStatus, RefundStatus
from orders.selectors import order_with_merchant, refund_by_id
from orders.serializers import order_representation, refund_representation
from orders.services import merchant_signing_secrets, refund_callback_scheduled
from orders.transitions import order_transition

logger = logging.getLogger(__name__)

D = CallbackDelivery.Status
LEASE_EXTRA_SECONDS = 15.0


@dataclass(frozen=True)
class _Subject:
    """What a callback is about: an order's outcome, or a refund's."""

    order: Order  # with its merchant
    subject_id: object  # the order's id, or the refund's
    refund_id: object | None
    event_type: str
    data: Callable[[], dict]  # the `data` of the body, rendered when the attempt is made
    # Run in the transaction that records a 2xx answer (orders: move to completed).
    delivered: Callable[[str, int | None], None]


_CLAIM_NEW_SQL = """
INSERT INTO callbacks_callbackdelivery
    (order_id, refund_id, event_type, webhook_id, status, attempts, next_attempt_at, last_error, created_at)
VALUES (%s, %s, %s, %s, 'pending', 1, %s, '', now())
ON CONFLICT ((COALESCE(refund_id, order_id)), event_type) DO NOTHING
RETURNING id, webhook_id, attempts
"""
_CLAIM_DUE_SQL = """
UPDATE callbacks_callbackdelivery SET attempts = attempts + 1, next_attempt_at = %s, announced_at = NULL
WHERE COALESCE(refund_id, order_id) = %s AND event_type = %s AND status = 'pending'
    AND next_attempt_at <= statement_timestamp()
RETURNING id, webhook_id, attempts
"""


def _claim(*, subject: _Subject) -> tuple[int, str, int] | None:
    """Take the right to make the next attempt: a new delivery, or an existing one that is due.

    The claim pushes next_attempt_at past the longest possible attempt (a lease), so a second
    copy of the task finds nothing due, and a worker killed mid-attempt is retried after it.
    """
    lease = timezone.now() + timedelta(seconds=settings.CALLBACK_TOTAL_TIMEOUT + LEASE_EXTRA_SECONDS)
    with connection.cursor() as cursor:
        prepared.execute(
            cursor,
            _CLAIM_NEW_SQL,
            [
                subject.order.pk,
                subject.refund_id,
                subject.event_type,
                f"msg_{uuid.uuid4().hex}",
                lease,
            ],
        )
        row = cursor.fetchone()
        if row is None:
            prepared.execute(cursor, _CLAIM_DUE_SQL, [lease, subject.subject_id, subject.event_type])
            row = cursor.fetchone()
    return row


# The attempt's log row and its delivery's new state in one statement: one round trip.
_RECORD_SQL = """
WITH attempt AS (
    INSERT INTO callbacks_callbackattempt
        (delivery_id, url, attempted_at, status_code, latency_ms, error, response_excerpt)
    VALUES (%s, %s, %s, %s, %s, %s, %s)
)
UPDATE callbacks_callbackdelivery SET {sets} WHERE id = %s{guard}
"""


def _record_attempt(*, attempt: list, delivery_id: int, changes: dict) -> None:
    """Log the attempt and move its delivery on. A failure leaves a delivered delivery as it is:
    an attempt that was still in flight when an operator's resend was delivered is history only."""
    sets = ", ".join(f"{CallbackDelivery._meta.get_field(name).column} = %s" for name in changes)
    failed = changes.get("status") != D.DELIVERED
    sql = _RECORD_SQL.format(sets=sets, guard=" AND status <> %s" if failed else "")
    params = [*attempt, *changes.values(), delivery_id, *([D.DELIVERED] if failed else [])]
    with connection.cursor() as cursor:
        prepared.execute(cursor, sql, params)


def _next_delay(attempts: int) -> float | None:
    """Seconds until the next attempt after `attempts` attempts, with ±10 % jitter; None: give up."""
    schedule = settings.CALLBACK_RETRY_SCHEDULE
    if attempts > len(schedule):
        return None
    return schedule[attempts - 1] * random.uniform(0.9, 1.1)


def callback_deliver(*, order_id) -> bool:
    """Make the due attempt of the order's callback, if any. True when the client took it."""
    order = order_with_merchant(order_id=order_id)
    if order is None:
        logger.warning("callback.order_missing", extra={"order_id": str(order_id)})
        return False
    if order.status not in (OrderStatus.PAID, OrderStatus.FAILED):
        return False
    event_type = f"order.{order.status}"
    url = order.callback_url or order.merchant.callback_url
    if not url:
        _complete_without_callback(order=order, event_type=event_type)
        return False

    def delivered(webhook_id: str, status_code: int | None) -> None:
        # applied=False: someone else moved the order (only to completed): the delivery stands.
        order_transition(
            order_id=order.pk,
            to=OrderStatus.COMPLETED,
            seen_status=order.status,
            reason=f"callback {webhook_id} answered {status_code}",
        )

    subject = _Subject(
        order=order,
        subject_id=order.pk,
        refund_id=None,
        event_type=event_type,
        data=lambda: order_representation(order),
        delivered=delivered,
    )
    return _deliver(subject=subject, url=url)


def refund_callback_deliver(*, refund_id) -> bool:
    """Make the due attempt of the refund's callback (SPEC 10), if any. True when the client took it."""
    refund = refund_by_id(refund_id=refund_id)
    if refund is None:
        logger.warning("callback.refund_missing", extra={"refund_id": str(refund_id)})
        return False
    if refund.status not in (RefundStatus.SUCCEEDED, RefundStatus.FAILED):
        return False
    order = order_with_merchant(order_id=refund.order_id)
    url = order.callback_url or order.merchant.callback_url
    if not url:
        # Nothing to deliver; the refund is settled either way.
        refund_callback_scheduled(refund_id=refund.pk)
        logger.info(
            "callback.nothing_to_deliver", extra={"order_id": str(order.pk), "refund_id": str(refund.pk)}
        )
        return False
    subject = _Subject(
        order=order,
        subject_id=refund.pk,
        refund_id=refund.pk,
        event_type=f"refund.{refund.status}",
        data=lambda: refund_representation(refund),
        delivered=lambda webhook_id, status_code: None,
    )
    try:
        return _deliver(subject=subject, url=url)
    finally:
        # Its delivery row exists now (made, deferred or taken by another copy): the delivery's
        # own schedule and sweep take over from the refund sweep.
        refund_callback_scheduled(refund_id=refund.pk)


def _deliver(*, subject: _Subject, url: str) -> bool:
    merchant_id = subject.order.merchant_id
    struggling = _struggling(merchant_id)
    with ExitStack() as held:
        # A struggling receiver's callback neither waits for a slot of its merchant's nor runs
        # without one of the few all struggling receivers share.
        if not held.enter_context(_slot(_receiver_keys(merchant_id), wait=not struggling)) or (
            struggling and not held.enter_context(_slot(_struggling_keys(), wait=False))
        ):
            _defer(subject=subject)
            return False
        claim = _claim(subject=subject)
        if claim is None:
            return False
        return _attempt(subject=subject, url=url, claim=claim, struggling=struggling)


def _complete_without_callback(*, order: Order, event_type: str) -> None:
    """Nothing to deliver: the order is done now, not after a schedule of attempts that cannot succeed."""
    reason = "no callback URL: nothing to deliver"
    # A delivery made before the URL was removed (or by an operator) must not stay due forever.
    CallbackDelivery.objects.filter(order_id=order.pk, event_type=event_type, status=D.PENDING).update(
        next_attempt_at=None, last_error=reason
    )
    result = order_transition(
        order_id=order.pk, to=OrderStatus.COMPLETED, seen_status=order.status, reason=reason
    )
    # applied=False: someone else moved it (only to completed); nothing left to do either way.
    logger.info(
        "callback.nothing_to_deliver",
        extra={"order_id": str(order.pk), "merchant": str(order.merchant_id), "applied": result.applied},
    )


# A receiver's share of callback capacity: session-level advisory locks, one per slot. PostgreSQL
# drops them with the connection, so a killed worker frees its slot at once, no lease to expire.
_SLOT_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
_SLOT_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtextextended(%s, 0))"
_SLOT_WAIT_SQL = "SELECT pg_advisory_lock(hashtextextended(%s, 0))"


def _receiver_keys(merchant_id) -> list[str]:
    """A merchant's CALLBACK_RECEIVER_CONCURRENCY slots. Keyed by merchant, not host: the merchant
    chooses every URL its orders carry, so spreading them over many hosts must not buy more than
    its share."""
    return [f"callbacks.receiver:{merchant_id}:{n}" for n in range(settings.CALLBACK_RECEIVER_CONCURRENCY)]


def _struggling_keys() -> list[str]:
    """The CALLBACK_STRUGGLING_CONCURRENCY slots every struggling receiver's callbacks share (at
    least one: with none, a receiver that failed once would never be tried again)."""
    return [f"callbacks.struggling:{n}" for n in range(max(1, settings.CALLBACK_STRUGGLING_CONCURRENCY))]


@contextmanager
def _slot(keys: list[str], *, wait: bool) -> Iterator[bool]:
    """Hold one of the slots `keys`, or yield False if all are taken (after a short wait for one,
    when `wait`)."""
    held = None
    with connection.cursor() as cursor:
        for key in keys:
            prepared.execute(cursor, _SLOT_LOCK_SQL, [key])
            if cursor.fetchone()[0]:
                held = key
                break
    if held is None and keys and wait and settings.CALLBACK_RECEIVER_WAIT_SECONDS > 0:
        # A healthy receiver frees its slots within milliseconds: wait a moment for one rather
        # than push the callback back by seconds; a slow receiver's slots stay taken, and then
        # the wait ends at lock_timeout (the session-level lock outlives the transaction).
        key = random.choice(keys)
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(
                    "SELECT set_config('lock_timeout', %s, true)",
                    [f"{int(settings.CALLBACK_RECEIVER_WAIT_SECONDS * 1000)}ms"],
                )
                cursor.execute(_SLOT_WAIT_SQL, [key])
                cursor.execute("SET LOCAL lock_timeout TO DEFAULT")
            held = key
        except OperationalError:
            held = None
    if held is None:
        yield False
        return
    try:
        yield True
    finally:
        try:
            with connection.cursor() as cursor:
                prepared.execute(cursor, _SLOT_UNLOCK_SQL, [held])
        except DatabaseError:
            # The connection is gone, and the lock with it.
            logger.warning("callback.slot_release_failed", extra={"slot": held})


# A receiver whose last attempt failed is struggling until one succeeds (or the mark expires,
# CALLBACK_STRUGGLING_SECONDS after its last failure). Its callbacks then share a few slots with
# every other struggling receiver's (above) and no longer wait for one of their own: however many
# receivers hang or fail, their retries hold at most CALLBACK_STRUGGLING_CONCURRENCY workers, and
# the rest serve everyone else (SPEC 9). The mark is a hint kept in Redis: lost, a receiver is
# trusted again until it fails again; Redis unreachable, nobody is marked.
_STRUGGLING_MARK = "callbacks:struggling:{}"


def _struggling(merchant_id) -> bool:
    try:
        return bool(get_redis().exists(_STRUGGLING_MARK.format(merchant_id)))
    except redis.RedisError:
        return False


def _struggling_update(merchant_id, *, ok: bool, was: bool) -> None:
    mark = _STRUGGLING_MARK.format(merchant_id)
    try:
        if not ok:
            get_redis().set(mark, "1", ex=settings.CALLBACK_STRUGGLING_SECONDS)
        elif was:
            get_redis().delete(mark)
    except redis.RedisError as exc:
        logger.warning("callback.struggling_mark_unavailable", extra={"error": repr(exc)})


_DEFER_SQL = """
WITH waiting AS (
    UPDATE callbacks_callbackdelivery SET next_attempt_at = %s, announced_at = NULL
    WHERE COALESCE(refund_id, order_id) = %s AND event_type = %s AND status = 'pending'
        AND next_attempt_at <= statement_timestamp()
    RETURNING id
)
INSERT INTO callbacks_callbackdelivery
    (order_id, refund_id, event_type, webhook_id, status, attempts, next_attempt_at, last_error, created_at)
SELECT %s, %s, %s, %s, 'pending', 0, %s, '', now() WHERE NOT EXISTS (SELECT 1 FROM waiting)
ON CONFLICT ((COALESCE(refund_id, order_id)), event_type) DO NOTHING
"""


def _defer(*, subject: _Subject) -> None:
    """The receiver has its share of workers: come back later, without spending an attempt.

    Pushing the due time back (not leaving it due) lets the sweep hand other merchants'
    deliveries to the free workers first.
    """
    due = timezone.now() + timedelta(
        seconds=settings.CALLBACK_RECEIVER_BUSY_SECONDS * random.uniform(1.0, 1.5)
    )
    webhook_id = f"msg_{uuid.uuid4().hex}"
    with connection.cursor() as cursor:
        cursor.execute(
            _DEFER_SQL,
            [
                due,
                subject.subject_id,
                subject.event_type,
                subject.order.pk,
                subject.refund_id,
                subject.event_type,
                webhook_id,
                due,
            ],
        )
    logger.info("callback.receiver_busy", extra={"order_id": str(subject.order.pk)})


def _attempt(*, subject: _Subject, url: str, claim: tuple[int, str, int], struggling: bool) -> bool:
    """Send the claimed attempt and record it. Whatever fails after the claim is a recorded failure:
    an exception here would leave the claim to expire and the attempt to repeat unseen."""
    _, webhook_id, attempts = claim
    order, event_type = subject.order, subject.event_type
    log = {
        "order_id": str(order.pk),
        "event_type": event_type,
        "merchant": str(order.merchant_id),
        "webhook_id": webhook_id,
        "attempt": attempts,
    }
    attempted_at = timezone.now()
    try:
        body = json.dumps({"type": event_type, "data": subject.data()}, separators=(",", ":"), default=str)
        headers = signature_headers(
            secrets=merchant_signing_secrets(merchant=order.merchant), msg_id=webhook_id, body=body
        )
        result = post_json(url=url, body=body, headers=headers)
    except Exception as exc:  # our side broke after the claim: recorded below as a failed attempt
        logger.exception("callback.attempt_error", extra=log)
        result = PostResult(
            None, 0, storable_text(f"internal error: {exc.__class__.__name__}: {exc}", 500), ""
        )
    # An answer cut off by the total bound counts as an error, whatever its status line said.
    metrics.callback_attempted(status_code=None if result.error else result.status_code)
    _struggling_update(order.merchant_id, ok=result.ok, was=struggling)
    fault_point("callback.after_post")
    log.update(status_code=result.status_code, latency_ms=result.latency_ms)
    try:
        with transaction.atomic():
            return _record(
                subject=subject, url=url, attempted_at=attempted_at, result=result, claim=claim, log=log
            )
    except Exception as exc:  # the answer could not be stored: store that instead, and retry on schedule
        logger.exception("callback.record_error", extra=log)
        failed = PostResult(
            result.status_code,
            result.latency_ms,
            storable_text(f"could not record the answer: {exc.__class__.__name__}: {exc}", 500),
            "",
        )
        with transaction.atomic():
            return _record(
                subject=subject, url=url, attempted_at=attempted_at, result=failed, claim=claim, log=log
            )


def _record(
    *, subject: _Subject, url: str, attempted_at, result: PostResult, claim: tuple, log: dict
) -> bool:
    delivery_id, webhook_id, attempts = claim
    attempt = [
        delivery_id,
        url[:2048],
        attempted_at,
        result.status_code,
        result.latency_ms,
        result.error[:500],
        result.excerpt,
    ]
    if result.ok:
        _record_attempt(
            attempt=attempt,
            delivery_id=delivery_id,
            changes={
                "status": D.DELIVERED,
                "delivered_at": timezone.now(),
                "next_attempt_at": None,
                "last_error": "",
            },
        )
        subject.delivered(webhook_id, result.status_code)
        logger.info("callback.delivered", extra=log)
        transaction.on_commit(lambda: fault_point("callback.after_commit"))
        return True
    error = result.error or f"HTTP {result.status_code}"
    delay = _next_delay(attempts)
    if delay is None:
        _record_attempt(
            attempt=attempt,
            delivery_id=delivery_id,
            changes={"status": D.EXHAUSTED, "next_attempt_at": None, "last_error": error[:500]},
        )
        logger.warning("callback.exhausted", extra={**log, "error": error})
    else:
        _record_attempt(
            attempt=attempt,
            delivery_id=delivery_id,
            changes={
                "next_attempt_at": timezone.now() + timedelta(seconds=delay),
                "last_error": error[:500],
            },
        )
        logger.info("callback.failed", extra={**log, "error": error, "retry_in_s": round(delay, 2)})
    return False


def callback_resend(*, delivery: CallbackDelivery) -> None:
    """Operator action: make an exhausted (or pending) delivery due now, same webhook-id."""
    CallbackDelivery.objects.filter(pk=delivery.pk).exclude(status=D.DELIVERED).update(
        status=D.PENDING, next_attempt_at=timezone.now(), announced_at=None
    )
    logger.info(
        "callback.resend_requested",
        extra={"order_id": str(delivery.order_id), "webhook_id": delivery.webhook_id},
    )


# Due deliveries not queued within a lease, marked as queued now, in one statement; concurrent
# sweeps (two beats during a takeover) skip each other's rows.
_ANNOUNCE_SQL = """
UPDATE callbacks_callbackdelivery SET announced_at = statement_timestamp()
WHERE id IN (
    SELECT id FROM callbacks_callbackdelivery
    WHERE status = 'pending' AND next_attempt_at <= statement_timestamp()
        AND (announced_at IS NULL OR announced_at <= statement_timestamp() - make_interval(secs => %s))
    ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED
)
RETURNING order_id, refund_id
"""


def deliveries_announce(*, batch: int) -> list[tuple[str, str | None]]:
    """(order id, refund id or None) of up to `batch` due callbacks for the sweep to queue, each
    marked as queued now.

    A due delivery waits in the queue until an attempt claims it (which clears the mark); queuing
    it again at every beat pass would add a copy per pass, so a queue that fell behind would grow
    by itself. One queued a lease ago and still unclaimed is queued again: its message was lost.
    """
    with connection.cursor() as cursor:
        cursor.execute(_ANNOUNCE_SQL, [settings.CALLBACK_TOTAL_TIMEOUT + LEASE_EXTRA_SECONDS, batch])
        rows = cursor.fetchall()
    return [(str(order_id), str(refund_id) if refund_id else None) for order_id, refund_id in rows]


def deliveries_pending_due():
    """The deliveries whose attempt is due (the partial index on pending deliveries), unevaluated."""
    return CallbackDelivery.objects.filter(status=D.PENDING, next_attempt_at__lte=timezone.now())


def deliveries_due(*, batch: int) -> list[tuple[str, str | None]]:
    """(order id, refund id or None) of the callbacks whose attempt is due, oldest due first."""
    return [
        (str(order_id), str(refund_id) if refund_id else None)
        for order_id, refund_id in deliveries_pending_due()
        .order_by("next_attempt_at")
        .values_list("order_id", "refund_id")[:batch]
    ]


def callback_resend_for_order(*, order_id) -> str:
    """Operator action: make the order's callback due now. What happened, as one word:

    "resent" (its delivery is due again, same webhook-id), "scheduled" (it had none: a due one
    is created), "delivered" (already taken by the client), "not_ready" (no outcome yet).
    The callback sweep picks a due delivery up within one beat interval.
    """
    order = Order.objects.filter(pk=order_id).only("id", "status").first()
    if order is None or order.status in (OrderStatus.PENDING, OrderStatus.ASSIGNED, OrderStatus.PROCESSING):
        return "not_ready"
    if order.status == OrderStatus.COMPLETED:
        return "delivered"
    delivery, created = CallbackDelivery.objects.get_or_create(
        order_id=order.pk,
        refund__isnull=True,
        event_type=f"order.{order.status}",
        defaults={
            "webhook_id": f"msg_{uuid.uuid4().hex}",
            "status": D.PENDING,
            "attempts": 0,
            "next_attempt_at": timezone.now(),
        },
    )
    if created:
        logger.info(
            "callback.scheduled_by_operator",
            extra={"order_id": str(order.pk), "webhook_id": delivery.webhook_id},
        )
        return "scheduled"
    if delivery.status == D.DELIVERED:
        return "delivered"
    callback_resend(delivery=delivery)
    return "resent"


# --- Retention (SPEC 12): attempts are history; each delivery keeps its count and last error.
_PRUNE_ATTEMPTS_SQL = """
DELETE FROM callbacks_callbackattempt WHERE id = ANY(ARRAY(
    SELECT id FROM callbacks_callbackattempt WHERE attempted_at < %(before)s
    ORDER BY attempted_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED))
"""


def attempts_prune(*, before: datetime, batch: int, max_batches: int) -> dict[str, int]:
    """Delete callback attempts made before `before`, in batches through callback_attempted."""
    return {
        "callback_attempts": delete_in_batches(
            _PRUNE_ATTEMPTS_SQL, before=before, batch=batch, max_batches=max_batches
        )
    }
