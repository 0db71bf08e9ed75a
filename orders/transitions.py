"""The only writer of Order.status: the transition table of SPEC 1, applied by compare-and-set.

Each transition is one transaction: a conditional UPDATE (status and, for failover, channel
must still be what the caller saw), the transition row and the outbox event. A signal that
arrives late or twice finds the order at or past its target: it is recorded and ignored.
"""

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from config import metrics
from orders import events
from orders.models import IgnoredSignal, Order, OrderStatus, OrderTransition, Outcome
from orders.outbox import event_emit

logger = logging.getLogger(__name__)

S = OrderStatus
ALLOWED: frozenset[tuple[str | None, str]] = frozenset(
    {
        (None, S.PENDING),
        (S.PENDING, S.ASSIGNED),
        (S.PENDING, S.FAILED),
        (S.ASSIGNED, S.ASSIGNED),  # failover to another channel
        (S.ASSIGNED, S.PROCESSING),
        (S.ASSIGNED, S.FAILED),
        (S.PROCESSING, S.PAID),
        (S.PROCESSING, S.FAILED),
        (S.PAID, S.COMPLETED),
        (S.FAILED, S.COMPLETED),
    }
)
RANK = {S.PENDING: 0, S.ASSIGNED: 1, S.PROCESSING: 2, S.PAID: 3, S.FAILED: 3, S.COMPLETED: 4}
TERMINAL = frozenset({S.COMPLETED})


class IllegalTransition(Exception):
    """A transition that is neither allowed nor a late signal: a bug in the caller."""


@dataclass(frozen=True)
class TransitionResult:
    applied: bool
    status: str
    channel: str | None = None


def _is_late(current: str, to: str) -> bool:
    """True when `to` is already reached or overtaken: a duplicate or late signal."""
    if current == to:
        return to != S.ASSIGNED
    return RANK[current] >= RANK[to]


def _due(status: str):
    return timezone.now() + timedelta(seconds=settings.STAGE_TIMEOUT_SECONDS[status])


def order_record_created(*, order: Order, reason: str = "order created") -> None:
    """Write the first transition and the order-created event of a just-inserted order."""
    OrderTransition.objects.create(order=order, from_status=None, to_status=S.PENDING, reason=reason)
    event_emit(topic=events.ORDER_CREATED, order_id=order.id, payload=_payload(order.id, S.PENDING, None))
    metrics.order_transitioned(order_id=order.id, from_status=None, to=S.PENDING)


def _payload(order_id, status: str, channel: str | None) -> dict:
    return {"order_id": str(order_id), "status": status, "channel": channel}


def order_transition(
    *,
    order_id,
    to: str,
    reason: str,
    seen_status: str | None = None,
    seen_channel: str | None = None,
    channel: str | None = None,
    failure_code: str | None = None,
    failure_message: str | None = None,
) -> TransitionResult:
    """Move an order to `to` if the table allows it from where the order is now.

    `seen_status`/`seen_channel` are what the caller read; passing them saves a read. For a
    failover (assigned -> assigned) `seen_channel` is required: only the channel that failed
    may be replaced, so two failovers racing cannot both move the order.
    """
    if to == S.ASSIGNED and not (channel and seen_status):
        raise ValueError("assigning needs a channel and the status the caller saw")
    for _ in range(3):
        if seen_status is None:
            row = Order.objects.filter(pk=order_id).values_list("status", "channel").first()
            if row is None:
                raise Order.DoesNotExist(order_id)
            seen_status, seen_channel = row
        if (seen_status, to) not in ALLOWED:
            if _is_late(seen_status, to):
                _record_ignored(order_id, seen_status, to, reason)
                return TransitionResult(False, seen_status, seen_channel)
            raise IllegalTransition(f"{seen_status} -> {to}")
        if seen_status == S.ASSIGNED == to and channel == seen_channel:
            _record_ignored(order_id, seen_status, to, reason)
            return TransitionResult(False, seen_status, seen_channel)
        now = timezone.now()
        changes: dict = {"status": to, "updated_at": now, "check_count": 0}
        if channel:
            changes["channel"] = channel
        if to in (S.PAID, S.FAILED):
            changes["outcome"] = Outcome.PAID if to == S.PAID else Outcome.FAILED
        if to == S.FAILED:
            changes["failure_code"] = failure_code
            changes["failure_message"] = failure_message
        if to == S.COMPLETED:
            changes["completed_at"] = now
            changes["next_check_at"] = None
        else:
            changes["next_check_at"] = _due(to)
        where = {"id": order_id, "status": seen_status}
        if seen_status == S.ASSIGNED:
            where["channel"] = seen_channel
        with transaction.atomic(savepoint=False):
            new_channel = _compare_and_set(where, changes)
            if new_channel is not _MISSED:
                OrderTransition.objects.create(
                    order_id=order_id,
                    from_status=seen_status,
                    to_status=to,
                    reason=reason,
                    channel=new_channel,
                )
                topic = events.CHANNEL_ALLOCATED if to == S.ASSIGNED else events.ORDER_UPDATED
                event_emit(topic=topic, order_id=order_id, payload=_payload(order_id, to, new_channel))
                logger.info(
                    "order.transition",
                    extra={"order_id": str(order_id), "from": seen_status, "to": to, "channel": new_channel},
                )
                metrics.order_transitioned(order_id=order_id, from_status=seen_status, to=to)
                return TransitionResult(True, to, new_channel)
        if to == S.ASSIGNED:
            # An assignment is only valid against the exact state the caller saw: a racing
            # allocation or failover has already moved the order, and this one must not.
            current = Order.objects.filter(pk=order_id).values_list("status", flat=True).first()
            _record_ignored(order_id, current, to, reason)
            return TransitionResult(False, current)
        # Someone moved the order since the caller looked: look again and decide again.
        seen_status = seen_channel = None
    raise IllegalTransition(f"order {order_id} kept changing while moving to {to}")


_MISSED = object()


def _compare_and_set(where: dict, changes: dict):
    """UPDATE the order only if it is still as `where` says; the channel it ends with, or _MISSED.

    Raw SQL for RETURNING: the transition row records the channel without another read.
    """
    table = Order._meta.db_table
    sets = ", ".join(f"{Order._meta.get_field(name).column} = %s" for name in changes)
    conds = " AND ".join(
        f"{Order._meta.get_field('id' if name == 'id' else name).column} = %s" for name in where
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {sets} WHERE {conds} RETURNING channel",
            [*changes.values(), *where.values()],
        )
        row = cursor.fetchone()
    return _MISSED if row is None else row[0]


def _record_ignored(order_id, current: str, to: str, reason: str) -> None:
    IgnoredSignal.objects.create(
        order_id=order_id, status_at_signal=current, requested_status=to, reason=reason[:200]
    )
    logger.info(
        "order.signal_ignored",
        extra={"order_id": str(order_id), "status": current, "requested": to, "reason": reason},
    )
