"""The only writer of Order.status: the transition table of SPEC 1, applied by compare-and-set.

Each transition is one transaction: a conditional UPDATE (status and, for failover, channel
must still be what the caller saw), the transition row and the outbox event. A signal that
arrives late or twice finds the order at or past its target: it is recorded and ignored.
"""

import functools
import json
import logging
from dataclasses import dataclass
from datetime import date, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from core import metrics
from orders import events
from orders.models import IgnoredSignal, Order, OrderStatus, Outcome
from orders.outbox import OUTBOX_INSERT, event_prepare, event_written

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


# The order API's idempotency key gets its stored answer in the statement that inserts the order.
_KEY_DONE = (
    ", key_done AS (UPDATE orders_idempotencykey SET state = 'done', response_status = 201,"
    " response_body = %s::jsonb WHERE id = %s)"
)


def order_insert(*, order: Order, answer_key_id: int | None = None, answer: dict | None = None) -> None:
    """Insert a new order with its first transition and its order-created event, in one statement.

    With `answer_key_id`, that idempotency key is marked done with `answer` (a 201's body) in the
    same statement; everything is in the caller's transaction.
    """
    order.created_at = order.created_at or timezone.now()
    order.updated_at = order.updated_at or order.created_at
    fields = Order._meta.concrete_fields
    columns = ", ".join(field.column for field in fields)
    values = [field.get_db_prep_save(getattr(order, field.attname), connection) for field in fields]
    event = event_prepare(
        topic=events.ORDER_CREATED, order_id=order.id, payload=_payload(order.id, S.PENDING, None)
    )
    sql = (
        f"WITH changed AS (INSERT INTO {Order._meta.db_table} ({columns})"
        f" VALUES ({', '.join(['%s'] * len(fields))}) RETURNING id, channel),"
        + _LOGGED_AND_ANNOUNCED
        + (_KEY_DONE if answer_key_id is not None else "")
        + _CHANNEL_AND_EVENT
    )
    params = [
        *values,
        *_logged_and_announced_params(None, S.PENDING, "order created", order.created_at, event),
        *([json.dumps(answer), answer_key_id] if answer_key_id is not None else []),
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        event_written(event, cursor.fetchone()[1])
    order._state.adding, order._state.db = False, connection.alias
    _count_on_commit(order.id, None, S.PENDING)


def _count_on_commit(order_id, from_status: str | None, to: str) -> None:
    """Count the transition once it is committed: a rolled-back or killed one never happened."""
    transaction.on_commit(
        functools.partial(metrics.order_transitioned, order_id=order_id, from_status=from_status, to=to)
    )


def _payload(order_id, status: str, channel: str | None) -> dict:
    return {"order_id": str(order_id), "status": status, "channel": channel}


def order_transition(
    *,
    order_id,
    to: str,
    reason: str,
    seen_status: str,
    seen_channel: str | None = None,
    channel: str | None = None,
    reserved_on: date | None = None,
    failure_code: str | None = None,
    failure_message: str | None = None,
) -> TransitionResult:
    """Move an order to `to`, but only from the exact state the caller decided it for.

    `seen_status` (and `seen_channel`, when given; always for an assigned order) is the state the
    caller read and based its decision on. A decision is only valid for that state: if the order
    has moved meanwhile (the compare-and-set matches no row), nothing changes, the signal is
    recorded as ignored and the result says where the order is now (`applied=False`). The caller
    decides again from fresh facts if it still has something to do; it never re-applies `to`.
    """
    if to == S.ASSIGNED and not channel:
        raise ValueError("assigning needs a channel")
    if seen_status == S.ASSIGNED and not seen_channel:
        raise ValueError("a decision about an assigned order names the channel it was assigned to")
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
        changes["reserved_on"] = reserved_on
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
    if seen_channel is not None:
        where["channel"] = seen_channel
    topic = events.CHANNEL_ALLOCATED if to == S.ASSIGNED else events.ORDER_UPDATED
    # The channel in the payload is the one the order ends with; _move writes it from the row.
    event = event_prepare(topic=topic, order_id=order_id, payload=_payload(order_id, to, None))
    with transaction.atomic(savepoint=False):
        moved = _move(where, changes, seen_status, to, reason, event)
        if moved is not None:
            new_channel, event_id = moved
            event.payload["channel"] = new_channel
            event_written(event, event_id)
            logger.info(
                "order.transition",
                extra={"order_id": str(order_id), "from": seen_status, "to": to, "channel": new_channel},
            )
            _count_on_commit(order_id, seen_status, to)
            return TransitionResult(True, to, new_channel)
    # The order is no longer in the state the decision was made for: a racing copy, a webhook or
    # a failover moved it. Record that and report where it is; the decision does not carry over.
    row = Order.objects.filter(pk=order_id).values_list("status", "channel").first()
    if row is None:
        raise Order.DoesNotExist(order_id)
    current, current_channel = row
    _record_ignored(order_id, current, to, f"{reason} (decided for {seen_status}/{seen_channel or '-'})")
    return TransitionResult(False, current, current_channel)


def _move(where: dict, changes: dict, from_status: str, to: str, reason: str, event) -> tuple | None:
    """One statement for the whole transition, or None if the order is no longer as `where` says.

    The conditional UPDATE, the transition row and the outbox event go to PostgreSQL together:
    the two INSERTs only happen if the UPDATE matched. Returns (channel, outbox event id).
    """
    table = Order._meta.db_table
    sets = ", ".join(f"{Order._meta.get_field(name).column} = %s" for name in changes)
    conds = " AND ".join(f"{Order._meta.get_field(name).column} = %s" for name in where)
    sql = (
        f"WITH changed AS (UPDATE {table} SET {sets} WHERE {conds} RETURNING id, channel),"
        + _LOGGED_AND_ANNOUNCED
        + _CHANNEL_AND_EVENT
    )
    params = [
        *changes.values(),
        *where.values(),
        *_logged_and_announced_params(from_status, to, reason, changes["updated_at"], event),
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


# What every change of an order writes with it, in the same statement: after a CTE `changed`
# that returns the order's (id, channel), its transition row and its outbox event. The event's
# payload is built from the row, so it names the channel the order ends with.
_LOGGED_AND_ANNOUNCED = (
    " logged AS ("
    "  INSERT INTO orders_ordertransition (order_id, from_status, to_status, reason, channel, created_at)"
    "  SELECT id, %s, %s, %s, channel, %s FROM changed),"
    " announced AS ("
    f"  {OUTBOX_INSERT}"
    "  SELECT %s, id, jsonb_build_object("
    "    'order_id', id::text, 'status', %s::text, 'channel', channel, 'request_id', %s::text),"
    "  %s, %s FROM changed RETURNING id)"
)
_CHANNEL_AND_EVENT = " SELECT changed.channel, announced.id FROM changed, announced"


def _logged_and_announced_params(from_status: str | None, to: str, reason: str, at, event) -> list:
    return [
        from_status,
        to,
        reason,
        at,
        event.topic,
        to,
        event.payload["request_id"],
        event.created_at,
        event.published_at,
    ]


def _record_ignored(order_id, current: str, to: str, reason: str) -> None:
    IgnoredSignal.objects.create(
        order_id=order_id, status_at_signal=current, requested_status=to, reason=reason[:200]
    )
    logger.info(
        "order.signal_ignored",
        extra={"order_id": str(order_id), "status": current, "requested": to, "reason": reason},
    )
