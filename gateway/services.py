"""The gateway service: charge exactly once, learn outcomes from webhooks or polling (SPEC 5)."""

import enum
import functools
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.urls import reverse
from django.utils import timezone

from allocation.models import PaymentChannel
from allocation.selectors import channel_by_code
from allocation.services import (
    channel_record_failure,
    channel_record_success,
    channel_release,
    order_reallocate,
)
from core import metrics, prepared, rows
from core.faults import fault_point
from core.logging import request_id_var
from core.retention import delete_in_batches
from core.tasks import stage_send
from gateway.models import ChargeAttempt, RefundAttempt
from gateway.providers.base import (
    ChargeOutcome,
    ChargeRequest,
    ChargeResult,
    RefundRequest,
    RefundResult,
    StatusResult,
    WebhookEvent,
    get_adapter,
)
from orders import events
from orders.models import Order, OrderStatus, Refund, RefundStatus
from orders.selectors import order_fields, refund_fields
from orders.services import (
    order_poll_due_now,
    order_provider_reference_set,
    refund_poll_due_now,
    refund_retry_later,
)
from orders.transitions import (
    TransitionResult,
    order_signal_ignored,
    order_transition,
    refund_signal_ignored,
    refund_transition,
)

logger = logging.getLogger(__name__)

A = ChargeAttempt.Status


def _ms_since(started: float) -> int:
    """Milliseconds since `started` (time.monotonic()): how long the provider took to answer."""
    return round((time.monotonic() - started) * 1000)


def _idempotency_key(order_id, channel_code: str) -> str:
    # Derived from the order and the attempt (one attempt per channel): a retried or duplicated
    # charge task sends the same key, so the provider charges at most once per channel.
    return f"{order_id}:{channel_code}"


def _webhook_url(provider: str) -> str:
    return settings.PUBLIC_BASE_URL + reverse("provider-webhook", kwargs={"provider": provider})


def _lease_seconds() -> float:
    # Longer than one send can take (connect + read timeouts), so a live sender keeps it throughout.
    return settings.GATEWAY_CONNECT_TIMEOUT + settings.GATEWAY_READ_TIMEOUT + 2.0


# The first claim inserts the attempt with its key, every fact its request is built from, and the
# sending lease. ON CONFLICT without a target also covers attempt_one_live_per_order: an order
# that has a live attempt on another channel gets no second one.
_CLAIM_SQL = (
    "INSERT INTO gateway_chargeattempt (order_id, channel, provider, idempotency_key, status,"
    " provider_reference, error, failure_code, webhook_url, lease_until, created_at, updated_at)"
    " VALUES (%s, %s, %s, %s, 'sending', '', '', '', %s, now() + make_interval(secs => %s), now(), now())"
    " ON CONFLICT DO NOTHING RETURNING id"
)
# A later copy takes the lease of a claimed attempt only if nobody holds it now.
_RETAKE_SQL = (
    "UPDATE gateway_chargeattempt SET lease_until = now() + make_interval(secs => %s)"
    " WHERE idempotency_key = %s AND status = 'sending' AND (lease_until IS NULL OR lease_until < now())"
    " RETURNING id"
)


def _claim_attempt(*, order: Order, channel_code: str, provider: str) -> tuple[ChargeAttempt | None, bool]:
    """The attempt for this order and channel, inserted if new, and whether this copy may send it.

    The key and the request's facts are stored before any call. A copy may send only while it
    holds the attempt's lease, so two copies never send at once. None: the order already has a
    live attempt on another channel, and must not be charged again.
    """
    key = _idempotency_key(order.pk, channel_code)
    webhook_url = _webhook_url(provider)
    with connection.cursor() as cursor:
        prepared.execute(
            cursor, _CLAIM_SQL, [order.pk, channel_code, provider, key, webhook_url, _lease_seconds()]
        )
        row = cursor.fetchone()
        if row is not None:
            attempt = ChargeAttempt(
                pk=row[0],
                order_id=order.pk,
                channel=channel_code,
                provider=provider,
                idempotency_key=key,
                webhook_url=webhook_url,
            )
            return attempt, True
        cursor.execute(_RETAKE_SQL, [_lease_seconds(), key])
        leased = cursor.fetchone() is not None
    return ChargeAttempt.objects.filter(idempotency_key=key).first(), leased


_CHARGE_FIELDS = (
    "id",
    "status",
    "amount",
    "currency",
    "channel",
    "created_at",
    "reserved_on",
    "payment_method",
)


def order_charge(*, order_id) -> TransitionResult | None:
    """Send the charge for an assigned order and record what the provider said.

    No lock is held across the HTTP call: the attempt row (and its key) is committed first,
    so a crash anywhere leads to the same request being sent again under the same key.
    """
    order = order_fields(order_id=order_id, fields=_CHARGE_FIELDS)
    if order is None:
        logger.warning("charge.order_missing", extra={"order_id": str(order_id)})
        return None
    if order.status != OrderStatus.ASSIGNED:
        return TransitionResult(False, order.status, order.channel)
    channel = channel_by_code(order.channel)
    adapter = get_adapter(channel.provider) if channel else None
    if channel is None or adapter is None:
        logger.error("charge.no_adapter", extra={"order_id": str(order.pk), "channel": order.channel})
        return None
    attempt, leased = _claim_attempt(order=order, channel_code=channel.code, provider=channel.provider)
    if attempt is None:
        logger.error(
            "charge.other_attempt_live",
            extra={"order_id": str(order.pk), "channel": channel.code},
        )
        return None
    if attempt.status == A.REJECTED:
        result = ChargeResult(ChargeOutcome.REJECTED, error=attempt.error)
    elif attempt.status != A.SENDING:
        # Already answered (a crash came between recording and moving the order): move it now.
        result = ChargeResult(ChargeOutcome.ACCEPTED, provider_reference=attempt.provider_reference)
    elif not leased:
        # Another copy is sending this very request now; its answer moves the order (and if it
        # dies, the lease runs out and the sweep's next announcement sends it again).
        logger.info("charge.in_flight_elsewhere", extra={"order_id": str(order.pk), "channel": channel.code})
        return TransitionResult(False, order.status, order.channel)
    else:
        request = ChargeRequest(
            order_id=str(order.pk),
            amount=order.amount,
            currency=order.currency,
            idempotency_key=attempt.idempotency_key,
            webhook_url=attempt.webhook_url,
            payment_method=order.payment_method or "",
        )
        fault_point("charge.before_provider")
        started = time.monotonic()
        result = adapter.charge(channel=channel, request=request)
        fault_point("charge.after_provider")
        logger.info(
            "charge.sent",
            extra={
                "order_id": str(order.pk),
                "channel": channel.code,
                "outcome": result.outcome.value,
                "http_status": result.http_status,
                "duration_ms": _ms_since(started),
            },
        )
    return _charge_record(order=order, channel=channel, attempt=attempt, result=result)


def _charge_answer_late(*, order: Order, attempt: ChargeAttempt, result: ChargeResult) -> None:
    """The charge's answer came back to an attempt that no longer waits for it.

    Settled (paid or failed): the provider's webhook or a poll told us first, as when the request
    timed out after the charge was made (SPEC 5, row 62) - expected, and the attempt keeps that
    word. Shown loudly when the answer, which is the provider's word on our own request, disagrees
    with what settled it: another charge reference (the webhook was about a charge that is not
    ours), or "failed" where the attempt was settled paid ("paid" where it was settled failed is
    the confirm's to tell, as for any source). Refused: another copy recorded a refusal of this
    very attempt while the provider accepted it here - never expected (the lease keeps copies
    apart), so shown loudly too.
    """
    status, reference = ChargeAttempt.objects.filter(pk=attempt.pk).values_list(
        "status", "provider_reference"
    ).first() or (None, "")
    extra = {
        "order_id": str(order.pk),
        "channel": attempt.channel,
        "attempt_status": status,
        "outcome": result.outcome.value,
    }
    if status == A.REJECTED:
        logger.error("charge.answer_conflict", extra=extra)
    elif result.provider_reference and reference and result.provider_reference != reference:
        extra.update(provider_reference=result.provider_reference, attempt_reference=reference)
        logger.error("charge.answer_names_another_charge", extra=extra)
    elif result.status == "failed" and status == A.PAID:
        logger.error("charge.answer_failed_after_paid", extra=extra)
    else:
        logger.info("charge.answer_after_settlement", extra=extra)


def _charge_record(
    *, order: Order, channel: PaymentChannel, attempt: ChargeAttempt, result: ChargeResult
) -> TransitionResult:
    metrics.charge_answered(attempt=attempt, result=result)
    if result.outcome == ChargeOutcome.REJECTED:
        refused_here = False
        if attempt.status == A.SENDING:
            with transaction.atomic():
                # Only the copy that records the refusal gives the reservation back: exactly once.
                refused_here = bool(
                    ChargeAttempt.objects.filter(pk=attempt.pk, status=A.SENDING).update(
                        status=A.REJECTED, http_status=result.http_status, error=result.error[:500]
                    )
                )
                if refused_here:
                    channel_release(channel_code=attempt.channel, amount=order.amount, day=order.reserved_on)
                    # A word the provider gave about the request it now refuses contradicts it.
                    held_words, _ = _held_words(
                        order_id=order.pk, attempt=attempt, reference="", refused=True
                    )
        if refused_here and not result.request_refused:
            channel_record_failure(channel_code=attempt.channel)
        refused_by = tuple(
            ChargeAttempt.objects.filter(order_id=order.pk, status=A.REJECTED).values_list(
                "channel", flat=True
            )
        )
        # Decided for the order as read before the call (assigned to this channel): if a racing
        # copy has moved it on, the failover and any failure decided here change nothing.
        moved = order_reallocate(
            order=order,
            failed_channel=attempt.channel,
            refused_by=refused_by,
            refusal=result.error or "refused",
        )
        if refused_here:
            _hand_on(held_words, order_id=order.pk, attempt=attempt)
        return moved
    unknown = result.outcome == ChargeOutcome.UNKNOWN
    held_words: list[tuple] = []
    poll_now = False
    with transaction.atomic():
        if attempt.status == A.SENDING:
            with connection.cursor() as cursor:
                prepared.execute(cursor, _ANSWERED_SQL,
                    [
                        A.UNKNOWN if unknown else A.ACCEPTED,
                        result.provider_reference,
                        result.http_status,
                        result.error[:500],
                        attempt.pk,
                        A.SENDING,
                    ],
                )  # fmt: skip
                if cursor.rowcount == 0:
                    _charge_answer_late(order=order, attempt=attempt, result=result)
                else:  # webhooks stored while the request was in flight
                    held_words, poll_now = _held_words(
                        order_id=order.pk, attempt=attempt, reference=result.provider_reference
                    )
        reason = (
            f"outcome unknown at {attempt.channel} ({result.error}); waiting for webhook or poll"
            if unknown
            else f"charge accepted by {attempt.channel}"
        )
        transition = order_transition(
            order_id=order.pk,
            to=OrderStatus.PROCESSING,
            seen_status=OrderStatus.ASSIGNED,
            seen_channel=attempt.channel,
            reason=reason,
            provider_reference=result.provider_reference,
        )
        if not transition.applied:
            # A webhook or another copy moved the order first: the reference is still a fact.
            order_provider_reference_set(order_id=order.pk, reference=result.provider_reference)
        if poll_now:
            order_poll_due_now(order_id=order.pk)
    if unknown:
        channel_record_failure(channel_code=attempt.channel)
    else:
        channel_record_success(channel=channel)
    fault_point("charge.after_commit")
    if result.outcome == ChargeOutcome.ACCEPTED and result.status in ("paid", "failed"):
        # The provider settled the charge in the same call (Stripe confirms at once): apply its
        # word now rather than wait for the webhook, which then finds the order settled.
        transition = (
            order_confirm(
                order_id=order.pk,
                idempotency_key=attempt.idempotency_key,
                status=result.status,
                failure_code=result.failure_code,
                source="charge answer",
                provider_reference=result.provider_reference,
            )
            or transition
        )
    # Webhooks that came while the request was in flight, after our own answer's word.
    _hand_on(held_words, order_id=order.pk, attempt=attempt)
    return transition


# Our request's answer, recorded on the attempt that was waiting for it. It waits for a webhook
# being stored (its share lock); the words held meanwhile are read by the next statement.
_ANSWERED_SQL = (
    "UPDATE gateway_chargeattempt SET status = %s, provider_reference = %s, http_status = %s,"
    " error = %s, lease_until = NULL WHERE id = %s AND status = %s"
)

_ATTEMPT_SQL = (
    "SELECT a.id, a.status, a.channel, a.order_id, o.status, o.channel, o.request_id, a.provider,"
    " a.provider_reference, o.provider_reference"
    " FROM gateway_chargeattempt a JOIN orders_order o ON o.id = a.order_id"
    " WHERE a.idempotency_key = %s"
)
# The read and the settling write of a confirm in one round trip. The SELECT sees the rows as
# they were before the UPDATE (one snapshot per statement), like the separate read it replaces.
_SETTLE_SQL = (
    "WITH settled AS (UPDATE gateway_chargeattempt SET status = %s, failure_code = %s"
    # A refused attempt stays refused: the provider's later word about it is a contradiction
    # (order_confirm), never a settlement.
    " WHERE idempotency_key = %s AND order_id = %s AND status NOT IN (%s, %s, %s)"
    # A webhook settles only a charge of the channel (and provider) whose secret signed it.
    " AND (%s::text IS NULL OR (channel = %s AND provider = %s))) " + _ATTEMPT_SQL
)


def _attempt_with_order(
    idempotency_key: str,
    *,
    settle_order_id: uuid.UUID | None = None,
    status: str = "",
    failure_code: str = "",
    channel: str | None = None,
    provider: str | None = None,
) -> ChargeAttempt | None:
    """The attempt under this key, with its order's status and channel.

    With `settle_order_id`, the same statement also settles the attempt as `status` (paid or
    failed) if it belongs to that order and is not settled yet.
    """
    with connection.cursor() as cursor:
        if settle_order_id is None:
            prepared.execute(cursor, _ATTEMPT_SQL, [idempotency_key])
        else:
            settled = A.PAID if status == "paid" else A.FAILED
            prepared.execute(
                cursor,
                _SETTLE_SQL,
                [
                    settled,
                    failure_code[:64],
                    idempotency_key,
                    settle_order_id,
                    A.PAID,
                    A.FAILED,
                    A.REJECTED,
                    channel,
                    channel,
                    provider,
                    idempotency_key,
                ],
            )
        row = cursor.fetchone()
    if row is None:
        return None
    attempt = rows.instance(
        ChargeAttempt,
        ("id", "status", "channel", "order_id", "provider", "provider_reference"),
        (*row[:4], row[7], row[8]),
    )
    attempt.order = rows.instance(
        Order,
        ("id", "status", "channel", "request_id", "provider_reference"),
        (row[3], row[4], row[5], row[6], row[9]),
    )
    return attempt


def order_confirm(
    *,
    order_id,
    idempotency_key: str,
    status: str,
    failure_code: str = "",
    source: str,
    channel: str | None = None,
    provider: str | None = None,
    provider_reference: str = "",
) -> TransitionResult | None:
    """Apply a provider's final word (webhook or poll) to the order: paid or failed.

    `channel` and `provider` name who vouched for it (a webhook's verified signer): the word
    counts only for that channel's own charge. A poll asks about the attempt itself and names none.
    """
    final = status in ("paid", "failed")
    order_uuid = _as_uuid(str(order_id))
    if not final or order_uuid is None or str(order_uuid) != str(order_id):
        # Nothing to apply, or an order id that cannot be the attempt's: read, answer, leave.
        attempt = _attempt_with_order(idempotency_key)
        if attempt is None or str(attempt.order_id) != str(order_id):
            logger.warning(
                "confirm.unknown_attempt",
                extra={"order_id": str(order_id), "idempotency_key": idempotency_key},
            )
            return None
        return TransitionResult(False, attempt.order.status, attempt.order.channel)
    with transaction.atomic():
        # A webhook's word (it names its signer) yields to the first one stored; a status poll's
        # answer is the provider's word now, and counts as it is.
        first = first_word(order_id=order_uuid, idempotency_key=idempotency_key) if channel else None
        status, failure_code, source = _first_word_kept(
            first,
            ("paid", "failed"),
            status,
            failure_code,
            source,
            event="confirm.first_word_kept",
            extra={"order_id": str(order_id)},
        )
        attempt = _attempt_with_order(
            idempotency_key,
            settle_order_id=order_uuid,
            status=status,
            failure_code=failure_code,
            channel=channel,
            provider=provider if channel is not None else None,
        )
        signer = (channel, provider)
        if attempt is not None and channel is not None and (attempt.channel, attempt.provider) != signer:
            # The settling UPDATE matched nothing: it is limited to the signer's own charge.
            logger.warning(
                "confirm.channel_mismatch",
                extra={"order_id": str(order_id), "channel": channel, "attempt_channel": attempt.channel},
            )
            return None
        if attempt is None or str(attempt.order_id) != str(order_id):
            # The settling UPDATE matched nothing either: it is limited to this order's attempt.
            logger.warning(
                "confirm.unknown_attempt",
                extra={"order_id": str(order_id), "idempotency_key": idempotency_key},
            )
            return None
        order = attempt.order
        if attempt.status == A.REJECTED:
            return _word_after_refusal(
                noun="charge",
                log_prefix="confirm",
                money_word="paid",
                status=status,
                source=source,
                channel=attempt.channel,
                current=order.status,
                shown_channel=order.channel,
                record=functools.partial(order_signal_ignored, order_id=order.pk),
                extra={"order_id": str(order.pk)},
            )
        word = A.PAID if status == "paid" else A.FAILED
        if attempt.status in (A.PAID, A.FAILED) and attempt.status != word:
            # Late, and contradicting how the charge was settled: changes nothing (the transition
            # below records it as ignored), not even the references. "paid" on a charge settled
            # failed may mean money taken on an order the merchant was told failed.
            provider_reference = ""
            if word == A.PAID:
                logger.error(
                    "confirm.paid_after_failed",
                    extra={"order_id": str(order_id), "channel": attempt.channel, "source": source},
                )
        if provider_reference and not attempt.provider_reference:
            # The provider named its charge first here (a lost create answer, a declined Stripe
            # charge whose error named no PaymentIntent): record it on the attempt.
            ChargeAttempt.objects.filter(pk=attempt.pk, provider_reference="").update(
                provider_reference=provider_reference[:128]
            )
        if provider_reference and not order.provider_reference:
            order_provider_reference_set(order_id=order.pk, reference=provider_reference)
        # A provider's webhook is a request of its own: the order's lines, and the events this
        # confirm emits, keep the id of the API request that created the order.
        request_id_var.set(order.request_id or request_id_var.get())
        seen_status, seen_channel = order.status, order.channel
        if seen_channel != attempt.channel and seen_status in (OrderStatus.ASSIGNED, OrderStatus.PROCESSING):
            # The answer is about a charge on another channel than the order's current one: it
            # settles nothing here. Never expected (one live attempt per order); shown loudly.
            logger.error(
                "confirm.attempt_not_current",
                extra={"order_id": str(order.pk), "channel": attempt.channel, "order_channel": seen_channel},
            )
            return TransitionResult(False, seen_status, seen_channel)
        if seen_status == OrderStatus.ASSIGNED:
            # The provider's answer outran our own record of the charge request.
            moved = order_transition(
                order_id=order.pk,
                to=OrderStatus.PROCESSING,
                seen_status=OrderStatus.ASSIGNED,
                seen_channel=attempt.channel,
                reason=f"charge accepted by {attempt.channel} (learned from {source})",
            )
            seen_status, seen_channel = moved.status, moved.channel
            if seen_status == OrderStatus.ASSIGNED:  # failed over meanwhile: not this charge's order now
                return moved
        fault_point("confirm.before_commit")
        result = order_transition(
            order_id=order.pk,
            to=OrderStatus.PAID if status == "paid" else OrderStatus.FAILED,
            seen_status=seen_status,
            seen_channel=attempt.channel if seen_status == OrderStatus.PROCESSING else None,
            reason=f"provider says {status}"
            + (f" ({failure_code})" if failure_code else "")
            + f" via {source}",
            failure_code=failure_code or None if status == "failed" else None,
            failure_message=f"The provider declined the payment: {failure_code}."
            if status == "failed"
            else None,
        )
        if result.applied and status == "failed":
            # A declined payment moved no money: its share of the channel's daily cap is given
            # back, as a refused one's is (once: only the copy whose transition applied).
            amount, day = Order.objects.filter(pk=order.pk).values_list("amount", "reserved_on").get()
            channel_release(channel_code=attempt.channel, amount=amount, day=day)
    metrics.charge_settled(channel=attempt.channel, status=status, applied=result.applied)
    fault_point("confirm.after_commit")
    return result


def _word_after_refusal(
    *,
    noun: str,
    log_prefix: str,
    money_word: str,
    status: str,
    source: str,
    channel: str,
    current: str,
    shown_channel: str | None,
    record: Callable[..., None],
    extra: dict,
) -> TransitionResult:
    """The provider refused this charge or refund request for good (nothing was charged or
    refunded: the order failed over or failed, the refund failed and its amount became refundable
    again), and now gives a final word about it. The refusal decided and stays as it was; a
    "failed" agrees with it, but `money_word` ("paid", "succeeded") says money may have moved on a
    request we were told never happened: recorded as an ignored signal (`record`) and logged at
    ERROR, for an operator to settle with the provider."""
    extra = {**extra, "channel": channel, "status": status, "source": source}
    if status == money_word:
        record(
            current=current,
            to=money_word,
            reason=f"provider says {status} via {source} for a {noun} {channel} refused: ask the provider",
        )
        logger.error(f"{log_prefix}.{money_word}_after_refusal", extra=extra)
    else:
        logger.info(f"{log_prefix}.refused_attempt_word", extra=extra)
    return TransitionResult(False, current, shown_channel)


class WebhookChannelMismatch(Exception):
    """A verified webhook about a charge that another channel or provider made."""


# The attempt a webhook names, with what it is for: the amount and currency of the order (a
# charge) or of the refund, the status a contradicting word would be recorded against, and the
# attempt's own status. Share-locked: a charge answer's record (SENDING -> answered, in
# `_charge_record`) waits for a webhook being stored, and the other way round, so a word held
# while our request was in flight is never missed by the answer that releases it.
_WEBHOOK_ATTEMPT_SQL = {
    "charge": "SELECT a.channel, a.provider, a.provider_reference, o.amount, o.currency, o.status,"
    " a.order_id, NULL, a.status FROM gateway_chargeattempt a JOIN orders_order o ON o.id = a.order_id"
    " WHERE a.idempotency_key = %s FOR SHARE OF a",
    "refund": "SELECT a.channel, a.provider, a.provider_reference, a.amount, a.currency, r.status,"
    " a.order_id, a.refund_id, a.status FROM gateway_refundattempt a"
    " JOIN orders_refund r ON r.id = a.refund_id WHERE a.idempotency_key = %s FOR SHARE OF a",
}


class Receipt(enum.Enum):
    """What `webhook_receive` did with a verified webhook."""

    NEW = "new"  # stored: hand it to the confirm stage
    HELD = "held"  # stored while our charge request is in flight: its answer hands it on
    DUPLICATE = "duplicate"  # stored before under its id
    IGNORED = "ignored"  # about no attempt of ours, or another charge or refund: not stored


def webhook_receive(*, provider: str, event: WebhookEvent) -> Receipt:
    """Store a verified provider webhook once, and say what to do with it (`Receipt`).

    A channel's secret vouches for that channel's charges only: a webhook about another
    channel's attempt raises `WebhookChannelMismatch` and stores nothing.

    A word is about the charge or refund it names only if that attempt exists (it is stored
    before any request is sent, so a provider cannot know of a charge before it) and its amount,
    currency and provider reference are the attempt's where the event says them. Otherwise
    (another system on a Stripe account can tag its PaymentIntents with our metadata) nothing is
    stored; a word about another amount or charge is recorded as an ignored signal and logged at
    ERROR, for an operator to ask the provider. A charge's word that comes while our request is
    still in flight is stored but held (`HELD`): only the request's answer says which charge is
    ours, and its record hands the held words on once it has (`_held_words`, `_hand_on`).
    """
    with connection.cursor() as cursor:
        prepared.execute(cursor, _WEBHOOK_ATTEMPT_SQL[event.kind], [event.idempotency_key])
        row = cursor.fetchone()
        if row is None:
            logger.warning(
                "webhook.unknown_attempt",
                extra={"order_id": event.order_id, "provider": provider, "kind": event.kind},
            )
            return Receipt.IGNORED
        if (row[0], row[1]) != (event.channel, provider):
            logger.warning(
                "webhook.channel_mismatch",
                extra={
                    "order_id": event.order_id,
                    "provider": provider,
                    "channel": event.channel,
                    "attempt_channel": row[0],
                    "attempt_provider": row[1],
                },
            )
            raise WebhookChannelMismatch(event.idempotency_key)
        if mismatch := _not_this_attempt(event, *row[2:5]):
            _not_this_attempt_shown(
                kind=event.kind,
                status=event.status,
                channel=event.channel,
                webhook_id=event.webhook_id,
                mismatch=mismatch,
                current=row[5],
                order_id=row[6],
                refund_id=row[7],
            )
            return Receipt.IGNORED
        prepared.execute(
            cursor,
            "INSERT INTO gateway_providerwebhook (provider, webhook_id, order_id, event_type,"
            " idempotency_key, status, failure_code, provider_reference, payload, received_at)"
            " VALUES (%s, %s, (SELECT id FROM orders_order WHERE id = %s), %s, %s, %s, %s, %s, %s, now())"
            " ON CONFLICT (provider, webhook_id) DO NOTHING RETURNING id",
            [
                provider,
                event.webhook_id,
                _as_uuid(event.order_id),
                event.event_type,
                event.idempotency_key[:128],
                event.status[:16],
                (event.failure_code or "")[:64],
                event.provider_reference[:128],
                json.dumps(event.payload),
            ],
        )
        if cursor.fetchone() is None:
            return Receipt.DUPLICATE
    return Receipt.HELD if row[8] == A.SENDING else Receipt.NEW  # (RA.SENDING is the same word)


def _not_this_attempt(event: WebhookEvent, reference: str, amount: int, currency: str) -> str:
    """What says the event is about another charge or refund than its attempt's, or ""."""
    if event.amount is not None and event.amount != amount:
        return f"the provider's amount is {event.amount}, ours {amount}"
    if event.currency and event.currency != currency:
        return f"the provider's currency is {event.currency}, ours {currency}"
    return _another_reference(event.provider_reference, reference)


def _another_reference(theirs: str, ours: str) -> str:
    if theirs and ours and theirs != ours:
        return f"the provider names {theirs[:40]}, ours is {ours[:40]}"
    return ""


def _not_this_attempt_shown(
    *, kind: str, status: str, channel: str, webhook_id: str, mismatch: str, current: str, order_id, refund_id
) -> None:
    """A provider's word about another charge or refund than its attempt's: an ignored signal on
    the order or refund, and an ERROR line."""
    noun = "refund" if refund_id is not None else "charge"
    reason = f"provider says {status} via provider webhook, not about this {noun} ({mismatch})"
    reason += ": ask the provider"
    if refund_id is not None:
        refund_signal_ignored(refund_id=refund_id, current=current, to=status, reason=reason)
    else:
        order_signal_ignored(order_id=order_id, current=current, to=status, reason=reason)
    logger.error(
        "webhook.not_this_attempt",
        extra={
            "order_id": str(order_id),
            "kind": kind,
            "channel": channel,
            "status": status,
            "webhook_id": webhook_id,
            "reason": mismatch,
        },
    )


def word_hand_off(
    *,
    kind: str,
    order_id: str,
    idempotency_key: str,
    status: str,
    failure_code: str,
    webhook_id: str,
    channel: str,
    provider: str,
    provider_reference: str,
) -> None:
    """Send a stored provider word to its confirm stage: a refund's to the refund's, a charge's to
    the order's. Not durable (a broker down loses the message): the stored word stays, and status
    polling settles what it would have."""
    task = events.REFUND_CONFIRM if kind == "refund" else events.CONFIRM
    try:
        stage_send(
            task,
            {
                "order_id": order_id,
                "idempotency_key": idempotency_key,
                "status": status,
                "failure_code": failure_code,
                "webhook_id": webhook_id,
                # The verified channel: confirm settles only that channel's charge or refund.
                "channel": channel,
                "provider": provider,
                "provider_reference": provider_reference,
            },
        )
    except Exception as exc:  # broker down: the stored webhook stays, status polling settles it
        logger.warning("webhook.handoff_failed", extra={"order_id": order_id, "error": repr(exc)})


# The words stored for an attempt, in the order they came. Read in the transaction whose update
# moved the attempt out of `sending`, by a statement after it: the update waited for any webhook
# being stored (its share lock), and a later statement sees what that webhook committed.
_HELD_WORDS_SQL = (
    "SELECT id, webhook_id, status, failure_code, provider_reference FROM gateway_providerwebhook"
    " WHERE order_id = %s AND idempotency_key = %s AND status <> '' ORDER BY id"
)


def _held_words(
    *, order_id, attempt: ChargeAttempt | RefundAttempt, reference: str, refused: bool = False
) -> tuple[list[tuple], bool]:
    """The webhooks that came while this attempt's request was in flight (`Receipt.HELD`), and
    whether the order or refund must be polled now instead. Read in the transaction whose update
    moved the attempt out of `sending`; the share lock of `webhook_receive` keeps any other word
    from being stored meanwhile, so these are exactly the held ones.

    - The answer names our charge or refund (`reference`): a word naming another one is made no
      word and shown (ignored signal, ERROR); the rest are returned for `_hand_on`.
    - The answer names none (a timeout, a lost answer): nothing tells which of the words is about
      ours, so none counts. They are made no word, and the provider is asked about our own key now
      (a status poll), which is its word on our request.
    - `refused`: the provider refused the request for good. Its words go on as they came: a
      "paid" or "succeeded" contradicts the refusal, and the confirm stage shows it loudly.
    """
    refund_id = getattr(attempt, "refund_id", None)
    with connection.cursor() as cursor:
        cursor.execute(_HELD_WORDS_SQL, [order_id, attempt.idempotency_key])
        held = cursor.fetchall()
        if not held or refused:
            return [row[1:] for row in held], False
        foreign = [row for row in held if reference and row[4] and row[4] != reference]
        dropped = foreign if reference else held
        if dropped:
            cursor.execute(
                "UPDATE gateway_providerwebhook SET status = '' WHERE id = ANY(%s)",
                [[row[0] for row in dropped]],
            )
    if foreign:
        subject = Refund.objects.filter(pk=refund_id) if refund_id else Order.objects.filter(pk=order_id)
        current = subject.values_list("status", flat=True).get()
    for _, webhook_id, status, _, theirs in foreign:
        _not_this_attempt_shown(
            kind="refund" if refund_id else "charge",
            status=status,
            channel=attempt.channel,
            webhook_id=webhook_id,
            mismatch=_another_reference(theirs, reference),
            current=current,
            order_id=order_id,
            refund_id=refund_id,
        )
    if not reference:
        logger.info(
            "webhook.held_words_unverified",
            extra={"order_id": str(order_id), "refund_id": refund_id and str(refund_id), "words": len(held)},
        )
        return [], True
    return [row[1:] for row in held if row not in foreign], False


def _hand_on(words: list[tuple], *, order_id, attempt: ChargeAttempt | RefundAttempt) -> None:
    """Hand the held words to the confirm stage, as the web would have, once our own answer is
    recorded (the first stored word settles; the rest are late). Lost with a crash before this
    (the words stay stored), status polling settles what they would have, as for a lost hand-off."""
    kind = "refund" if getattr(attempt, "refund_id", None) else "charge"
    for webhook_id, status, failure_code, theirs in words:
        word_hand_off(
            kind=kind,
            order_id=str(order_id),
            idempotency_key=attempt.idempotency_key,
            status=status,
            failure_code=failure_code,
            webhook_id=webhook_id,
            channel=attempt.channel,
            provider=attempt.provider,
            provider_reference=theirs,
        )


_FIRST_WORD_SQL = (
    "SELECT w.status, w.failure_code FROM gateway_providerwebhook w"
    " WHERE w.order_id = %s AND w.idempotency_key = %s AND w.status <> ''"
    # A charge already settled has had its word: what comes after is late, recorded as it came.
    " AND NOT EXISTS (SELECT 1 FROM gateway_chargeattempt a"
    "  WHERE a.idempotency_key = w.idempotency_key AND a.status IN ('paid', 'failed'))"
    " ORDER BY w.id LIMIT 1"
)


def first_word(*, order_id, idempotency_key: str) -> tuple[str, str] | None:
    """(status, failure_code) of the first webhook stored for this charge or refund, or None.

    Webhooks are stored in the order they arrive and handed to the confirm stage after; the
    hand-offs can reach it in another order (a broker failing over held three `paid` words of a
    row-81 order for 9 s while the late `failed` one went straight through, and the order was
    failed with the money taken). The first word stored is the provider's word: a later,
    contradicting one is late whichever reaches the confirm stage first (SPEC 1). Only webhook
    words defer to it; a status poll's answer is the provider's word now. None once the charge is
    settled (the caller checks a refund's attempt itself): a word after that is late, and is
    recorded as ignored with what it said.
    """
    with connection.cursor() as cursor:
        prepared.execute(cursor, _FIRST_WORD_SQL, [order_id, idempotency_key])
        row = cursor.fetchone()
    return None if row is None else (row[0], row[1])


def _first_word_kept(
    first: tuple[str, str] | None,
    finals: tuple[str, str],
    status: str,
    failure_code: str,
    source: str,
    *,
    event: str,
    extra: dict,
) -> tuple[str, str, str]:
    """(status, failure_code, source) to settle with: the first stored word when it is final and
    says otherwise (logged as `event`, and named in the transition's reason), else the word as it
    came."""
    if first is None or first[0] not in finals or first[0] == status:
        return status, failure_code, source
    logger.warning(event, extra={**extra, "status": status, "first": first[0], "source": source})
    return first[0], first[1], f"{source}: its first word, a later one said {status}"


def _as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class Polled:
    """What a status poll did, in an operator's words (the console's re-query shows it), and
    whether the provider answered at all."""

    said: str
    transition: TransitionResult | None = None
    answered: bool = True


def order_poll(*, order_id) -> Polled:
    """Ask the provider about a processing order's charge (PSync); resend it if it never arrived."""
    order = order_fields(order_id=order_id, fields=_CHARGE_FIELDS)
    if order is None or order.status != OrderStatus.PROCESSING:
        return Polled("not processing: nothing to ask")
    attempt = (
        ChargeAttempt.objects.filter(order_id=order.pk)
        .exclude(status=A.REJECTED)
        .order_by("-created_at")
        .first()
    )
    if attempt is None:
        logger.error("poll.no_attempt", extra={"order_id": str(order.pk)})
        return Polled("no charge attempt to ask about")
    channel = channel_by_code(attempt.channel)
    adapter = get_adapter(attempt.provider)
    try:
        status = adapter.fetch_status(
            channel=channel,
            idempotency_key=attempt.idempotency_key,
            provider_reference=attempt.provider_reference,
        )
    except Exception as exc:  # provider unreachable: the sweep asks again later
        logger.warning("poll.failed", extra={"order_id": str(order.pk), "error": repr(exc)})
        return Polled(_unanswered(exc), answered=False)
    fault_point("poll.after_provider")
    logger.info(
        "poll.answered", extra={"order_id": str(order.pk), "status": status.status, "asked": status.looked}
    )
    if status.status in ("paid", "failed"):
        transition = order_confirm(
            order_id=order.pk,
            idempotency_key=attempt.idempotency_key,
            status=status.status,
            failure_code=status.failure_code,
            source="status poll",
            provider_reference=status.provider_reference,
        )
        return Polled(f"the provider says {status.status}", transition)
    if status.status == "not_found":
        # The request never reached the provider. Sending it again under the same key is safe:
        # if it did arrive meanwhile, the provider answers with the existing charge.
        if _past_key_window(adapter, status, attempt):
            return Polled(_past_key_window_said(adapter, attempt), answered=False)
        request = ChargeRequest(
            order_id=str(order.pk),
            amount=order.amount,
            currency=order.currency,
            idempotency_key=attempt.idempotency_key,
            webhook_url=attempt.webhook_url or _webhook_url(attempt.provider),
            payment_method=order.payment_method or "",
        )
        result = adapter.charge(channel=channel, request=request)
        logger.info("poll.resent", extra={"order_id": str(order.pk), "outcome": result.outcome.value})
        resent = f"the provider had no charge under our key: sent again, {result.outcome.value}"
        if result.outcome == ChargeOutcome.REJECTED:
            if not status.looked and not (result.http_status and result.request_refused):
                # The provider was never asked about the first request (no id to ask it by), and
                # it did not answer this one for our key (not reached, or our credentials refused):
                # nothing says the first did not charge. Still processing; the sweep sends it again.
                logger.warning(
                    "poll.resend_unanswered",
                    extra={"order_id": str(order.pk), "channel": attempt.channel, "error": result.error},
                )
                return Polled(
                    "the provider was not asked about the first request, and did not answer it sent"
                    f" again ({result.error}); the sweep sends it again",
                    answered=False,
                )
            return Polled(resent, _resend_refused(order=order, attempt=attempt, result=result))
        if result.outcome == ChargeOutcome.ACCEPTED and result.status in ("paid", "failed"):
            # Stripe answers the resent create with the first request's result (or the new one's).
            transition = order_confirm(
                order_id=order.pk,
                idempotency_key=attempt.idempotency_key,
                status=result.status,
                failure_code=result.failure_code,
                source="resent charge answer",
                provider_reference=result.provider_reference,
            )
            return Polled(resent, transition)
        if result.provider_reference:
            with transaction.atomic():
                ChargeAttempt.objects.filter(pk=attempt.pk, provider_reference="").update(
                    provider_reference=result.provider_reference[:128]
                )
                order_provider_reference_set(order_id=order.pk, reference=result.provider_reference)
        return Polled(resent)
    return Polled(f"the provider says {status.status or 'nothing final'}: no final answer yet")


def _unanswered(exc: Exception) -> str:
    return f"the provider did not answer ({type(exc).__name__}); the sweep asks again"


def _past_key_window_said(adapter, attempt: ChargeAttempt | RefundAttempt) -> str:
    hours = adapter.key_window.total_seconds() / 3600
    return (
        f"not asked: no provider id was stored, and a resend {hours:g} h after the first could be"
        f" a second one; find it at the provider by metadata attempt = {attempt.idempotency_key}"
    )


def _past_key_window(adapter, status: StatusResult, attempt: ChargeAttempt | RefundAttempt) -> bool:
    """Would sending the create again be a new request? When the provider was not asked (it had
    no id to be asked by) and its key window is over since the first send, the provider may no
    longer answer our key with the first request's result: a resend could charge or refund a
    second time. Nothing is sent; the order or refund stays processing, for a person (ERROR)."""
    window = adapter.key_window
    if status.looked or window is None or attempt.created_at > timezone.now() - window:
        return False
    subject = {"refund_id": str(attempt.refund_id)} if isinstance(attempt, RefundAttempt) else {}
    logger.error(
        "poll.resend_past_key_window",
        extra={
            "order_id": str(attempt.order_id),
            **subject,
            "channel": attempt.channel,
            "first_sent": attempt.created_at.isoformat(),
            "key_window_hours": window.total_seconds() / 3600,
        },
    )
    return True


def _resend_refused(*, order: Order, attempt: ChargeAttempt, result: ChargeResult) -> TransitionResult | None:
    """The provider had no charge under the key and refused it when resent: nothing was charged.
    (Known only when it was asked about the key, or answered the resend for it: `order_poll`.)

    A processing order cannot fail over (SPEC 1), so it fails with channel_unavailable; the
    reservation goes back once, by the copy that records the refusal.
    """
    with transaction.atomic():
        refused = ChargeAttempt.objects.filter(pk=attempt.pk, status__in=[A.UNKNOWN, A.ACCEPTED]).update(
            status=A.REJECTED, http_status=result.http_status, error=result.error[:500]
        )
        if not refused:
            return None
        channel_release(channel_code=attempt.channel, amount=order.amount, day=order.reserved_on)
        return order_transition(
            order_id=order.pk,
            to=OrderStatus.FAILED,
            seen_status=OrderStatus.PROCESSING,
            seen_channel=attempt.channel,
            reason=f"{attempt.channel} had no charge and refused it when resent ({result.error})",
            failure_code="channel_unavailable",
            failure_message="The channel refused the charge; nothing was charged.",
        )


# --- refunds (SPEC 10) ---------------------------------------------------------------------------------

RA = RefundAttempt.Status
RS = RefundStatus


def _refund_key(refund_id) -> str:
    # The refund's own key: never the charge's, and the same for every copy of the task.
    return f"refund:{refund_id}"


_REFUND_CLAIM_SQL = (
    "INSERT INTO gateway_refundattempt (refund_id, order_id, channel, provider, idempotency_key,"
    " charge_idempotency_key, webhook_url, amount, currency, status, sends, provider_reference, error,"
    " failure_code, lease_until, created_at, updated_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'sending', 0, '', '', '',"
    " now() + make_interval(secs => %s), now(), now())"
    " ON CONFLICT DO NOTHING RETURNING id"
)
_REFUND_RETAKE_SQL = (
    "UPDATE gateway_refundattempt SET lease_until = now() + make_interval(secs => %s)"
    " WHERE refund_id = %s AND status = 'sending' AND (lease_until IS NULL OR lease_until < now())"
    " RETURNING id"
)


def _claim_refund_attempt(*, refund: Refund, charge: ChargeAttempt) -> tuple[RefundAttempt, bool]:
    """The refund's attempt, inserted with its key and request facts if new, and whether this copy
    holds the sending lease (only one copy sends at a time)."""
    with connection.cursor() as cursor:
        cursor.execute(
            _REFUND_CLAIM_SQL,
            [
                refund.pk,
                refund.order_id,
                charge.channel,
                charge.provider,
                _refund_key(refund.pk),
                charge.idempotency_key,
                _webhook_url(charge.provider),
                refund.amount,
                refund.currency,
                _lease_seconds(),
            ],
        )
        leased = cursor.fetchone() is not None
        if not leased:
            cursor.execute(_REFUND_RETAKE_SQL, [_lease_seconds(), refund.pk])
            leased = cursor.fetchone() is not None
    return RefundAttempt.objects.get(refund_id=refund.pk), leased


def _release_refund_lease(attempt: RefundAttempt) -> None:
    RefundAttempt.objects.filter(pk=attempt.pk, status=RA.SENDING).update(lease_until=None)


def _refund_request(attempt: RefundAttempt) -> RefundRequest:
    return RefundRequest(
        refund_id=str(attempt.refund_id),
        order_id=str(attempt.order_id),
        amount=attempt.amount,
        currency=attempt.currency,
        idempotency_key=attempt.idempotency_key,
        charge_idempotency_key=attempt.charge_idempotency_key,
        webhook_url=attempt.webhook_url,
    )


def refund_send(*, refund_id) -> TransitionResult | None:
    """Send a pending refund to the channel that charged its order, and record the answer.

    As for charges: the attempt (its key and every fact of the request) is committed before the
    call, no lock is held across it, and the answer is recorded in a second transaction.
    """
    refund = refund_fields(refund_id=refund_id, fields=("id", "order_id", "status", "amount", "currency"))
    if refund is None:
        logger.warning("refund.missing", extra={"refund_id": str(refund_id)})
        return None
    if refund.status != RS.PENDING:
        return TransitionResult(False, refund.status)
    log = {"order_id": str(refund.order_id), "refund_id": str(refund.pk)}
    charge = (
        ChargeAttempt.objects.filter(order_id=refund.order_id, status=A.PAID).order_by("-created_at").first()
        or ChargeAttempt.objects.filter(order_id=refund.order_id).exclude(status=A.REJECTED).first()
    )
    if charge is None:
        logger.error("refund.no_charge", extra=log)
        return None
    attempt, leased = _claim_refund_attempt(refund=refund, charge=charge)
    if attempt.status in (RA.ACCEPTED, RA.UNKNOWN, RA.SUCCEEDED, RA.FAILED):
        # Answered before a crash kept the refund from moving on: move it now.
        return _refund_processing(attempt, f"refund accepted by {attempt.channel} (recorded earlier)")
    if attempt.status == RA.REJECTED:
        return _refund_refused(attempt, attempt.error)
    if not leased:
        logger.info("refund.in_flight_elsewhere", extra=log)
        return TransitionResult(False, refund.status)
    if attempt.retry_after and attempt.retry_after > timezone.now():
        # The provider asked us to wait (503): a duplicate delivery does not cut the backoff short;
        # the sweep sends it again when the refund is due.
        _release_refund_lease(attempt)
        logger.info("refund.backing_off", extra=log)
        return TransitionResult(False, refund.status)
    channel = channel_by_code(attempt.channel)
    adapter = get_adapter(attempt.provider)
    if channel is None or adapter is None:
        logger.error("refund.no_adapter", extra={**log, "channel": attempt.channel})
        return None
    fault_point("refund.before_provider")
    started = time.monotonic()
    result = adapter.refund(channel=channel, request=_refund_request(attempt))
    fault_point("refund.after_provider")
    logger.info(
        "refund.sent",
        extra={
            **log,
            "channel": attempt.channel,
            "outcome": result.outcome.value,
            "http_status": result.http_status,
            "duration_ms": _ms_since(started),
        },
    )
    outcome = _refund_record(attempt=attempt, result=result)
    fault_point("refund.after_commit")
    return outcome


def _refund_record(*, attempt: RefundAttempt, result: RefundResult) -> TransitionResult | None:
    recorded, held_words = _refund_answer_record(attempt=attempt, result=result)
    # Webhooks that came while the request was in flight (held), after our own answer.
    _hand_on(held_words, order_id=attempt.order_id, attempt=attempt)
    return recorded


def _refund_answer_record(
    *, attempt: RefundAttempt, result: RefundResult
) -> tuple[TransitionResult | None, list[tuple]]:
    """Record the refund request's answer: what it moved, and the words held while the request
    was in flight when the attempt left `sending` here (`_held_words`)."""
    with transaction.atomic():
        if result.outcome == ChargeOutcome.REJECTED and result.retry:
            sends = attempt.sends + 1
            if sends < settings.REFUND_MAX_SENDS:
                # Nothing refunded and the provider asks again later: the same request, the same
                # channel, after a backoff stored on the refund (never a failover).
                delay = min(
                    settings.REFUND_RETRY_SECONDS * 2 ** (sends - 1), settings.REFUND_RETRY_MAX_SECONDS
                )
                delay *= random.uniform(1.0, 1.2)
                RefundAttempt.objects.filter(pk=attempt.pk, status=RA.SENDING).update(
                    sends=sends,
                    lease_until=None,
                    retry_after=timezone.now() + timedelta(seconds=delay),
                    http_status=result.http_status,
                    error=result.error[:500],
                )
                refund_retry_later(refund_id=attempt.refund_id, seconds=delay)
                logger.info(
                    "refund.retry_later",
                    extra={
                        "refund_id": str(attempt.refund_id),
                        "sends": sends,
                        "retry_in_s": round(delay, 2),
                    },
                )
                return None, []
        if result.outcome == ChargeOutcome.REJECTED:
            refused_here = RefundAttempt.objects.filter(pk=attempt.pk, status=RA.SENDING).update(
                status=RA.REJECTED,
                sends=attempt.sends + 1,
                lease_until=None,
                http_status=result.http_status,
                error=result.error[:500],
            )
            held = []
            if refused_here:
                held, _ = _held_words(order_id=attempt.order_id, attempt=attempt, reference="", refused=True)
            return _refund_refused(attempt, result.error), held
        unknown = result.outcome == ChargeOutcome.UNKNOWN
        # The send is recorded even when the provider's webhook outran this answer and already
        # settled the attempt: only the status is left as the webhook wrote it.
        answer = {"provider_reference": result.provider_reference} if result.provider_reference else {}
        sent = {
            "sends": F("sends") + 1,
            "lease_until": None,
            "retry_after": None,  # taken: an earlier "try again later" is over
            "http_status": result.http_status,
            "error": result.error[:500],
            **answer,
        }
        answered_here = RefundAttempt.objects.filter(pk=attempt.pk, status=RA.SENDING).update(
            status=RA.UNKNOWN if unknown else RA.ACCEPTED, **sent
        )
        held, poll_now = [], False
        if answered_here:
            held, poll_now = _held_words(
                order_id=attempt.order_id, attempt=attempt, reference=result.provider_reference
            )
        else:
            RefundAttempt.objects.filter(pk=attempt.pk).update(**sent)
        reason = (
            f"outcome unknown at {attempt.channel} ({result.error}); waiting for webhook or poll"
            if unknown
            else f"refund accepted by {attempt.channel}"
        )
        processing = _refund_processing(attempt, reason)
        if poll_now:
            refund_poll_due_now(refund_id=attempt.refund_id)
    return _refund_settled_by_answer(attempt, result) or processing, held


def _refund_settled_by_answer(attempt: RefundAttempt, result: RefundResult) -> TransitionResult | None:
    """An answer that already says how the refund ended (Stripe's) settles it now, through the same
    compare-and-set as a webhook or poll: whichever comes later is a duplicate that changes nothing."""
    if result.outcome != ChargeOutcome.ACCEPTED or result.status not in (RS.SUCCEEDED, RS.FAILED):
        return None
    return refund_confirm(
        idempotency_key=attempt.idempotency_key,
        status=result.status,
        failure_code=result.failure_code,
        source="refund answer",
    )


def _refund_processing(attempt: RefundAttempt, reason: str) -> TransitionResult:
    return refund_transition(
        refund_id=attempt.refund_id, to=RS.PROCESSING, seen_status=RS.PENDING, reason=reason
    )


def _refund_refused(attempt: RefundAttempt, error: str) -> TransitionResult:
    if error.startswith("not sent"):
        # The provider was never reached (after every send allowed): it refused nothing.
        code, message = "channel_unavailable", f"The refund could not be sent to the provider ({error})."
        reason = f"{attempt.channel} could not be reached ({error}); nothing was refunded"
    else:
        code = "channel_unavailable" if error == "channel_unavailable" else "refund_refused"
        message = f"The provider refused the refund: {error}."
        reason = f"{attempt.channel} refused the refund ({error}); nothing was refunded"
    return refund_transition(
        refund_id=attempt.refund_id,
        to=RS.FAILED,
        seen_status=RS.PENDING,
        reason=reason,
        failure_code=code,
        failure_message=message,
    )


def refund_confirm(
    *,
    idempotency_key: str,
    status: str,
    failure_code: str = "",
    source: str,
    channel: str | None = None,
    provider: str | None = None,
    order_id: str | None = None,
) -> TransitionResult | None:
    """Apply a provider's final word on a refund (webhook or poll): succeeded or failed.

    A webhook counts only for the refund of the channel whose secret signed it, and of the order
    it names; a duplicate or late word finds the refund settled and changes nothing (recorded as
    ignored).
    """
    if status not in (RS.SUCCEEDED, RS.FAILED):
        return None
    with transaction.atomic():
        attempt = RefundAttempt.objects.select_for_update().filter(idempotency_key=idempotency_key).first()
        if attempt is None or (order_id is not None and _as_uuid(order_id) != attempt.order_id):
            # No such refund, or the word names another order than the refund's: it settles nothing.
            logger.warning(
                "refund_confirm.unknown_attempt",
                extra={"idempotency_key": idempotency_key, "order_id": order_id},
            )
            return None
        if channel is not None and (attempt.channel, attempt.provider) != (channel, provider):
            logger.warning(
                "refund_confirm.channel_mismatch",
                extra={
                    "refund_id": str(attempt.refund_id),
                    "channel": channel,
                    "attempt_channel": attempt.channel,
                },
            )
            return None
        # (after the signer check: only the channel that refused may contradict its refusal)
        if attempt.status == RA.REJECTED:
            return _word_after_refusal(
                noun="refund",
                log_prefix="refund_confirm",
                money_word=RS.SUCCEEDED,
                status=status,
                source=source,
                channel=attempt.channel,
                current=refund_fields(refund_id=attempt.refund_id, fields=("id", "status")).status,
                shown_channel=attempt.channel,
                record=functools.partial(refund_signal_ignored, refund_id=attempt.refund_id),
                extra={"refund_id": str(attempt.refund_id)},
            )
        settled = attempt.status in (RA.SUCCEEDED, RA.FAILED)
        if attempt.status == RA.FAILED and status == RS.SUCCEEDED:
            # Late and contradicting: changes nothing (recorded as ignored below), but the failed
            # refund's amount became refundable again, so money may be refunded twice.
            logger.error(
                "refund_confirm.succeeded_after_failed",
                extra={"refund_id": str(attempt.refund_id), "channel": attempt.channel, "source": source},
            )
        first = (
            first_word(order_id=attempt.order_id, idempotency_key=idempotency_key)
            if channel and not settled
            else None
        )
        status, failure_code, source = _first_word_kept(
            first,
            (RS.SUCCEEDED, RS.FAILED),
            status,
            failure_code,
            source,
            event="refund_confirm.first_word_kept",
            extra={"refund_id": str(attempt.refund_id)},
        )
        RefundAttempt.objects.filter(pk=attempt.pk).exclude(status__in=(RA.SUCCEEDED, RA.FAILED)).update(
            status=status, failure_code=failure_code[:64], lease_until=None
        )
        seen = refund_fields(refund_id=attempt.refund_id, fields=("id", "status")).status
        if seen == RS.PENDING:
            # The provider's answer outran our own record of the refund request.
            seen = _refund_processing(
                attempt, f"refund accepted by {attempt.channel} (learned from {source})"
            ).status
        fault_point("refund_confirm.before_commit")
        return refund_transition(
            refund_id=attempt.refund_id,
            to=status,
            seen_status=seen,
            reason=f"provider says {status}"
            + (f" ({failure_code})" if failure_code else "")
            + f" via {source}",
            failure_code=(failure_code or "refund_failed") if status == RS.FAILED else None,
            failure_message=f"The provider declined the refund: {failure_code or 'no reason given'}."
            if status == RS.FAILED
            else None,
        )


def refund_poll(*, refund_id) -> Polled:
    """Ask the provider about a processing refund; resend it under its key if it never arrived."""
    attempt = RefundAttempt.objects.filter(refund_id=refund_id).first()
    refund = refund_fields(refund_id=refund_id, fields=("id", "status"))
    if attempt is None or refund is None or refund.status != RS.PROCESSING:
        return Polled("not processing: nothing to ask")
    channel = channel_by_code(attempt.channel)
    adapter = get_adapter(attempt.provider)
    log = {"order_id": str(attempt.order_id), "refund_id": str(refund_id)}
    try:
        status = adapter.fetch_refund_status(channel=channel, idempotency_key=attempt.idempotency_key)
    except Exception as exc:  # provider unreachable or unreadable: the sweep asks again later
        logger.warning("refund_poll.failed", extra={**log, "error": repr(exc)})
        return Polled(_unanswered(exc), answered=False)
    logger.info("refund_poll.answered", extra={**log, "status": status.status, "asked": status.looked})
    if status.provider_reference:
        # The provider's id for the refund, from its answer: the console finds the refund by it.
        RefundAttempt.objects.filter(pk=attempt.pk, provider_reference="").update(
            provider_reference=status.provider_reference[:128]
        )
    if status.status in (RS.SUCCEEDED, RS.FAILED):
        transition = refund_confirm(
            idempotency_key=attempt.idempotency_key,
            status=status.status,
            failure_code=status.failure_code,
            source="status poll",
        )
        return Polled(f"the provider says {status.status}", transition)
    if status.status == "not_found":
        # The request never reached the provider: the same request under the same key is safe.
        if _past_key_window(adapter, status, attempt):
            return Polled(_past_key_window_said(adapter, attempt), answered=False)
        result = adapter.refund(channel=channel, request=_refund_request(attempt))
        logger.info("refund_poll.resent", extra={**log, "outcome": result.outcome.value})
        if result.provider_reference and result.outcome == ChargeOutcome.ACCEPTED:
            RefundAttempt.objects.filter(pk=attempt.pk, provider_reference="").update(
                provider_reference=result.provider_reference
            )
        resent = f"the provider had no refund under our key: sent again, {result.outcome.value}"
        settled = _refund_settled_by_answer(attempt, result)
        if settled is not None:
            return Polled(resent, settled)
        if result.outcome == ChargeOutcome.REJECTED and not result.retry:
            with transaction.atomic():
                refused = RefundAttempt.objects.filter(
                    pk=attempt.pk, status__in=(RA.UNKNOWN, RA.ACCEPTED)
                ).update(status=RA.REJECTED, http_status=result.http_status, error=result.error[:500])
                if refused:
                    failed = refund_transition(
                        refund_id=refund_id,
                        to=RS.FAILED,
                        seen_status=RS.PROCESSING,
                        reason=f"{attempt.channel} had no refund and refused it when resent ({result.error})",
                        failure_code="refund_refused",
                        failure_message=f"The provider refused the refund: {result.error}.",
                    )
                    return Polled(resent, failed)
        return Polled(resent)
    return Polled(f"the provider says {status.status or 'nothing final'}: no final answer yet")


# --- Retention (SPEC 12): provider webhooks are history once their confirm ran. Charge attempts
# stay: they are the record of what the provider was asked to take.
_PRUNE_WEBHOOKS_SQL = """
DELETE FROM gateway_providerwebhook WHERE id = ANY(ARRAY(
    SELECT id FROM gateway_providerwebhook WHERE received_at < %(before)s
    ORDER BY received_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED))
"""


def webhooks_prune(*, before: datetime, batch: int, max_batches: int) -> dict[str, int]:
    """Delete provider webhooks received before `before`, in batches through
    providerwebhook_received. A provider replaying one older than that is verified and
    confirmed again, which changes nothing: a settled order ignores it."""
    return {
        "provider_webhooks": delete_in_batches(
            _PRUNE_WEBHOOKS_SQL, before=before, batch=batch, max_batches=max_batches
        )
    }
