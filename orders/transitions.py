"""The only writer of Order.status and Refund.status: SPEC 1's and SPEC 10's transition tables,
applied by compare-and-set.

Each transition is one statement: a conditional UPDATE (status and, for failover, channel
must still be what the caller saw), the transition row and the outbox event. A signal that
arrives late or twice finds the subject at or past its target: it is recorded and ignored.
Orders and refunds share the machinery; a `Lifecycle` says what differs (tables, transition
table, the event's payload).
"""

import functools
import json
import logging
from dataclasses import dataclass
from datetime import date, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from core import metrics, prepared
from orders import events
from orders.models import IgnoredSignal, Order, OrderStatus, Outcome, Refund, RefundStatus
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


R = RefundStatus
REFUND_ALLOWED: frozenset[tuple[str | None, str]] = frozenset(
    {
        (None, R.PENDING),
        (R.PENDING, R.PROCESSING),
        (R.PENDING, R.FAILED),  # the provider refused it outright: nothing was refunded
        (R.PROCESSING, R.SUCCEEDED),
        (R.PROCESSING, R.FAILED),
    }
)
REFUND_RANK = {R.PENDING: 0, R.PROCESSING: 1, R.SUCCEEDED: 2, R.FAILED: 2}


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one instance per subject
class Lifecycle:
    """What differs between the subjects of the one transition machinery."""

    model: type
    log_table: str
    log_fk: str
    allowed: frozenset
    rank: dict
    # The columns the changing statement returns (`changed`); id and channel first.
    returning: str
    # Outbox events are keyed by order: the column of `changed` that holds the order id.
    order_id_column: str
    # The pairs of the event payload that name the subject, over `changed`.
    subject_sql: str


ORDER_LIFECYCLE = Lifecycle(
    model=Order,
    log_table="orders_ordertransition",
    log_fk="order_id",
    allowed=ALLOWED,
    rank=RANK,
    returning="id, channel",
    order_id_column="id",
    subject_sql="'order_id', id::text",
)
REFUND_LIFECYCLE = Lifecycle(
    model=Refund,
    log_table="orders_refundtransition",
    log_fk="refund_id",
    allowed=REFUND_ALLOWED,
    rank=REFUND_RANK,
    returning="id, channel, order_id, amount",
    order_id_column="order_id",
    subject_sql="'order_id', order_id::text, 'refund_id', id::text",
)


class IllegalTransition(Exception):
    """A transition that is neither allowed nor a late signal: a bug in the caller."""


@dataclass(frozen=True)
class TransitionResult:
    applied: bool
    status: str
    channel: str | None = None


def _is_late(current: str, to: str, lifecycle: Lifecycle = ORDER_LIFECYCLE) -> bool:
    """True when `to` is already reached or overtaken: a duplicate or late signal."""
    if current == to:
        return (current, to) not in lifecycle.allowed
    return lifecycle.rank[current] >= lifecycle.rank[to]


def _due(status: str):
    return timezone.now() + timedelta(seconds=settings.STAGE_TIMEOUT_SECONDS[status])


# The API's idempotency key gets its stored answer in the statement that inserts the order or refund.
_KEY_DONE = (
    "UPDATE orders_idempotencykey SET state = 'done', response_status = 201, response_text = %s WHERE id = %s"
)


def order_insert(*, order: Order, answer_key_id: int | None = None, answer: dict | None = None) -> None:
    """Insert a new order with its first transition and its order-created event, in one statement.

    With `answer_key_id`, that idempotency key is marked done with `answer` (a 201's body) in the
    same statement; everything is in the caller's transaction.
    """
    order.created_at = order.created_at or timezone.now()
    order.updated_at = order.updated_at or order.created_at
    event = event_prepare(
        topic=events.ORDER_CREATED, order_id=order.id, payload=_payload(order.id, S.PENDING, None)
    )
    _insert(ORDER_LIFECYCLE, order, "order created", event, answer_key_id, answer)
    _count_on_commit(order.id, None, S.PENDING)


def _insert(
    lifecycle: Lifecycle, row, reason: str, event, answer_key_id: int | None, answer: dict | None
) -> None:
    """INSERT `row` with its first transition and its created event, in one statement."""
    fields = lifecycle.model._meta.concrete_fields
    columns = ", ".join(field.column for field in fields)
    values = [field.get_db_prep_save(getattr(row, field.attname), connection) for field in fields]
    sql = (
        f"WITH changed AS (INSERT INTO {lifecycle.model._meta.db_table} ({columns})"
        f" VALUES ({', '.join(['%s'] * len(fields))}) RETURNING {lifecycle.returning}),"
        + _logged_and_announced(lifecycle)
        + (f", key_done AS ({_KEY_DONE})" if answer_key_id is not None else "")
        + _CHANNEL_AND_EVENT.format(order_id=lifecycle.order_id_column)
    )
    params = [
        *values,
        *_logged_and_announced_params(None, event.payload["status"], reason, row.created_at, event),
        *([json.dumps(answer), answer_key_id] if answer_key_id is not None else []),
    ]
    with connection.cursor() as cursor:
        prepared.execute(cursor, sql, params)
        event_written(event, cursor.fetchone()[1])
    row._state.adding, row._state.db = False, connection.alias


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
    provider_reference: str = "",
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
    if provider_reference:
        # The provider's id for the charge, written with the change that learned it; a known one
        # never changes (_SET_ONCE).
        changes["provider_reference"] = provider_reference[:128]
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
        moved = _move(where, changes, seen_status, to, reason, event, ORDER_LIFECYCLE)
        if moved is not None:
            new_channel, event_id, _ = moved
            event.payload["channel"] = new_channel
            event_written(event, event_id)
            line = {"order_id": str(order_id), "from": seen_status, "to": to, "channel": new_channel}
            # Why, as the transition row says it (a decline's code, a failover's refusal)
            line["reason"] = reason[:200]
            if to == S.FAILED:
                line["failure_code"] = failure_code
            logger.info("order.transition", extra=line)
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


# Columns a change fills in once and never overwrites.
_SET_ONCE = frozenset({"provider_reference"})


def _move(
    where: dict,
    changes: dict,
    from_status: str,
    to: str,
    reason: str,
    event,
    lifecycle: Lifecycle = ORDER_LIFECYCLE,
    then_sql: str = "",
) -> tuple | None:
    """One statement for the whole transition, or None if the subject is no longer as `where` says.

    The conditional UPDATE, the transition row and the outbox event go to PostgreSQL together:
    the two INSERTs (and `then_sql`, a statement over `changed`) only happen if the UPDATE
    matched. Returns (channel, outbox event id).
    """
    meta = lifecycle.model._meta
    sets = ", ".join(
        f"{column} = COALESCE({column}, %s)" if name in _SET_ONCE else f"{column} = %s"
        for name, column in ((name, meta.get_field(name).column) for name in changes)
    )
    conds = " AND ".join(f"{meta.get_field(name).column} = %s" for name in where)
    sql = (
        f"WITH changed AS (UPDATE {meta.db_table} SET {sets} WHERE {conds} RETURNING {lifecycle.returning}),"
        + _logged_and_announced(lifecycle)
        + (f", caller AS ({then_sql})" if then_sql else "")
        + _CHANNEL_AND_EVENT.format(order_id=lifecycle.order_id_column)
    )
    params = [
        *changes.values(),
        *where.values(),
        *_logged_and_announced_params(from_status, to, reason, changes["updated_at"], event),
    ]
    with connection.cursor() as cursor:
        prepared.execute(cursor, sql, params)
        return cursor.fetchone()


@functools.cache
def _logged_and_announced(lifecycle: Lifecycle) -> str:
    """What every change writes with it, in the same statement: after a CTE `changed` that returns
    the subject's (id, channel, ...), its transition row and its outbox event. The event's payload
    is built from the row, so it names the channel the subject ends with."""
    return (
        " logged AS ("
        f"  INSERT INTO {lifecycle.log_table}"
        f"  ({lifecycle.log_fk}, from_status, to_status, reason, channel, created_at)"
        "  SELECT id, %s, %s, %s, channel, %s FROM changed),"
        " announced AS ("
        f"  {OUTBOX_INSERT}"
        f"  SELECT %s, {lifecycle.order_id_column}, jsonb_build_object({lifecycle.subject_sql},"
        "    'status', %s::text, 'channel', channel, 'request_id', %s::text),"
        "  %s, %s FROM changed RETURNING id)"
    )


_CHANNEL_AND_EVENT = " SELECT changed.channel, announced.id, changed.{order_id} FROM changed, announced"


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


def order_signal_ignored(*, order_id, current: str, to: str, reason: str) -> None:
    """Record a signal that asked the order to move to `to` and was not applied (shown to operators)."""
    _record_ignored(order_id, current, to, reason)


def _record_ignored(order_id, current: str, to: str, reason: str) -> None:
    IgnoredSignal.objects.create(
        order_id=order_id, status_at_signal=current, requested_status=to, reason=reason[:200]
    )
    logger.info(
        "order.signal_ignored",
        extra={"order_id": str(order_id), "status": current, "requested": to, "reason": reason},
    )


# --- refunds (SPEC 10) ---------------------------------------------------------------------------------


def _refund_payload(refund_id, order_id, status: str, channel: str | None) -> dict:
    return {"order_id": str(order_id), "refund_id": str(refund_id), "status": status, "channel": channel}


def _refund_due(status: str):
    stage = {R.PENDING: "pending", R.PROCESSING: "processing"}.get(status, "paid")
    return timezone.now() + timedelta(seconds=settings.STAGE_TIMEOUT_SECONDS[stage])


def refund_insert(*, refund: Refund, answer_key_id: int | None = None, answer: dict | None = None) -> None:
    """Insert a new refund with its first transition and its refund-created event, in one statement.

    The caller holds the order's row lock and has taken the amount into `refund_held`.
    """
    refund.created_at = refund.created_at or timezone.now()
    refund.updated_at = refund.updated_at or refund.created_at
    refund.next_check_at = refund.next_check_at or _refund_due(R.PENDING)
    event = event_prepare(
        topic=events.REFUND_CREATED,
        order_id=refund.order_id,
        payload=_refund_payload(refund.id, refund.order_id, R.PENDING, refund.channel),
    )
    _insert(REFUND_LIFECYCLE, refund, "refund created", event, answer_key_id, answer)


# The money a refund's end moves on its order, in the transition's own statement: a success adds
# to amount_refunded; a failure gives its share of refund_held back.
_REFUND_MONEY_SQL = {
    R.SUCCEEDED: "UPDATE orders_order o SET amount_refunded = o.amount_refunded + c.amount,"
    " updated_at = now() FROM changed c WHERE o.id = c.order_id",
    R.FAILED: "UPDATE orders_order o SET refund_held = o.refund_held - c.amount FROM changed c"
    " WHERE o.id = c.order_id",
}


def refund_transition(
    *,
    refund_id,
    to: str,
    reason: str,
    seen_status: str,
    failure_code: str | None = None,
    failure_message: str | None = None,
) -> TransitionResult:
    """Move a refund to `to`, but only from `seen_status`, the state the caller decided it for.

    As for orders: if the refund has moved meanwhile nothing changes, the signal is recorded as
    ignored and the result says where the refund is now; the caller decides again if it must.
    """
    if (seen_status, to) not in REFUND_ALLOWED:
        if seen_status in REFUND_RANK and to in REFUND_RANK and _is_late(seen_status, to, REFUND_LIFECYCLE):
            _record_refund_ignored(refund_id, seen_status, to, reason)
            return TransitionResult(False, seen_status)
        raise IllegalTransition(f"refund {seen_status} -> {to}")
    now = timezone.now()
    changes: dict = {"status": to, "updated_at": now, "check_count": 0, "next_check_at": _refund_due(to)}
    if to == R.FAILED:
        changes["failure_code"] = failure_code
        changes["failure_message"] = failure_message
    event = event_prepare(
        topic=events.REFUND_UPDATED, order_id=None, payload=_refund_payload(refund_id, None, to, None)
    )
    with transaction.atomic(savepoint=False):
        moved = _move(
            {"id": refund_id, "status": seen_status},
            changes,
            seen_status,
            to,
            reason,
            event,
            REFUND_LIFECYCLE,
            then_sql=_REFUND_MONEY_SQL.get(to, ""),
        )
        if moved is not None:
            channel, event_id, order_id = moved
            event.order_id = order_id
            event.payload.update(channel=channel, order_id=str(order_id))
            event_written(event, event_id)
            logger.info(
                "refund.transition", extra={"refund_id": str(refund_id), "from": seen_status, "to": to}
            )
            transaction.on_commit(functools.partial(metrics.refund_transitioned, to=to))
            return TransitionResult(True, to, channel)
    current = Refund.objects.filter(pk=refund_id).values_list("status", flat=True).first()
    if current is None:
        raise Refund.DoesNotExist(refund_id)
    _record_refund_ignored(refund_id, current, to, f"{reason} (decided for {seen_status})")
    return TransitionResult(False, current)


def refund_signal_ignored(*, refund_id, current: str, to: str, reason: str) -> None:
    """Record a signal that asked the refund to move to `to` and was not applied (shown to operators)."""
    _record_refund_ignored(refund_id, current, to, reason)


def _record_refund_ignored(refund_id, current: str, to: str, reason: str) -> None:
    order_id = Refund.objects.filter(pk=refund_id).values_list("order_id", flat=True).first()
    if order_id is None:
        raise Refund.DoesNotExist(refund_id)
    IgnoredSignal.objects.create(
        order_id=order_id,
        refund_id=refund_id,
        status_at_signal=current,
        requested_status=to,
        reason=reason[:200],
    )
    logger.info(
        "refund.signal_ignored",
        extra={"order_id": str(order_id), "refund_id": str(refund_id), "status": current, "requested": to},
    )
