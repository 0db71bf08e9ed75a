"""Channel allocation: eligibility, priority and weight, atomic daily caps, the circuit breaker."""

import logging
import random
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from allocation.models import PaymentChannel
from config.faults import fault_point
from orders.models import Order, OrderStatus
from orders.redis_client import get_redis
from orders.transitions import TransitionResult, order_transition

logger = logging.getLogger(__name__)

NO_CHANNEL = "no_channel_available"
CHANNEL_UNAVAILABLE = "channel_unavailable"


# The same query the ORM would build from filters (and the model's ordering), written once:
# it runs for every order, and building it was about a fifth of the allocation worker's CPU.
_CANDIDATES_SQL = """
SELECT * FROM allocation_paymentchannel
WHERE enabled AND currencies @> %s::varchar(3)[] AND min_amount <= %s
  AND (max_amount IS NULL OR max_amount >= %s)
  AND (circuit_open_until IS NULL OR circuit_open_until <= %s)
  AND NOT (code = ANY(%s::varchar(64)[]))
ORDER BY priority, code
"""


def channel_candidates(*, currency: str, amount: int, exclude: tuple[str, ...] = ()) -> list[PaymentChannel]:
    """Eligible channels in the order to try them: priority ascending, weighted random within one."""
    channels = list(
        PaymentChannel.objects.raw(
            _CANDIDATES_SQL, [[currency], amount, amount, timezone.now(), list(exclude)]
        )
    )
    # Weighted shuffle (Efraimidis-Spirakis): sort by u^(1/w), u uniform; heavier weights first more often.
    return sorted(channels, key=lambda c: (c.priority, -(random.random() ** (1.0 / max(c.weight, 1)))))


_RESERVE_SQL = """
INSERT INTO allocation_channeldailyvolume (channel_id, day, reserved, orders)
VALUES (%(channel)s, %(day)s, %(amount)s, 1)
ON CONFLICT (channel_id, day) DO UPDATE
SET reserved = allocation_channeldailyvolume.reserved + EXCLUDED.reserved,
    orders = allocation_channeldailyvolume.orders + 1
WHERE %(cap)s::bigint IS NULL OR allocation_channeldailyvolume.reserved + EXCLUDED.reserved <= %(cap)s::bigint
RETURNING reserved
"""


def channel_reserve(*, channel: PaymentChannel, amount: int) -> bool:
    """Add `amount` to today's volume if the cap allows it; one statement, so never oversold."""
    if channel.daily_cap is not None and amount > channel.daily_cap:
        return False
    with connection.cursor() as cursor:
        cursor.execute(
            _RESERVE_SQL,
            {"channel": channel.pk, "day": timezone.now().date(), "amount": amount, "cap": channel.daily_cap},
        )
        return cursor.fetchone() is not None


def channel_release(*, channel_code: str, amount: int) -> None:
    """Give back a reservation whose charge was never made (the provider refused it)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE allocation_channeldailyvolume v SET reserved = GREATEST(v.reserved - %s, 0),"
            " orders = GREATEST(v.orders - 1, 0)"
            " FROM allocation_paymentchannel c WHERE v.channel_id = c.id AND c.code = %s AND v.day = %s",
            [amount, channel_code, timezone.now().date()],
        )


def _assign_first_fitting(
    *, order: Order, candidates: list[PaymentChannel], seen_status: str, seen_channel: str | None, reason: str
) -> TransitionResult | None:
    for channel in candidates:
        with transaction.atomic():
            if not channel_reserve(channel=channel, amount=order.amount):
                continue
            fault_point("allocate.before_commit")
            result = order_transition(
                order_id=order.pk,
                to=OrderStatus.ASSIGNED,
                seen_status=seen_status,
                seen_channel=seen_channel,
                channel=channel.code,
                reason=reason.format(channel=channel.code),
            )
            if not result.applied:
                # Another worker got there first; roll back our reservation with it.
                transaction.set_rollback(True)
            return result
    return None


def _order_for_allocation(order_id) -> Order | None:
    """The fields allocation needs, as QuerySet.only() would load them, from one plain SELECT."""
    names = ["id", "status", "amount", "currency", "channel"]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {', '.join(names)} FROM orders_order WHERE id = %s", [order_id])
        row = cursor.fetchone()
    if row is None:
        return None
    values = dict(zip(names, row, strict=True))
    loaded = [field.attname for field in Order._meta.concrete_fields if field.attname in values]
    return Order.from_db(connection.alias, loaded, [values[name] for name in loaded])


def order_allocate(*, order_id) -> TransitionResult | None:
    """Assign a pending order to a channel, or fail it with no_channel_available."""
    order = _order_for_allocation(order_id)
    if order is None:
        logger.warning("allocate.order_missing", extra={"order_id": str(order_id)})
        return None
    if order.status != OrderStatus.PENDING:
        return TransitionResult(False, order.status, order.channel)
    candidates = channel_candidates(currency=order.currency, amount=order.amount)
    result = _assign_first_fitting(
        order=order,
        candidates=candidates,
        seen_status=OrderStatus.PENDING,
        seen_channel=None,
        reason="allocated to {channel}",
    )
    fault_point("allocate.after_commit")
    if result is not None:
        return result
    return order_transition(
        order_id=order.pk,
        to=OrderStatus.FAILED,
        seen_status=OrderStatus.PENDING,
        reason="no channel fits the order",
        failure_code=NO_CHANNEL,
        failure_message="No enabled channel supports this currency and amount with capacity left.",
    )


def order_reallocate(*, order: Order, failed_channel: str, tried: tuple[str, ...]) -> TransitionResult:
    """Fail over after a definitive rejection: the next candidate, or failed/channel_unavailable."""
    channel_release(channel_code=failed_channel, amount=order.amount)
    candidates = channel_candidates(currency=order.currency, amount=order.amount, exclude=tried)
    result = _assign_first_fitting(
        order=order,
        candidates=candidates,
        seen_status=OrderStatus.ASSIGNED,
        seen_channel=failed_channel,
        reason=f"failover from {failed_channel} (channel_unavailable) to {{channel}}",
    )
    if result is not None:
        return result
    return order_transition(
        order_id=order.pk,
        to=OrderStatus.FAILED,
        seen_status=OrderStatus.ASSIGNED,
        seen_channel=failed_channel,
        reason=f"{failed_channel} unavailable and no channel left",
        failure_code=CHANNEL_UNAVAILABLE,
        failure_message="Every eligible channel refused the charge; nothing was charged.",
    )


def channel_record_failure(*, channel_code: str) -> bool:
    """Count a technical failure; open the circuit when the window's count passes the threshold."""
    window = int(timezone.now().timestamp()) // settings.CIRCUIT_WINDOW_SECONDS
    key = f"circuit:{channel_code}:{window}"
    try:
        pipe = get_redis().pipeline()
        pipe.incr(key)
        pipe.expire(key, settings.CIRCUIT_WINDOW_SECONDS * 2)
        count = pipe.execute()[0]
    except Exception as exc:  # the breaker is an optimisation; Redis trouble must not fail a charge
        logger.warning("circuit.unavailable", extra={"channel": channel_code, "error": repr(exc)})
        return False
    if count < settings.CIRCUIT_FAILURE_THRESHOLD:
        return False
    until = timezone.now() + timedelta(seconds=settings.CIRCUIT_COOLDOWN_SECONDS)
    PaymentChannel.objects.filter(code=channel_code).update(circuit_open_until=until)
    logger.warning("circuit.opened", extra={"channel": channel_code, "failures": count})
    return True


def channel_set_enabled(*, channel: PaymentChannel, enabled: bool) -> None:
    PaymentChannel.objects.filter(pk=channel.pk).update(enabled=enabled)
    logger.info("channel.enabled_changed", extra={"channel": channel.code, "enabled": enabled})


def channel_circuit_close(*, channel: PaymentChannel) -> None:
    """Operator action: close an open circuit now and forget the failures counted so far."""
    import redis

    PaymentChannel.objects.filter(pk=channel.pk).update(circuit_open_until=None)
    window = int(timezone.now().timestamp()) // settings.CIRCUIT_WINDOW_SECONDS
    try:
        get_redis().delete(f"circuit:{channel.code}:{window}")
    except redis.RedisError as exc:  # the counter expires by itself; the circuit is closed anyway
        logger.warning("circuit.reset_unavailable", extra={"channel": channel.code, "error": repr(exc)})
    logger.info("circuit.closed_by_operator", extra={"channel": channel.code})
