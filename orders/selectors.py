"""Reads of the orders service."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from django.conf import settings
from django.db import connection
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncMinute

from core import prepared, rows
from orders import events
from orders.models import (
    Merchant,
    Order,
    OrderStatus,
    OrderTransition,
    OutboxEvent,
    Refund,
    RefundStatus,
    RefundTransition,
)


def order_list(*, merchant: Merchant, filters: dict) -> QuerySet[Order]:
    qs = Order.objects.filter(merchant=merchant)
    for name in ("status", "outcome", "reference"):
        if name in filters:
            qs = qs.filter(**{name: filters[name]})
    if "created_after" in filters:
        qs = qs.filter(created_at__gte=filters["created_after"])
    if "created_before" in filters:
        qs = qs.filter(created_at__lt=filters["created_before"])
    return qs


def order_fields(*, order_id, fields: tuple[str, ...]) -> Order | None:
    """The order with only `fields` loaded (as QuerySet.only() loads them), from one plain SELECT.

    Every stage reads its order through here once per task; a plain SELECT spares the ORM's
    query compilation on that path (core/rows.py). Other apps read orders' table only through
    this module.
    """
    with connection.cursor() as cursor:
        prepared.execute(
            cursor,
            f"SELECT {rows.select_list(Order, fields)} FROM {Order._meta.db_table} WHERE id = %s",
            [order_id],
        )
        row = cursor.fetchone()
    return None if row is None else rows.instance(Order, fields, row)


@cache
def _order_with_merchant_sql() -> str:
    order, merchant = (
        rows.select_list(Order, rows.all_columns(Order), "o"),
        rows.select_list(Merchant, rows.all_columns(Merchant), "m"),
    )
    return (
        f"SELECT {order}, {merchant} FROM {Order._meta.db_table} o"
        f" JOIN {Merchant._meta.db_table} m ON m.id = o.merchant_id WHERE o.id = %s"
    )


def order_with_merchant(*, order_id) -> Order | None:
    """The whole order with its merchant loaded (select_related("merchant")), from one plain SELECT:
    what a callback needs to build, sign and address its body."""
    with connection.cursor() as cursor:
        prepared.execute(cursor, _order_with_merchant_sql(), [order_id])
        row = cursor.fetchone()
    if row is None:
        return None
    split = len(rows.all_columns(Order))
    order = rows.instance(Order, rows.all_columns(Order), row[:split])
    order.merchant = rows.instance(Merchant, rows.all_columns(Merchant), row[split:])
    return order


def order_get(*, merchant: Merchant, order_id) -> Order | None:
    return Order.objects.filter(merchant=merchant, pk=order_id).first()


def order_transitions(*, order: Order) -> QuerySet[OrderTransition]:
    return OrderTransition.objects.filter(order=order).order_by("id")


def refunds_of_order(*, order: Order) -> QuerySet[Refund]:
    """The order's refunds, oldest first (the refund_order index)."""
    return Refund.objects.filter(order=order).order_by("created_at", "id")


def refund_fields(*, refund_id, fields: tuple[str, ...]) -> Refund | None:
    """The refund with only `fields` loaded: how other apps' stages read a refund row."""
    return Refund.objects.filter(pk=refund_id).only(*fields).first()


def refund_by_id(*, refund_id) -> Refund | None:
    """The whole refund row, whoever's it is (stages and the console, not the merchant API)."""
    return Refund.objects.filter(pk=refund_id).first()


def refund_get(*, merchant: Merchant, refund_id) -> Refund | None:
    return Refund.objects.filter(merchant=merchant, pk=refund_id).first()


def refund_transitions(*, refund: Refund) -> QuerySet[RefundTransition]:
    return RefundTransition.objects.filter(refund=refund).order_by("id")


# --- operators' console (admin, dashboard) -----------------------------------------------------
# Every read below is bounded by an index: the partial indexes on open orders and on
# next_check_at, or a time window on created_at / completed_at. None grows with the number of
# completed orders, so the console costs the same with a million rows as with a hundred.


def orders_open_by_status() -> dict[str, int]:
    """Orders not yet completed, by status (the order_open_by_status partial index)."""
    rows = (
        Order.objects.exclude(status=OrderStatus.COMPLETED)
        .values_list("status")
        .annotate(n=Count("id"))
        .order_by()
    )
    return {status: n for status, n in rows}


def orders_total_estimate() -> int:
    """The planner's row estimate for the orders table: free, and exact enough for a headline."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE oid = %s::regclass",
            [Order._meta.db_table],
        )
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def orders_per_minute(*, since: datetime, until: datetime) -> list[tuple[datetime, int, int]]:
    """(minute, created, completed) for every minute in [since, until), zeros included."""
    start = since.replace(second=0, microsecond=0)
    created = dict(
        Order.objects.filter(created_at__gte=start, created_at__lt=until)
        .annotate(minute=TruncMinute("created_at"))
        .values_list("minute")
        .annotate(n=Count("id"))
        .order_by()
    )
    completed = dict(
        Order.objects.filter(completed_at__gte=start, completed_at__lt=until)
        .annotate(minute=TruncMinute("completed_at"))
        .values_list("minute")
        .annotate(n=Count("id"))
        .order_by()
    )
    series = []
    minute = start
    while minute < until:
        series.append((minute, created.get(minute, 0), completed.get(minute, 0)))
        minute += timedelta(minutes=1)
    return series


@dataclass(frozen=True)
class LatencySummary:
    count: int
    p50: float | None
    p95: float | None
    p99: float | None


def orders_latency(*, since: datetime) -> LatencySummary:
    """Create -> completed seconds of the orders completed since `since` (order_completed index)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP"
            " (ORDER BY EXTRACT(EPOCH FROM completed_at - created_at))"
            " FROM orders_order WHERE completed_at >= %s",
            [since],
        )
        count, quantiles = cursor.fetchone()
    if not count:
        return LatencySummary(0, None, None, None)
    p50, p95, p99 = (float(q) for q in quantiles)
    return LatencySummary(count, p50, p95, p99)


@dataclass(frozen=True)
class StuckOrder:
    order: Order
    why: str


@dataclass(frozen=True)
class StuckRefund:
    refund: Refund
    why: str


_WHY = {
    "gave_up": "the sweep gave up: nothing more will happen by itself",
    "overdue": "its next check is overdue: is beat running?",
    "unanswered": "the provider has not settled it in {checks} status checks: still asking",
}


def _stuck(model, waiting: QuerySet, processing: str, overdue_before: datetime) -> dict[str, QuerySet]:
    """The orders or refunds that need a person, by why: the sweep gave up on one still `waiting`
    for it (next_check_at cleared), its check is long overdue (the partial index on
    next_check_at: beat or workers are down), or the provider has not settled it in a quarter of
    the status checks (about 1.5 h with production's schedule, and hours of asking still to come:
    worth a person asking it too)."""
    return {
        "gave_up": waiting.filter(next_check_at__isnull=True).order_by("created_at"),
        "overdue": model.objects.filter(next_check_at__lt=overdue_before).order_by("next_check_at"),
        "unanswered": model.objects.filter(
            status=processing,
            next_check_at__gte=overdue_before,  # an overdue one is listed as overdue
            check_count__gte=max(1, settings.POLL_MAX_COUNT // 4),
        ).order_by("created_at"),
    }


def _orders_stuck(overdue_before: datetime) -> dict[str, QuerySet]:
    # Open orders: the partial index on them.
    waiting = Order.objects.exclude(status=OrderStatus.COMPLETED)
    return _stuck(Order, waiting, OrderStatus.PROCESSING, overdue_before)


def _refunds_stuck(overdue_before: datetime) -> dict[str, QuerySet]:
    # A pending refund waits to be sent, a processing one for the provider's word, a settled one
    # for its callback's delivery, which then has its own schedule: one with no next check and a
    # full count of them is one the sweep gave up on before that (refund_status_created: refunds
    # are few).
    waiting = Refund.objects.filter(
        Q(status__in=(RefundStatus.PENDING, RefundStatus.PROCESSING))
        | Q(
            status__in=(RefundStatus.SUCCEEDED, RefundStatus.FAILED), check_count__gte=events.MAX_SWEEP_CHECKS
        )
    )
    return _stuck(Refund, waiting, RefundStatus.PROCESSING, overdue_before)


def _listed(kinds: dict[str, QuerySet], fields: tuple[str, ...], limit: int) -> list[tuple]:
    """(row, why) for the oldest `limit` rows of each kind."""
    return [
        (row, _WHY[kind].format(checks=row.check_count))
        for kind, queryset in kinds.items()
        for row in queryset.only(*fields)[:limit]
    ]


def orders_stuck(*, overdue_before: datetime, limit: int = 50) -> list[StuckOrder]:
    """Orders that need a person, the oldest `limit` of each kind (`orders_stuck_counts` counts them)."""
    fields = (
        "id",
        "reference",
        "status",
        "channel",
        "created_at",
        "updated_at",
        "next_check_at",
        "check_count",
    )
    return [StuckOrder(*item) for item in _listed(_orders_stuck(overdue_before), fields, limit)]


def _counted(kinds: dict[str, QuerySet]) -> dict[str, int]:
    return {kind: queryset.order_by().count() for kind, queryset in kinds.items()}


def orders_stuck_counts(*, overdue_before: datetime) -> dict[str, int]:
    """How many orders need a person, by why (the keys of `_stuck`), through the same indexes."""
    return _counted(_orders_stuck(overdue_before))


def refunds_stuck(*, overdue_before: datetime, limit: int = 50) -> list[StuckRefund]:
    """Refunds that need a person, the oldest `limit` of each kind (`refunds_stuck_counts` counts them)."""
    fields = (
        "id",
        "order_id",
        "amount",
        "currency",
        "status",
        "channel",
        "created_at",
        "next_check_at",
        "check_count",
    )
    return [StuckRefund(*item) for item in _listed(_refunds_stuck(overdue_before), fields, limit)]


def refunds_stuck_counts(*, overdue_before: datetime) -> dict[str, int]:
    """How many refunds need a person, by why (the keys of `_stuck`)."""
    return _counted(_refunds_stuck(overdue_before))


def refunds_by_status() -> dict[str, int]:
    """Refunds by status (the refund_status_created index; refunds are far fewer than orders)."""
    rows = Refund.objects.values_list("status").annotate(n=Count("id")).order_by()
    return {status: n for status, n in rows}


def refunded_by_currency() -> dict[str, int]:
    """The amounts of succeeded refunds, summed per currency, in minor units."""
    rows = (
        Refund.objects.filter(status="succeeded")
        .values_list("currency")
        .annotate(total=Sum("amount"))
        .order_by()
    )
    return {currency: int(total) for currency, total in rows}


def outbox_backlog() -> int:
    """Events committed but not published yet (the outbox_unpublished partial index)."""
    return OutboxEvent.objects.filter(published_at__isnull=True).count()
