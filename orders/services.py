"""Writes of the orders service: merchants, order and refund creation with idempotency, sweeps, pruning."""

import base64
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

import redis
from celery import current_app as current_celery_app
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from core import crypto, metrics, prepared, rows
from core.broker import BROKER_ERRORS, queue_depths
from core.errors import Conflict, InvalidRequest, NotFound, Unprocessable
from core.retention import delete_in_batches
from core.urlsafety import UnsafeUrl, callback_url_check
from orders import events, payment_methods
from orders.models import IdempotencyKey, Merchant, Order, OrderStatus, Outcome, Refund, RefundStatus
from orders.outbox import event_emit
from orders.serializers import order_representation, refund_representation
from orders.transitions import order_insert, refund_insert

logger = logging.getLogger(__name__)

API_KEY_PREFIX = "sk_"
WEBHOOK_SECRET_OVERLAP = timedelta(hours=24)


def _hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def _new_api_key() -> tuple[str, str]:
    prefix = secrets.token_hex(6)
    return prefix, f"{API_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"


def _new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class MerchantCredentials:
    merchant: Merchant
    api_key: str
    webhook_secret: str


def callback_url_validate(url: str) -> None:
    """The one rule for a callback URL, wherever it is set (API, console, command line): public
    http(s) only (core/urlsafety.py). Raises InvalidRequest naming the `callback_url` field."""
    if not url:
        return
    try:
        callback_url_check(url)
    except UnsafeUrl as exc:
        raise InvalidRequest("invalid_request", str(exc), {"callback_url": [str(exc)]}) from exc


def merchant_create(*, name: str, callback_url: str = "") -> MerchantCredentials:
    callback_url_validate(callback_url)
    prefix, api_key = _new_api_key()
    webhook_secret = _new_webhook_secret()
    merchant = Merchant.objects.create(
        name=name,
        api_key_prefix=prefix,
        api_key_hash=_hash_key(api_key),
        webhook_secret_encrypted=crypto.encrypt(webhook_secret),
        callback_url=callback_url,
    )
    logger.info("merchant.created", extra={"merchant": str(merchant.id)})
    return MerchantCredentials(merchant, api_key, webhook_secret)


@cache
def _merchant_by_prefix_sql() -> str:
    columns = rows.select_list(Merchant, rows.all_columns(Merchant))
    return f"SELECT {columns} FROM {Merchant._meta.db_table} WHERE api_key_prefix = %s AND is_active"


def merchant_authenticate(*, api_key: str) -> Merchant | None:
    """The active merchant owning `api_key`, or None. Compares hashes in constant time."""
    if not api_key.startswith(API_KEY_PREFIX):
        return None
    prefix = api_key[len(API_KEY_PREFIX) :].split("_", 1)[0]
    # Every API call runs this: a plain, prepared SELECT spares compiling the same query each time.
    with connection.cursor() as cursor:
        prepared.execute(cursor, _merchant_by_prefix_sql(), [prefix])
        row = cursor.fetchone()
    merchant = None if row is None else rows.instance(Merchant, rows.all_columns(Merchant), row)
    if merchant is None or not hmac.compare_digest(merchant.api_key_hash, _hash_key(api_key)):
        return None
    return merchant


def merchant_rotate_api_key(*, merchant: Merchant) -> str:
    """A new key; the old one stops working at once (rotation is also revocation)."""
    prefix, api_key = _new_api_key()
    merchant.api_key_prefix = prefix
    merchant.api_key_hash = _hash_key(api_key)
    merchant.save(update_fields=["api_key_prefix", "api_key_hash"])
    logger.info("merchant.api_key_rotated", extra={"merchant": str(merchant.id)})
    return api_key


def merchant_rotate_webhook_secret(*, merchant: Merchant) -> str:
    """A new secret; the old one keeps signing beside it for a day so receivers can switch.

    "The old one" is the secret the merchant had before a rotation began: rotated again within
    that day (a second click, two operators at once), the new secret replaces the one just made,
    and the merchant's old secret still signs until its day is over, instead of being dropped at
    once. Rotations of one merchant run one at a time (the row is locked), so none is lost.
    """
    secret = _new_webhook_secret()
    now = timezone.now()
    with transaction.atomic():
        row = (
            Merchant.objects.select_for_update()
            .only(
                "webhook_secret_encrypted",
                "previous_webhook_secret_encrypted",
                "previous_webhook_secret_expires_at",
            )
            .get(pk=merchant.pk)
        )
        expires = row.previous_webhook_secret_expires_at
        if not (row.previous_webhook_secret_encrypted and expires and expires > now):
            row.previous_webhook_secret_encrypted = row.webhook_secret_encrypted
            row.previous_webhook_secret_expires_at = now + WEBHOOK_SECRET_OVERLAP
        row.webhook_secret_encrypted = crypto.encrypt(secret)
        row.save(
            update_fields=[
                "webhook_secret_encrypted",
                "previous_webhook_secret_encrypted",
                "previous_webhook_secret_expires_at",
            ]
        )
    for name in (
        "webhook_secret_encrypted",
        "previous_webhook_secret_encrypted",
        "previous_webhook_secret_expires_at",
    ):
        setattr(merchant, name, getattr(row, name))
    logger.info("merchant.webhook_secret_rotated", extra={"merchant": str(merchant.id)})
    return secret


def merchant_signing_secrets(*, merchant: Merchant) -> list[str]:
    """Secrets to sign with: the current one, plus the previous one during the overlap."""
    result = [crypto.decrypt(merchant.webhook_secret_encrypted)]
    expires = merchant.previous_webhook_secret_expires_at
    if merchant.previous_webhook_secret_encrypted and expires and expires > timezone.now():
        result.append(crypto.decrypt(merchant.previous_webhook_secret_encrypted))
    return result


def merchant_secrets_reencrypt(*, check: bool = False) -> dict[str, crypto.Reencrypted]:
    """Merchants' webhook secrets re-encrypted under the first FIELD_ENCRYPTION_KEY, by column.

    The current secret's column goes first: a rotation meanwhile copies it into the previous
    secret's column, which is done after it.
    """
    return {
        f"orders.merchant.{column}": crypto.reencrypt_column(Merchant, column, check=check)
        for column in ("webhook_secret_encrypted", "previous_webhook_secret_encrypted")
    }


def request_fingerprint(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class CreateResult:
    status: int
    body: dict
    replayed: bool


@dataclass(frozen=True)
class _Claim:
    """An in-flight idempotency key held by this request: its row and the moment it was claimed.

    The moment, written by the database, tells this claim from a later takeover of the same row.
    """

    key_id: int
    claimed_at: datetime


def _claim_key(*, merchant: Merchant, key: str, fingerprint: str) -> _Claim | None:
    """Insert the key as in flight and commit at once, so concurrent requests see it. None: taken."""
    with connection.cursor() as cursor:
        prepared.execute(
            cursor,
            "INSERT INTO orders_idempotencykey (merchant_id, key, request_hash, state, created_at)"
            " VALUES (%s, %s, %s, 'in_flight', now())"
            " ON CONFLICT (merchant_id, key) DO NOTHING RETURNING id, created_at",
            [merchant.id, key, fingerprint],
        )
        row = cursor.fetchone()
    return _Claim(row[0], row[1]) if row else None


def _take_over_stale_key(*, key_id: int) -> _Claim | None:
    """Take over a key left in flight longer than the timeout by a request that died.

    Ages are measured on the database's clock, which wrote `created_at`: a web host whose clock
    runs ahead would otherwise take over a live request's key.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE orders_idempotencykey SET created_at = now()"
            " WHERE id = %s AND state = 'in_flight'"
            " AND created_at < now() - make_interval(secs => %s) RETURNING id, created_at",
            [key_id, settings.IDEMPOTENCY_IN_FLIGHT_TIMEOUT_SECONDS],
        )
        row = cursor.fetchone()
    return _Claim(row[0], row[1]) if row else None


def _release_claim(claim: _Claim) -> None:
    """Let the client retry with the same key, if the key is still this request's claim.

    After a stale takeover the row belongs to a later request, which may have completed it:
    deleting it by id would drop that request's stored answer.
    """
    IdempotencyKey.objects.filter(
        pk=claim.key_id, state=IdempotencyKey.State.IN_FLIGHT, created_at=claim.claimed_at
    ).delete()


def _idempotent(
    *, merchant: Merchant, idempotency_key: str, fingerprint: str, create: Callable[[_Claim], CreateResult]
) -> CreateResult:
    """Run `create` once per Idempotency-Key (SPEC 3, 10: orders and refunds share this); replay
    its stored answer afterwards.

    `fingerprint` identifies the request the key was sent with: the same key with another
    fingerprint is refused. `create` gets the claim and stores its answer under the claim's key in
    the transaction that creates the thing; if it raises, the key is released for a retry.
    """
    claim = _claim_key(merchant=merchant, key=idempotency_key, fingerprint=fingerprint)
    if claim is None:
        existing = IdempotencyKey.objects.filter(merchant=merchant, key=idempotency_key).first()
        if existing is None:  # pruned or released between the two statements: try once more
            claim = _claim_key(merchant=merchant, key=idempotency_key, fingerprint=fingerprint)
            if claim is None:
                raise Conflict("idempotency_key_in_use", "A request with this Idempotency-Key is in flight.")
        elif existing.request_hash != fingerprint:
            raise Unprocessable(
                "idempotency_key_reused",
                "This Idempotency-Key was used for a different request (another body, order or endpoint).",
            )
        elif existing.state == IdempotencyKey.State.DONE:
            return CreateResult(existing.response_status, existing.stored_answer(), True)
        else:
            # A request that died mid-flight left its key in flight: the first retry after the
            # timeout takes it over (the dead request's transaction never committed anything).
            claim = _take_over_stale_key(key_id=existing.pk)
            if claim is None:
                raise Conflict("idempotency_key_in_use", "A request with this Idempotency-Key is in flight.")
    try:
        return create(claim)
    except BaseException:
        # Let the client retry with the same key: nothing was created.
        _release_claim(claim)
        raise


def order_create(
    *,
    merchant: Merchant,
    idempotency_key: str,
    fingerprint: str,
    reference: str,
    amount: int,
    currency: str,
    description: str = "",
    metadata: dict | None = None,
    callback_url: str = "",
    payment_method: str | None = None,
    request_id: str = "",
) -> CreateResult:
    """Create an order once per Idempotency-Key (SPEC 3); replay the stored answer afterwards.

    `fingerprint` identifies the request the key was sent with (request_fingerprint of its
    body): the same key with another fingerprint is refused.
    """
    callback_url_validate(callback_url)

    def create(claim: _Claim) -> CreateResult:
        now = timezone.now()
        order = Order(
            merchant=merchant,
            reference=reference,
            amount=amount,
            currency=currency,
            description=description,
            metadata=metadata or {},
            payment_method=payment_method or None,
            callback_url=callback_url or merchant.callback_url,
            status=OrderStatus.PENDING,
            request_id=request_id,
            created_at=now,
            updated_at=now,
            next_check_at=now + timedelta(seconds=settings.STAGE_TIMEOUT_SECONDS["pending"]),
        )
        body = json.loads(json.dumps(order_representation(order), default=str))
        try:
            with transaction.atomic():
                order_insert(order=order, answer_key_id=claim.key_id, answer=body)
        except IntegrityError as exc:
            if "order_reference_unique_per_merchant" in str(exc):
                raise Conflict(
                    "duplicate_reference",
                    "An order with this reference already exists.",
                    {"reference": ["Already used by another order."]},
                ) from exc
            raise
        logger.info(
            "order.created",
            extra={
                "order_id": str(order.id),
                "merchant": str(merchant.id),
                "amount": order.amount,
                "payment_method": payment_methods.mask(order.payment_method),
            },
        )
        metrics.ORDERS_CREATED.inc()
        return CreateResult(201, body, False)

    return _idempotent(
        merchant=merchant, idempotency_key=idempotency_key, fingerprint=fingerprint, create=create
    )


def refund_fingerprint(*, order_id, data: dict) -> str:
    """A refund request's fingerprint: the order is part of it (the same body for another order is
    another request), and so is the operation (an order's key is never a refund's)."""
    return request_fingerprint({"refund_of_order": str(order_id), **data})


_ORDER_FOR_REFUND_SQL = (
    "SELECT amount, currency, outcome, channel, refund_held FROM orders_order"
    " WHERE id = %s AND merchant_id = %s FOR UPDATE"
)
_HOLD_SQL = "UPDATE orders_order SET refund_held = refund_held + %s WHERE id = %s"


def refund_create(
    *,
    merchant: Merchant,
    order_id,
    idempotency_key: str,
    fingerprint: str,
    amount: int | None = None,
    reason: str | None = None,
    reference: str | None = None,
    metadata: dict | None = None,
    request_id: str = "",
) -> CreateResult:
    """Create a refund of a paid order once per Idempotency-Key (SPEC 10); `amount` None: all
    that is still refundable.

    The order's row is locked (SELECT ... FOR UPDATE) while what is left to refund is read and the
    refund's amount is taken into `refund_held`, so concurrent requests are counted one after
    another; the CHECK on the order (refund_held <= amount) refuses anything that slipped past.
    """

    def create(claim: _Claim) -> CreateResult:
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute(_ORDER_FOR_REFUND_SQL, [order_id, merchant.pk])
                    row = cursor.fetchone()
                if row is None:
                    raise NotFound("not_found", "No such order.")
                order_amount, currency, outcome, channel, held = row
                if outcome != Outcome.PAID:
                    raise Conflict("order_not_refundable", "Only a paid order can be refunded.")
                left = order_amount - held
                wanted = left if amount is None else amount
                if amount is None and left <= 0:
                    # No amount was sent: name no field, say nothing is left (SPEC 10's code).
                    message = (
                        f"Nothing is left to refund: refunds made or under way cover all {order_amount}."
                    )
                    raise InvalidRequest("amount_exceeds_refundable", message)
                if wanted > left:
                    message = f"At most {left} is still refundable."
                    raise InvalidRequest("amount_exceeds_refundable", message, {"amount": [message]})
                now = timezone.now()
                refund = Refund(
                    order_id=order_id,
                    merchant=merchant,
                    amount=wanted,
                    currency=currency,
                    status=RefundStatus.PENDING,
                    reason=reason,
                    reference=reference,
                    metadata=metadata or {},
                    channel=channel,
                    request_id=request_id,
                    created_at=now,
                    updated_at=now,
                )
                body = json.loads(json.dumps(refund_representation(refund), default=str))
                with connection.cursor() as cursor:
                    cursor.execute(_HOLD_SQL, [wanted, order_id])
                refund_insert(refund=refund, answer_key_id=claim.key_id, answer=body)
        except IntegrityError as exc:
            if "refund_reference_unique_per_merchant" in str(exc):
                raise Conflict(
                    "duplicate_reference",
                    "A refund with this reference already exists.",
                    {"reference": ["Already used by another refund."]},
                ) from exc
            raise
        logger.info(
            "refund.created",
            extra={"order_id": str(order_id), "refund_id": str(refund.id), "amount": refund.amount},
        )
        metrics.REFUNDS_CREATED.inc()
        return CreateResult(201, body, False)

    return _idempotent(
        merchant=merchant, idempotency_key=idempotency_key, fingerprint=fingerprint, create=create
    )


def order_provider_reference_set(*, order_id, reference: str) -> bool:
    """Record the provider's id for the order's charge once it is known; a known one never changes.

    Not a transition (the status is transitions.py's alone): a fact about the charge, written by
    the gateway as soon as the provider names it.
    """
    if not reference:
        return False
    with connection.cursor() as cursor:
        prepared.execute(
            cursor,
            "UPDATE orders_order SET provider_reference = %s, updated_at = now()"
            " WHERE id = %s AND provider_reference IS NULL",
            [reference[:128], order_id],
        )
        return cursor.rowcount == 1


def idempotency_keys_prune(*, older_than_hours: int) -> int:
    cutoff = timezone.now() - timedelta(hours=older_than_hours)
    deleted, _ = IdempotencyKey.objects.filter(created_at__lt=cutoff).delete()
    return deleted


class DeepQueues:
    """The service queues holding at least SWEEP_HOLD_QUEUE_DEPTH messages, read from the broker
    once per sweep pass, before its transaction takes any row lock, and only if something is due.

    An overdue order whose stage's queue is that deep is most likely waiting in it: re-announcing
    it would add a second message behind the first, and under a backlog longer than the stage's
    timeout every pass would add more, so an overloaded stage would be handed more work the further
    behind it fell. Held, the order is looked at again one stage timeout later, its check not
    counted; a message that was really lost is re-announced once the queue is shallower. A broker
    that cannot be read holds nothing back: the sweep then re-announces as it always did.
    """

    def __init__(self, due) -> None:
        """`due`: the rows the pass will look at (an unevaluated queryset); the broker is read only
        when the hold is on and one of them exists."""
        self._deep: frozenset[str] = frozenset()
        limit = settings.SWEEP_HOLD_QUEUE_DEPTH
        if limit <= 0 or not due.exists():
            return
        try:
            depths = queue_depths()
        except (redis.RedisError, *BROKER_ERRORS) as exc:
            logger.warning("sweep.queue_depth_unavailable", extra={"error": repr(exc)})
            return
        self._deep = frozenset(queue for queue, n in depths.items() if n >= limit)

    def holds(self, topic: str, payload: dict) -> bool:
        if not self._deep:
            return False
        router = current_celery_app.amqp.router
        return any(
            router.route({}, task)["queue"].name in self._deep
            for task in events.subscribers_for(topic, payload)
        )


def _reannounce_or_hold(
    model, row, *, order_id, topic: str, payload: dict, base: float, now: datetime, deep: DeepQueues
) -> bool:
    """Re-announce an overdue order or refund (its next due time doubling from `base` per check),
    or hold it one `base` while its stage's queue is deep. True when held."""
    if deep.holds(topic, payload):
        model.objects.filter(pk=row.pk).update(next_check_at=now + timedelta(seconds=base))
        return True
    delay = min(base * (2 ** min(row.check_count, 16)), settings.SWEEP_MAX_BACKOFF_SECONDS)
    model.objects.filter(pk=row.pk).update(
        next_check_at=now + timedelta(seconds=delay), check_count=row.check_count + 1
    )
    event_emit(topic=topic, order_id=order_id, payload=payload)
    return False


def orders_sweep(*, batch: int) -> int:
    """Re-announce orders whose stage is overdue (SPEC 8); each subscriber is idempotent.

    Reads through the partial index on next_check_at, so completed orders cost nothing.
    An order re-announced events.MAX_SWEEP_CHECKS times (or POLL_MAX_COUNT for processing) is left
    for operators: its next_check_at becomes NULL and the console lists it as stuck. An order
    whose stage's queue is deep is held for a stage timeout instead (DeepQueues).
    """
    now = timezone.now()
    deep = DeepQueues(Order.objects.filter(next_check_at__lte=now))
    held = 0
    with transaction.atomic():
        stuck = list(
            Order.objects.select_for_update(skip_locked=True)
            .filter(next_check_at__lte=now)
            .order_by("next_check_at")
            .only("id", "status", "channel", "check_count")[:batch]
        )
        for order in stuck:
            topic = events.REANNOUNCE.get(order.status)
            limit = (
                settings.POLL_MAX_COUNT if order.status == OrderStatus.PROCESSING else events.MAX_SWEEP_CHECKS
            )
            if topic is None or order.check_count >= limit:
                Order.objects.filter(pk=order.pk).update(next_check_at=None)
                logger.warning(
                    "order.sweep_gave_up", extra={"order_id": str(order.id), "status": order.status}
                )
                continue
            base = (
                settings.POLL_INTERVAL_SECONDS
                if order.status == OrderStatus.PROCESSING
                else settings.STAGE_TIMEOUT_SECONDS[order.status]
            )
            payload = {
                "order_id": str(order.id),
                "status": order.status,
                "channel": order.channel,
                "redelivery": True,
            }
            held += _reannounce_or_hold(
                Order, order, order_id=order.id, topic=topic, payload=payload, base=base, now=now, deep=deep
            )
    if stuck:
        logger.info("orders.swept", extra={"count": len(stuck) - held, "held": held})
    return len(stuck) - held


# --- refunds: due times (SPEC 9: waiting is stored on the row, swept by beat) ---------------------------


def refunds_sweep(*, batch: int) -> int:
    """Re-announce refunds whose stage is overdue; each subscriber is idempotent.

    Reads through the partial index on next_check_at, so settled refunds cost nothing.
    """
    now = timezone.now()
    deep = DeepQueues(Refund.objects.filter(next_check_at__lte=now))
    held = 0
    with transaction.atomic():
        due = list(
            Refund.objects.select_for_update(skip_locked=True)
            .filter(next_check_at__lte=now)
            .order_by("next_check_at")
            .only("id", "order_id", "status", "channel", "check_count")[:batch]
        )
        for refund in due:
            processing = refund.status == RefundStatus.PROCESSING
            limit = settings.POLL_MAX_COUNT if processing else events.MAX_SWEEP_CHECKS
            if refund.check_count >= limit:
                Refund.objects.filter(pk=refund.pk).update(next_check_at=None)
                logger.warning(
                    "refund.sweep_gave_up",
                    extra={
                        "order_id": str(refund.order_id),
                        "refund_id": str(refund.pk),
                        "status": refund.status,
                    },
                )
                continue
            stage = {RefundStatus.PENDING: "pending", RefundStatus.PROCESSING: "processing"}.get(
                refund.status, "paid"
            )
            base = settings.POLL_INTERVAL_SECONDS if processing else settings.STAGE_TIMEOUT_SECONDS[stage]
            topic = events.REFUND_REANNOUNCE[refund.status]
            payload = {
                "order_id": str(refund.order_id),
                "refund_id": str(refund.pk),
                "status": refund.status,
                "channel": refund.channel,
                "redelivery": True,
            }
            held += _reannounce_or_hold(
                Refund,
                refund,
                order_id=refund.order_id,
                topic=topic,
                payload=payload,
                base=base,
                now=now,
                deep=deep,
            )
    if due:
        logger.info("refunds.swept", extra={"count": len(due) - held, "held": held})
    return len(due) - held


def order_poll_due_now(*, order_id) -> None:
    """A processing order whose provider is to be asked at the next sweep, not after the first
    poll's delay: the gateway could not tell which of the words it got is about our charge."""
    Order.objects.filter(pk=order_id, status=OrderStatus.PROCESSING).update(next_check_at=timezone.now())


def refund_poll_due_now(*, refund_id) -> None:
    """The same for a processing refund."""
    Refund.objects.filter(pk=refund_id, status=RefundStatus.PROCESSING).update(next_check_at=timezone.now())


def order_resume(*, order_id) -> bool:
    """A pending or assigned order the sweep gave up on (its stage's workers were down for a day,
    say) is due now, its checks counted afresh: an operator's "Re-query" once the workers are back.
    Every stage it is re-announced to is idempotent."""
    return bool(
        Order.objects.filter(
            pk=order_id, status__in=(OrderStatus.PENDING, OrderStatus.ASSIGNED), next_check_at__isnull=True
        ).update(next_check_at=timezone.now(), check_count=0)
    )


def refund_resume(*, refund_id) -> bool:
    """An operator has the sweep take a refund up again now, its checks counted afresh: a pending
    one (the sweep gave up on it while the gateway's workers were down, say) is sent again, which
    is safe, since the refund keeps its one key at the provider; a settled one the sweep gave up on
    before its callback had a delivery gets its callback. A settled one with a delivery is left to
    the delivery's own schedule."""
    gave_up_before_its_callback = Q(
        status__in=(RefundStatus.SUCCEEDED, RefundStatus.FAILED),
        next_check_at__isnull=True,
        check_count__gte=events.MAX_SWEEP_CHECKS,
    )
    return bool(
        Refund.objects.filter(
            Q(status=RefundStatus.PENDING) | gave_up_before_its_callback, pk=refund_id
        ).update(next_check_at=timezone.now(), check_count=0)
    )


def refund_retry_later(*, refund_id, seconds: float) -> bool:
    """A pending refund the provider asked us to send again later: due then (not a countdown)."""
    return bool(
        Refund.objects.filter(pk=refund_id, status=RefundStatus.PENDING).update(
            next_check_at=timezone.now() + timedelta(seconds=seconds)
        )
    )


def refund_callback_scheduled(*, refund_id) -> None:
    """The refund's callback has its delivery row: its own schedule takes over from the sweep."""
    Refund.objects.filter(pk=refund_id, status__in=(RefundStatus.SUCCEEDED, RefundStatus.FAILED)).update(
        next_check_at=None
    )


# --- Retention (SPEC 12): history-only rows of the orders service. Orders and transitions stay.
_PRUNE_OUTBOX_SQL = """
DELETE FROM orders_outboxevent WHERE id = ANY(ARRAY(
    SELECT id FROM orders_outboxevent WHERE published_at < %(before)s
    ORDER BY published_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED))
"""
_PRUNE_IGNORED_SQL = """
DELETE FROM orders_ignoredsignal WHERE id = ANY(ARRAY(
    SELECT id FROM orders_ignoredsignal WHERE created_at < %(before)s
    ORDER BY created_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED))
"""


def history_prune(*, before: datetime, batch: int, max_batches: int) -> dict[str, int]:
    """Delete published outbox events and ignored signals older than `before`, in batches
    through the outbox_published and ignoredsignal_created indexes. An unpublished event is
    never deleted, however old: it is work the relay still owes."""
    return {
        table: delete_in_batches(sql, before=before, batch=batch, max_batches=max_batches)
        for table, sql in (("outbox", _PRUNE_OUTBOX_SQL), ("ignored_signals", _PRUNE_IGNORED_SQL))
    }
