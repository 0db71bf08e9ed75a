"""Channel allocation: eligibility, priority and weight, atomic daily caps, the circuit breaker."""

import logging
import random
from datetime import date, timedelta
from functools import cache

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from allocation.models import PaymentChannel
from allocation.selectors import channel_cache_clear
from core import crypto, prepared, rows
from core.errors import InvalidRequest
from core.faults import fault_point
from core.redis import get_redis
from orders.models import Order, OrderStatus
from orders.selectors import order_fields
from orders.transitions import TransitionResult, order_transition

logger = logging.getLogger(__name__)

NO_CHANNEL = "no_channel_available"
CHANNEL_UNAVAILABLE = "channel_unavailable"

# Providers that charge a payer's payment-method token (SPEC 11), by the token's prefix. An order
# with a token goes only to these providers' channels; one without, only to the others.
TOKEN_PROVIDERS = {"pm_": ("stripe",)}
_ALL_TOKEN_PROVIDERS = sorted({p for providers in TOKEN_PROVIDERS.values() for p in providers})


def _providers_filter(payment_method: str | None) -> tuple[bool, list[str]]:
    """(include, providers): channels whose provider is (include) or is not (exclude) in the list."""
    if not payment_method:
        return False, _ALL_TOKEN_PROVIDERS
    for prefix, providers in TOKEN_PROVIDERS.items():
        if payment_method.startswith(prefix):
            return True, list(providers)
    return True, []  # a token no provider takes: no channel fits


# The same query the ORM would build from filters (and the model's ordering), written once:
# it runs for every order, and building it was about a fifth of the allocation worker's CPU.
_CANDIDATES_SQL = """
SELECT {columns} FROM allocation_paymentchannel
WHERE enabled AND currencies @> %s::varchar(3)[] AND min_amount <= %s
  AND (max_amount IS NULL OR max_amount >= %s)
  AND (circuit_open_until IS NULL OR circuit_open_until <= %s)
  AND NOT (code = ANY(%s::varchar(64)[]))
  AND (provider = ANY(%s::varchar(32)[])) = %s
ORDER BY priority, code
"""


@cache
def _candidates_sql() -> str:
    return _CANDIDATES_SQL.format(columns=rows.select_list(PaymentChannel, rows.all_columns(PaymentChannel)))


def channel_candidates(
    *, currency: str, amount: int, exclude: tuple[str, ...] = (), payment_method: str | None = None
) -> list[PaymentChannel]:
    """Eligible channels in the order to try them: priority ascending, weighted random within one.

    Only channels whose provider can charge the order's payment method (SPEC 11): a `pm_` token
    goes to Stripe channels only, an order without a token to the providers that need none.
    """
    include, providers = _providers_filter(payment_method)
    columns = rows.all_columns(PaymentChannel)
    with connection.cursor() as cursor:
        prepared.execute(
            cursor,
            _candidates_sql(),
            [[currency], amount, amount, timezone.now(), list(exclude), providers, include],
        )
        channels = [rows.instance(PaymentChannel, columns, row) for row in cursor.fetchall()]
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


def channel_reserve(*, channel: PaymentChannel, amount: int, day: date | None = None) -> bool:
    """Add `amount` to `day`'s (today's) volume if the cap allows it; one statement, never oversold."""
    if channel.daily_cap is not None and amount > channel.daily_cap:
        return False
    day = day or timezone.now().date()
    with connection.cursor() as cursor:
        prepared.execute(
            cursor,
            _RESERVE_SQL,
            {"channel": channel.pk, "day": day, "amount": amount, "cap": channel.daily_cap},
        )
        return cursor.fetchone() is not None


def channel_release(*, channel_code: str, amount: int, day: date | None) -> None:
    """Give back a reservation whose charge was never made (the provider refused it).

    The caller releases once per reservation (gateway: only the copy that records the refusal);
    `day` is the reservation's own day, so a refusal after midnight gives back the right one.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE allocation_channeldailyvolume v SET reserved = GREATEST(v.reserved - %s, 0),"
            " orders = GREATEST(v.orders - 1, 0)"
            " FROM allocation_paymentchannel c WHERE v.channel_id = c.id AND c.code = %s AND v.day = %s",
            [amount, channel_code, day or timezone.now().date()],
        )


def _trial_key(code: str) -> str:
    return f"circuit:{code}:trial"


def _trial_seconds() -> int:
    # As long as one charge can take: the trial's answer (or its timeout) comes within it.
    return int(settings.GATEWAY_CONNECT_TIMEOUT + settings.GATEWAY_READ_TIMEOUT) + 2


def _may_use(channel: PaymentChannel, now) -> bool:
    """A closed circuit takes every order; a half-open one (cool-down over) one trial at a time."""
    if channel.circuit_open_until is None:
        return True
    try:
        return bool(get_redis().set(_trial_key(channel.code), "1", nx=True, ex=_trial_seconds()))
    except Exception as exc:  # no Redis: no trial bookkeeping; let the order try the channel
        logger.warning("circuit.trial_unavailable", extra={"channel": channel.code, "error": repr(exc)})
        return True


def _assign_first_fitting(
    *, order: Order, candidates: list[PaymentChannel], seen_status: str, seen_channel: str | None, reason: str
) -> tuple[TransitionResult | None, bool]:
    """The transition to the first candidate that takes the order (None: none did), and whether a
    half-open candidate was passed over because another order's trial was out on it."""
    now = timezone.now()
    day = now.date()
    trial_out = False
    for channel in candidates:
        if not _may_use(channel, now):
            trial_out = True
            continue
        with transaction.atomic():
            if not channel_reserve(channel=channel, amount=order.amount, day=day):
                continue
            fault_point("allocate.before_commit")
            result = order_transition(
                order_id=order.pk,
                to=OrderStatus.ASSIGNED,
                seen_status=seen_status,
                seen_channel=seen_channel,
                channel=channel.code,
                reserved_on=day,
                reason=reason.format(channel=channel.code),
            )
            if not result.applied:
                # Another worker got there first; roll back our reservation with it.
                transaction.set_rollback(True)
            return result, trial_out
    return None, trial_out


# Fitting channels (currency, amount, room under today's cap) whose circuit is open or half-open:
# the earliest moment one of them may take the order again.
_COOLING_SQL = """
SELECT min(c.circuit_open_until) FROM allocation_paymentchannel c
LEFT JOIN allocation_channeldailyvolume v ON v.channel_id = c.id AND v.day = %s
WHERE c.enabled AND c.currencies @> %s::varchar(3)[] AND c.min_amount <= %s
  AND (c.max_amount IS NULL OR c.max_amount >= %s)
  AND c.circuit_open_until IS NOT NULL
  AND (c.daily_cap IS NULL OR COALESCE(v.reserved, 0) + %s <= c.daily_cap)
  AND NOT (c.code = ANY(%s::varchar(64)[]))
  AND (c.provider = ANY(%s::varchar(32)[])) = %s
"""


def _cooling_until(*, order: Order, exclude: tuple[str, ...]):
    now = timezone.now()
    include, providers = _providers_filter(order.payment_method)
    with connection.cursor() as cursor:
        cursor.execute(
            _COOLING_SQL,
            [
                now.date(),
                [order.currency],
                order.amount,
                order.amount,
                order.amount,
                list(exclude),
                providers,
                include,
            ],
        )
        return cursor.fetchone()[0]


def _wait_or_fail(
    *,
    order: Order,
    seen_status: str,
    seen_channel: str | None,
    exclude: tuple[str, ...],
    failed_reason: str,
    trial_out: bool,
) -> TransitionResult:
    """No channel can take the order now. Wait for one that is only cooling down, or fail.

    A channel whose breaker is open is coming back: the order keeps its state with a due time
    (the sweep brings it back here then), until CHANNEL_WAIT_SECONDS after its creation.
    `trial_out`: a half-open candidate was passed over for another order's trial.
    """
    reopen = _cooling_until(order=order, exclude=exclude)
    now = timezone.now()
    deadline = order.created_at + timedelta(seconds=settings.CHANNEL_WAIT_SECONDS)
    # When a channel that fits is coming back (None: none is), and the order should look again.
    if reopen is not None:
        # A half-open channel whose trial is taken: look again when that trial has answered.
        due = min(max(reopen, now + timedelta(seconds=_trial_seconds())), deadline)
    elif trial_out:
        # That trial has answered since, and closed the breaker: the channel takes orders again,
        # so this order is due at once (the sweep's next pass), not failed for want of a channel.
        due = now
    else:
        due = None
    if due is not None and now < deadline:
        waiting = Order.objects.filter(pk=order.pk, status=seen_status, channel=seen_channel).update(
            next_check_at=due, check_count=0
        )
        logger.info(
            "allocate.waiting_for_channel",
            extra={"order_id": str(order.pk), "until": due.isoformat(), "moved_on": not waiting},
        )
        return TransitionResult(False, seen_status, seen_channel)
    if due is not None:
        code, message = CHANNEL_UNAVAILABLE, "Every eligible channel stayed unavailable; nothing was charged."
    elif seen_status == OrderStatus.ASSIGNED:
        code, message = CHANNEL_UNAVAILABLE, "Every eligible channel refused the charge; nothing was charged."
    else:
        code, message = NO_CHANNEL, "No enabled channel supports this currency and amount with capacity left."
    return order_transition(
        order_id=order.pk,
        to=OrderStatus.FAILED,
        seen_status=seen_status,
        seen_channel=seen_channel,
        reason=failed_reason if due is None else "channels still unavailable after waiting for them",
        failure_code=code,
        failure_message=message,
    )


_ALLOCATION_FIELDS = ("id", "status", "amount", "currency", "channel", "created_at", "payment_method")


def order_allocate(*, order_id) -> TransitionResult | None:
    """Assign a pending order to a channel; wait for a cooling channel; or fail it."""
    order = order_fields(order_id=order_id, fields=_ALLOCATION_FIELDS)
    if order is None:
        logger.warning("allocate.order_missing", extra={"order_id": str(order_id)})
        return None
    if order.status != OrderStatus.PENDING:
        return TransitionResult(False, order.status, order.channel)
    candidates = channel_candidates(
        currency=order.currency, amount=order.amount, payment_method=order.payment_method
    )
    result, trial_out = _assign_first_fitting(
        order=order,
        candidates=candidates,
        seen_status=OrderStatus.PENDING,
        seen_channel=None,
        reason="allocated to {channel}",
    )
    fault_point("allocate.after_commit")
    if result is not None:
        return result
    return _wait_or_fail(
        order=order,
        seen_status=OrderStatus.PENDING,
        seen_channel=None,
        exclude=(),
        failed_reason="no channel fits the order",
        trial_out=trial_out,
    )


def order_reallocate(
    *, order: Order, failed_channel: str, refused_by: tuple[str, ...], refusal: str = "channel_unavailable"
) -> TransitionResult:
    """Fail over after a definitive refusal (`refusal`: what the channel answered, for the log):
    the next channel that has not refused this order.

    Decided for the order as the caller read it (assigned to `failed_channel`): if it has moved
    on, nothing here applies. The refused channel's reservation was given back by the caller.
    """
    candidates = channel_candidates(
        currency=order.currency, amount=order.amount, exclude=refused_by, payment_method=order.payment_method
    )
    result, trial_out = _assign_first_fitting(
        order=order,
        candidates=candidates,
        seen_status=OrderStatus.ASSIGNED,
        seen_channel=failed_channel,
        reason=f"failover from {failed_channel} ({refusal[:80]}) to {{channel}}",
    )
    if result is not None:
        return result
    return _wait_or_fail(
        order=order,
        seen_status=OrderStatus.ASSIGNED,
        seen_channel=failed_channel,
        exclude=refused_by,
        failed_reason=f"{failed_channel} unavailable and no channel left",
        trial_out=trial_out,
    )


def _circuit_keys(channel_code: str) -> tuple[str, str]:
    window = int(timezone.now().timestamp()) // settings.CIRCUIT_WINDOW_SECONDS
    return f"circuit:{channel_code}:{window}", f"circuit:{channel_code}:{window}:ok"


def channel_record_success(*, channel: PaymentChannel) -> None:
    """Count an accepted charge; a half-open circuit whose trial was accepted closes."""
    failed_key, ok_key = _circuit_keys(channel.code)
    try:
        pipe = get_redis().pipeline(transaction=False)
        pipe.incr(ok_key)
        pipe.expire(ok_key, settings.CIRCUIT_WINDOW_SECONDS * 2)
        if channel.circuit_open_until is not None:
            pipe.delete(failed_key, _trial_key(channel.code))
        pipe.execute()
    except Exception as exc:  # the breaker is an optimisation; Redis trouble must not fail a charge
        logger.warning("circuit.unavailable", extra={"channel": channel.code, "error": repr(exc)})
    if channel.circuit_open_until is not None:
        closed = PaymentChannel.objects.filter(
            code=channel.code, circuit_open_until__lte=timezone.now()
        ).update(circuit_open_until=None)
        if closed:
            channel_cache_clear()
            logger.info("circuit.closed", extra={"channel": channel.code})


def channel_record_failure(*, channel_code: str) -> bool:
    """Count a failed charge; open the circuit when the window's failures are many and frequent.

    A half-open circuit (cool-down over, trial let through) opens again at its first failure.
    """
    now = timezone.now()
    until = now + timedelta(seconds=settings.CIRCUIT_COOLDOWN_SECONDS)
    reopened = PaymentChannel.objects.filter(code=channel_code, circuit_open_until__lte=now).update(
        circuit_open_until=until
    )
    if reopened:
        channel_cache_clear()
        logger.warning("circuit.reopened", extra={"channel": channel_code})
        return True
    failed_key, ok_key = _circuit_keys(channel_code)
    try:
        pipe = get_redis().pipeline(transaction=False)
        pipe.incr(failed_key)
        pipe.expire(failed_key, settings.CIRCUIT_WINDOW_SECONDS * 2)
        pipe.get(ok_key)
        failed, _, ok = pipe.execute()
    except Exception as exc:  # the breaker is an optimisation; Redis trouble must not fail a charge
        logger.warning("circuit.unavailable", extra={"channel": channel_code, "error": repr(exc)})
        return False
    ok = int(ok or 0)
    if failed < settings.CIRCUIT_FAILURE_THRESHOLD or failed < settings.CIRCUIT_FAILURE_RATIO * (failed + ok):
        return False
    PaymentChannel.objects.filter(code=channel_code).update(circuit_open_until=until)
    try:
        get_redis().delete(failed_key, ok_key)  # the next window starts afresh after the cool-down
    except Exception:  # noqa: S110 - the counters expire by themselves
        pass
    channel_cache_clear()
    logger.warning("circuit.opened", extra={"channel": channel_code, "failures": failed, "accepted": ok})
    return True


class InvalidCredential(InvalidRequest):
    """A channel credential that cannot be what the provider issues (the message never echoes it)."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_credential", message)


# What each provider's credentials look like (Stripe: secret or restricted keys, endpoint secrets).
_CREDENTIAL_PREFIXES = {
    "stripe": {"api_key": ("sk_", "rk_"), "webhook_secret": ("whsec_",)},
}


def _check_credential(provider: str, kind: str, value: str) -> None:
    if not value or len(value) > 500 or not value.isprintable() or not value.isascii() or " " in value:
        raise InvalidCredential(f"The {kind.replace('_', ' ')} must be 1 to 500 printable characters.")
    prefixes = _CREDENTIAL_PREFIXES.get(provider, {}).get(kind)
    if prefixes and not value.startswith(prefixes):
        raise InvalidCredential(f"A {provider} {kind.replace('_', ' ')} starts with {' or '.join(prefixes)}.")


def channel_credentials_set(
    *, channel: PaymentChannel, api_key: str | None = None, webhook_secret: str | None = None
) -> list[str]:
    """Set or rotate a channel's API key and/or webhook endpoint secret, stored encrypted.

    None leaves a credential as it is. Returns the names of what changed; the values are never
    logged or returned.
    """
    changes: dict[str, str] = {}
    if api_key is not None:
        _check_credential(channel.provider, "api_key", api_key)
        changes["api_key_encrypted"] = crypto.encrypt(api_key)
    if webhook_secret is not None:
        _check_credential(channel.provider, "webhook_secret", webhook_secret)
        changes["webhook_secret_encrypted"] = crypto.encrypt(webhook_secret)
    if changes:
        PaymentChannel.objects.filter(pk=channel.pk).update(**changes)
        channel_cache_clear()
        logger.info("channel.credentials_set", extra={"channel": channel.code, "changed": sorted(changes)})
    return sorted(name.removesuffix("_encrypted") for name in changes)


def channel_secrets_reencrypt(*, check: bool = False) -> dict[str, crypto.Reencrypted]:
    """Channels' API keys and webhook secrets re-encrypted under the first FIELD_ENCRYPTION_KEY."""
    return {
        f"allocation.paymentchannel.{column}": crypto.reencrypt_column(PaymentChannel, column, check=check)
        for column in ("api_key_encrypted", "webhook_secret_encrypted")
    }


def channel_create(*, channel: PaymentChannel) -> PaymentChannel:
    """Operator action: a new channel (validated by the console's form); allocation takes it at once.

    Its API key and webhook secret are set afterwards, encrypted (channel_credentials_set).
    """
    channel.save()
    channel_cache_clear()
    logger.info("channel.created", extra={"channel": channel.code, "provider": channel.provider})
    return channel


def channel_set_enabled(*, channel: PaymentChannel, enabled: bool) -> None:
    PaymentChannel.objects.filter(pk=channel.pk).update(enabled=enabled)
    logger.info("channel.enabled_changed", extra={"channel": channel.code, "enabled": enabled})


def channel_circuit_close(*, channel: PaymentChannel) -> None:
    """Operator action: close an open circuit now and forget the failures counted so far."""
    import redis

    PaymentChannel.objects.filter(pk=channel.pk).update(circuit_open_until=None)
    channel_cache_clear()
    try:
        get_redis().delete(*_circuit_keys(channel.code), _trial_key(channel.code))
    except redis.RedisError as exc:  # the counter expires by itself; the circuit is closed anyway
        logger.warning("circuit.reset_unavailable", extra={"channel": channel.code, "error": repr(exc)})
    logger.info("circuit.closed_by_operator", extra={"channel": channel.code})
