"""Adapter for Stripe (SPEC 11): PaymentIntents through the official library, its webhooks verified.

The charge is a PaymentIntent created and confirmed in one call, under the charge attempt's own
idempotency key, so Stripe answers a retried request with the first one's result. How Stripe's
answers map onto our three outcomes (SPEC 5, 9), the same care as the sandbox's:

- a PaymentIntent back: accepted, and since it was confirmed in the call, usually settled too
  (`succeeded` -> paid; `requires_payment_method` after a failed attempt -> failed);
- `CardError` (402): the card was declined, a definitive answer -> accepted and failed with
  Stripe's decline code; nothing was charged, and another channel would be declined alike;
- nothing sent (connection refused, connect timeout), or refused before processing with no
  PaymentIntent made (401 authentication, 403 permission, 400/404 invalid request): rejected,
  as the sandbox treats its own "not processed" answers; Stripe saves no idempotent result for
  these, so nothing exists under the key;
- everything else may hide a charge: a read timeout or a reset after sending, 409 (the same key
  in flight), an idempotency error (the key used with other parameters), 429, any 5xx, an
  answer that cannot be read -> unknown, settled by the webhook or a status poll, never failover.
"""

import hashlib
import hmac
import http.client
import json
import logging
import threading
import time
from datetime import timedelta
from typing import Any

import requests
import stripe
import urllib3
from cryptography.fernet import InvalidToken
from django.conf import settings

from allocation.models import PaymentChannel
from allocation.selectors import channels_of_provider
from core import crypto
from core.http_deadline import deadline, watched
from gateway.providers.base import (
    ChargeOutcome,
    ChargeRequest,
    ChargeResult,
    IgnoredWebhook,
    InvalidWebhook,
    MalformedWebhook,
    ProviderAdapter,
    ProviderError,
    RefundRequest,
    RefundResult,
    StatusResult,
    WebhookEvent,
    money_named,
    register,
)
from gateway.providers.sandbox import (
    _finite,
    _never_sent,
    _no_constant,
    _payload_storable,
    _token,
    declared_length,
    exchange_seconds,
)
from gateway.selectors import (
    channel_of_refund,
    provider_reference_of_charge,
    provider_reference_of_refund,
    refund_lookup_facts,
)

logger = logging.getLogger(__name__)

# Stripe's answers to our calls are a few KiB; a peer that sends more (or drips it) is cut off.
MAX_ANSWER_BYTES = 256 * 1024
_CHUNK_BYTES = 16 * 1024
# Stripe's own tolerance for webhook timestamps, and SPEC 5's 5 minutes.
WEBHOOK_TOLERANCE_SECONDS = 300
# Stripe's decline code says more than its error code, except for this catch-all.
_GENERIC_DECLINE = "generic_decline"


# The events our endpoint at localstripe is registered for (what the gateway acts on). A refund's
# end comes as an event about the Refund itself: `refund.updated` (succeeded after pending, or
# failed/canceled), `refund.failed`, `refund.created` (a card refund is often created succeeded),
# and, from API versions before 2024-10-28, `charge.refund.updated`. `charge.refunded` is about the
# Charge (its refunds are not listed since 2022-11-15): it cannot say which refund ended, so it is
# acknowledged and ignored like any other event we do not act on.
LOCALSTRIPE_WEBHOOK_EVENTS = [
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "refund.created",
    "refund.updated",
    "refund.failed",
    "charge.refund.updated",
]
_REFUND_EVENTS = frozenset({"refund.created", "refund.updated", "refund.failed", "charge.refund.updated"})


def localstripe_endpoint_secret(channel_code: str, master: str) -> str:
    """The endpoint secret of a channel pointed at localstripe, derived from SANDBOX_SECRET.

    localstripe forgets its endpoints when it stops, so its launcher registers ours again at
    every start (gateway/sandbox_server/localstripe.py) from the same derivation: this is our
    side of that agreement, as for the sandbox's secrets; tests/gateway checks both agree.
    """
    return (
        "whsec_"
        + hmac.new(master.encode(), b"stripe:" + channel_code.encode(), hashlib.sha256).hexdigest()[:32]
    )


class _AnswerUnreadable(requests.RequestException):
    """The answer was too large, too slow or cut off (after the request was sent: maybe charged)."""


class _BoundedSession(requests.Session):
    """A requests session that never follows redirects, never takes compressed answers (they could
    expand past any bound) and reads at most MAX_ANSWER_BYTES of any answer, the whole exchange by
    one deadline (a peer dripping its status line or headers trips no per-read timeout).

    The stripe library reads `response.content` whole and without a bound; this session reads it
    first, so the library only ever sees a bounded body.
    """

    def __init__(self) -> None:
        super().__init__()
        self.headers["Accept-Encoding"] = "identity"
        watched(self)

    def request(self, method, url, **kwargs):
        kwargs["allow_redirects"] = False
        kwargs["stream"] = True
        with deadline(exchange_seconds()) as watchdog:
            try:
                response = self._bounded(method, url, **kwargs)
            except requests.RequestException as exc:
                if watchdog.expired:
                    raise _AnswerUnreadable(f"no whole answer within {exchange_seconds():g} s") from exc
                raise
        # Cut at the deadline, a head can still parse (its headers end where the cut fell) and the
        # body read as ended: whatever was read is not the whole answer.
        if watchdog.expired:
            raise _AnswerUnreadable(f"no whole answer within {exchange_seconds():g} s")
        return response

    def _bounded(self, method, url, **kwargs):
        response = super().request(method, url, **kwargs)
        until = time.monotonic() + settings.GATEWAY_READ_TIMEOUT
        declared = declared_length(response)
        chunks, size = [], 0
        try:
            if declared is not None and declared > MAX_ANSWER_BYTES:
                raise _AnswerUnreadable(f"answer of {declared} bytes")
            while chunk := response.raw.read1(_CHUNK_BYTES, decode_content=True):
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise _AnswerUnreadable(f"answer over {MAX_ANSWER_BYTES} bytes")
                if time.monotonic() > until:
                    raise _AnswerUnreadable("answer too slow")
                chunks.append(chunk)
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            raise _AnswerUnreadable(f"answer cut off: {exc.__class__.__name__}") from exc
        finally:
            response.close()
        response._content = b"".join(chunks)
        return response


def _cause(exc: stripe.APIConnectionError) -> str:
    """What ended a call that got no usable answer: our own bound's words, else the error's class."""
    if isinstance(exc.__cause__, _AnswerUnreadable):
        return str(exc.__cause__)[:200]
    return exc.__cause__.__class__.__name__ if exc.__cause__ else "connection error"


def decline_code(error: Any) -> str:
    """Stripe's reason for a failed payment, from an error object (`CardError.error`, an intent's
    `last_payment_error`): the decline code when it says more than "generic", else the error code."""
    if not isinstance(error, dict):
        return ""
    declined = _token(error.get("decline_code"), 64)
    if declined and declined != _GENERIC_DECLINE:
        return declined
    return _token(error.get("code"), 64) or declined or "card_declined"


def intent_status(intent: dict) -> tuple[str, str]:
    """("paid" | "failed" | "pending", failure code) of a PaymentIntent (its Stripe JSON)."""
    status = intent.get("status")
    if status == "succeeded":
        return "paid", ""
    if status == "requires_payment_method" and intent.get("last_payment_error"):
        # A confirmed intent whose payment failed goes back to waiting for another method.
        return "failed", decline_code(intent.get("last_payment_error"))
    if status == "canceled":
        return "failed", _token(intent.get("cancellation_reason"), 64) or "canceled"
    if status == "requires_action":
        # The card asks for the payer (3-D Secure), who is not there: a server-side confirmation
        # can go no further, and nothing was charged.
        return "failed", "authentication_required"
    return "pending", ""  # processing, requires_capture/confirmation: the webhook says more


def refund_status(refund: dict) -> tuple[str, str]:
    """("succeeded" | "failed" | "pending", failure reason) of a Refund (its Stripe JSON).

    A refund ends `succeeded`, or `failed` (the money could not go back: Stripe's failure_reason)
    or `canceled`; `pending` and `requires_action` are on the way.
    """
    status = refund.get("status")
    if status == "succeeded":
        return "succeeded", ""
    if status in ("failed", "canceled"):
        return "failed", _token(refund.get("failure_reason"), 64) or f"refund_{status}"
    return "pending", ""


def sort_stripe_error(exc: stripe.StripeError) -> ChargeResult:
    """What one of the library's errors, raised by the create-and-confirm call, says about the money."""
    status = exc.http_status
    error = exc.error.to_dict() if getattr(exc, "error", None) is not None else {}
    code = _token(exc.code, 64) if isinstance(exc.code, str) else ""
    intent = error.get("payment_intent") if isinstance(error, dict) else None
    reference = _token(intent.get("id")) if isinstance(intent, dict) else ""
    if isinstance(exc, stripe.CardError):
        return ChargeResult(
            ChargeOutcome.ACCEPTED,
            provider_reference=reference,
            http_status=status,
            error=code or "card_error",
            status="failed",
            failure_code=decline_code(error),
        )
    if isinstance(exc, stripe.APIConnectionError):
        if isinstance(exc.__cause__, requests.ConnectionError) and _never_sent(exc.__cause__):
            return ChargeResult(ChargeOutcome.REJECTED, error=f"not sent: {exc.__cause__.__class__.__name__}")
        return ChargeResult(ChargeOutcome.UNKNOWN, error=f"after sending: {_cause(exc)}")
    if isinstance(exc, stripe.IdempotencyError):
        # The key was used before with other parameters: the first request may have charged.
        return ChargeResult(ChargeOutcome.UNKNOWN, http_status=status, error="idempotency_error")
    if isinstance(exc, (stripe.AuthenticationError, stripe.PermissionError, stripe.InvalidRequestError)):
        if reference:  # an intent exists: the request got as far as making one
            return ChargeResult(ChargeOutcome.UNKNOWN, http_status=status, error=code or f"http {status}")
        label = code or {401: "authentication_error", 403: "permission_error"}.get(status, "invalid_request")
        # A key refused (401, 403) is the channel's fault; an invalid request (400, 404: no such
        # payment method, an amount below the minimum) is the order's.
        return ChargeResult(
            ChargeOutcome.REJECTED,
            http_status=status,
            error=label,
            request_refused=isinstance(exc, stripe.InvalidRequestError),
        )
    # RateLimitError (429), APIError (409, 5xx, an answer that is not Stripe's JSON), anything else.
    return ChargeResult(ChargeOutcome.UNKNOWN, http_status=status, error=code or f"http {status}")


def sort_intent(intent: Any, http_status: int | None = 200) -> ChargeResult:
    """The result of a PaymentIntent that came back from the create-and-confirm call."""
    data = intent.to_dict() if hasattr(intent, "to_dict") else intent
    reference = _token(data.get("id")) if isinstance(data, dict) else ""
    if not reference.startswith("pi_"):
        return ChargeResult(
            ChargeOutcome.UNKNOWN, http_status=http_status, error="answer without an intent id"
        )
    status, failure_code = intent_status(data)
    return ChargeResult(
        ChargeOutcome.ACCEPTED,
        provider_reference=reference,
        http_status=http_status,
        status="" if status == "pending" else status,
        failure_code=failure_code,
    )


def _retrieve(what: str, call):
    """A status query's answer; None when Stripe does not know the object (404). Any other failure
    is the provider's (ProviderError): the poll asks again later."""
    try:
        return call()
    except stripe.InvalidRequestError as exc:
        if exc.http_status == 404:
            return None
        raise ProviderError(f"{what} answer http {exc.http_status}") from exc
    except stripe.StripeError as exc:
        raise ProviderError(f"{what} query failed: {exc.__class__.__name__}") from exc


class StripeAdapter(ProviderAdapter):
    name = "stripe"
    # Stripe's own answer to a bad signature (its libraries' examples answer 400 too).
    invalid_signature_status = 400
    # Stripe may prune an idempotency key once it is 24 h old; after that a create sent again under
    # it is a new request (a second PaymentIntent or refund). An hour's margin.
    key_window = timedelta(hours=23)

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str], stripe.StripeClient] = {}
        self._lock = threading.Lock()

    def _client(self, channel: PaymentChannel) -> stripe.StripeClient:
        """One client per channel's key and API base: both come from the channel (SPEC 11)."""
        if not channel.api_key_encrypted:
            raise ProviderError(f"channel {channel.code} has no API key")
        try:
            api_key = crypto.decrypt(channel.api_key_encrypted)
        except (InvalidToken, ValueError) as exc:
            logger.error("stripe.api_key_unreadable", extra={"channel": channel.code})
            raise ProviderError("channel API key unreadable") from exc
        api_base = (channel.api_base or settings.STRIPE_API_BASE).rstrip("/")
        with self._lock:
            client = self._clients.get((api_key, api_base))
            if client is None:
                client = stripe.StripeClient(
                    api_key,
                    base_addresses={"api": api_base},
                    # Our own retries resend under the same key; the library's would stretch a
                    # call past the lease that keeps two copies from sending at once.
                    max_network_retries=0,
                    http_client=stripe.RequestsClient(
                        timeout=(settings.GATEWAY_CONNECT_TIMEOUT, settings.GATEWAY_READ_TIMEOUT),
                        session=_BoundedSession(),
                    ),
                )
                if len(self._clients) >= 64:  # keys rotate: keep the cache as small as the channels
                    self._clients.clear()
                self._clients[(api_key, api_base)] = client
        return client

    def charge(self, *, channel: PaymentChannel, request: ChargeRequest) -> ChargeResult:
        if not request.payment_method:
            # Allocation never sends such an order here; refuse it before anything is sent.
            return ChargeResult(ChargeOutcome.REJECTED, error="no payment method")
        try:
            client = self._client(channel)
        except ProviderError as exc:
            return ChargeResult(ChargeOutcome.REJECTED, error=f"not sent: {exc}")
        params = {
            "amount": request.amount,
            "currency": request.currency.lower(),
            "payment_method": request.payment_method,
            # Cards only: a server-side confirmation has no page to redirect the payer to.
            "payment_method_types": ["card"],
            "confirm": True,
            "capture_method": "automatic",
            "metadata": {"order_id": request.order_id, "attempt": request.idempotency_key},
        }
        try:
            intent = client.v1.payment_intents.create(
                params=params, options={"idempotency_key": request.idempotency_key}
            )
        except stripe.StripeError as exc:
            return sort_stripe_error(exc)
        return sort_intent(intent)

    def fetch_status(
        self, *, channel: PaymentChannel, idempotency_key: str, provider_reference: str = ""
    ) -> StatusResult:
        """The PaymentIntent's status, by its id.

        Without an id (the create's answer was lost) there is nothing to ask about: "not_found",
        not `looked`, makes the poll resend the create under the same key, which Stripe answers with
        the first request's result if that one arrived, or processes now if it did not, but only
        within `key_window` (Stripe keeps keys 24 h).
        """
        if not provider_reference.startswith("pi_"):
            return StatusResult("not_found", looked=False)
        intent = _retrieve(
            "status", lambda: self._client(channel).v1.payment_intents.retrieve(provider_reference)
        )
        if intent is None:
            return StatusResult("not_found")
        data = intent.to_dict()
        metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
        if metadata.get("attempt", idempotency_key) != idempotency_key:
            raise ProviderError("status answer is about another charge")
        status, failure_code = intent_status(data)
        return StatusResult(status=status, failure_code=failure_code, provider_reference=provider_reference)

    def refund(self, *, channel: PaymentChannel, request: RefundRequest) -> RefundResult:
        """A refund through Stripe's Refunds API, of the PaymentIntent that the charge made.

        The same sorting as a charge's: refused before anything was made -> rejected for good
        (or to retry, when nothing was sent); anything that may hide a refund -> unknown.
        """
        intent = provider_reference_of_charge(idempotency_key=request.charge_idempotency_key)
        if not intent.startswith("pi_"):
            return RefundResult(ChargeOutcome.REJECTED, error="charge has no PaymentIntent yet", retry=True)
        try:
            client = self._client(channel)
        except ProviderError as exc:
            return RefundResult(ChargeOutcome.REJECTED, error=f"not sent: {exc}", retry=True)
        params = {
            "payment_intent": intent,
            "amount": request.amount,
            "metadata": {
                "order_id": request.order_id,
                "refund_id": request.refund_id,
                "attempt": request.idempotency_key,
            },
        }
        try:
            refund = client.v1.refunds.create(
                params=params, options={"idempotency_key": request.idempotency_key}
            )
        except stripe.StripeError as exc:
            sorted_ = sort_stripe_error(exc)
            retry = sorted_.outcome == ChargeOutcome.REJECTED and sorted_.error.startswith("not sent")
            outcome = ChargeOutcome.UNKNOWN if isinstance(exc, stripe.CardError) else sorted_.outcome
            return RefundResult(outcome, http_status=sorted_.http_status, error=sorted_.error, retry=retry)
        data = refund.to_dict()
        reference = _token(data.get("id"))
        if not reference.startswith("re_"):
            return RefundResult(ChargeOutcome.UNKNOWN, http_status=200, error="answer without a refund id")
        status, failure_code = refund_status(data)
        return RefundResult(
            ChargeOutcome.ACCEPTED,
            provider_reference=reference,
            http_status=200,
            status="" if status == "pending" else status,
            failure_code=failure_code,
        )

    def fetch_refund_status(self, *, channel: PaymentChannel, idempotency_key: str) -> StatusResult:
        """The refund's status, by Stripe's id for it. Without one (the create's answer was lost),
        the PaymentIntent's refunds are listed and ours is the one whose metadata names our key: a
        refund made by a request whose answer we never read is found, never made again, whatever
        its age. None there: "not_found", and the create is sent again under the same key."""
        reference = provider_reference_of_refund(idempotency_key=idempotency_key)
        if reference.startswith("re_"):
            refund = _retrieve("refund status", lambda: self._client(channel).v1.refunds.retrieve(reference))
            data = refund.to_dict() if refund is not None else None
        else:
            data = self._refund_by_key(channel, idempotency_key)
        if data is None:
            return StatusResult("not_found")
        status, failure_code = refund_status(data)
        return StatusResult(status, failure_code=failure_code, provider_reference=_token(data.get("id")))

    def _refund_by_key(self, channel: PaymentChannel, idempotency_key: str) -> dict | None:
        """Our refund among the charge's PaymentIntent's refunds: the one whose metadata.attempt is
        our key, for our amount and currency. None only when the list is read whole and has no
        refund under our key: anything less certain is a ProviderError (nothing is resent)."""
        facts = refund_lookup_facts(idempotency_key=idempotency_key)
        if facts is None or not facts.charge_reference.startswith("pi_"):
            raise ProviderError("refund status: the charge has no PaymentIntent id to list refunds by")
        refunds = _retrieve(
            "refund list",
            lambda: self._client(channel).v1.refunds.list(
                params={"payment_intent": facts.charge_reference, "limit": 100}
            ),
        )
        if refunds is None:  # Stripe does not know the PaymentIntent: that is no answer about ours
            raise ProviderError("refund list: the PaymentIntent is unknown")
        page = refunds.to_dict()
        listed = page.get("data")
        if page.get("object") != "list" or not isinstance(listed, list) or page.get("has_more") is not False:
            # Not a whole list (or more than 100 refunds of one payment): ours may be missing from
            # what we read, and "none there" would send the create again. No guess.
            raise ProviderError("refund list: not a whole list of refunds")
        ours = []
        for item in listed:
            if not isinstance(item, dict) or not isinstance(item.get("metadata"), dict):
                raise ProviderError("refund list: an entry that is not a refund")
            if item["metadata"].get("attempt") == idempotency_key:
                ours.append(item)
        if not ours:
            return None
        item = ours[0]
        if (
            len(ours) > 1
            or type(item.get("amount")) is not int
            or item.get("amount") != facts.amount
            or str(item.get("currency", "")).upper() != facts.currency
            or not _token(item.get("id")).startswith("re_")
        ):
            logger.error(
                "refund_poll.listed_refund_not_ours",
                extra={"idempotency_key": idempotency_key, "listed": len(ours), "id": _token(item.get("id"))},
            )
            raise ProviderError("refund list: a refund under our key for another amount or currency")
        return item

    def parse_webhook(self, *, body: bytes, headers: dict[str, str]) -> WebhookEvent:
        """Verify `Stripe-Signature` with the library against each Stripe channel's endpoint secret.

        Stripe's events do not name our channel, so the signer is the channel whose secret verifies
        (several channels on one Stripe account share an endpoint and its secret: then the one that
        made the charge). Only then is the body read as an event.
        """
        signature = {k.lower(): v for k, v in headers.items()}.get("stripe-signature", "")
        if not signature or len(signature) > 4096:
            raise InvalidWebhook("no Stripe-Signature")
        if not signature.isascii():
            # The library compares with `hmac.compare_digest`, which raises TypeError on non-ASCII
            # text: a signature is hex, so such a header is refused before it gets there.
            raise InvalidWebhook("Stripe-Signature is not ASCII")
        try:
            payload = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedWebhook("body is not UTF-8") from exc
        signers = []
        for channel in channels_of_provider(self.name):
            if not channel.webhook_secret_encrypted:
                continue
            try:
                secret = crypto.decrypt(channel.webhook_secret_encrypted)
            except (InvalidToken, ValueError):
                logger.error("webhook.secret_unreadable", extra={"channel": channel.code})
                continue
            try:
                stripe.WebhookSignature.verify_header(payload, signature, secret, WEBHOOK_TOLERANCE_SECONDS)
            except stripe.SignatureVerificationError:
                continue
            signers.append(channel.code)
        if not signers:
            raise InvalidWebhook("no Stripe channel's endpoint secret verifies the signature")
        # The library refuses timestamps older than the tolerance but not future ones; SPEC 5
        # refuses both (a future-dated signature would stay replayable for longer).
        signed_at = next((part[2:] for part in signature.split(",") if part.startswith("t=")), "")
        if not signed_at.isdigit() or int(signed_at) > time.time() + WEBHOOK_TOLERANCE_SECONDS:
            raise InvalidWebhook("signature timestamp in the future")
        return verified_event(payload, signers)


_EVENT_STATUS = {"payment_intent.succeeded": "paid", "payment_intent.payment_failed": "failed"}


def verified_event(payload: str, signers: list[str]) -> WebhookEvent:
    """The event of a verified body; every field checked for type and size before anything stores it.

    `IgnoredWebhook` for an authentic event we do not act on: another type, or an intent that is
    not ours (a Stripe account may serve other systems too); Stripe then gets its 2xx and stops.
    """
    try:
        event = json.loads(payload, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise MalformedWebhook("body is not JSON") from exc
    if not isinstance(event, dict) or event.get("object") != "event":
        raise MalformedWebhook("body is not a Stripe event")
    event_id = _token(event.get("id"))
    event_type = event.get("type")
    if not event_id or not isinstance(event_type, str) or len(event_type) > 64:
        raise MalformedWebhook("event without id or type")
    if event_type in _REFUND_EVENTS:
        return _refund_event(event, event_id, event_type, signers)
    status = _EVENT_STATUS.get(event_type)
    if status is None:
        raise IgnoredWebhook(f"event type {event_type[:64]!r}")
    data = event.get("data")
    intent = data.get("object") if isinstance(data, dict) else None
    if not isinstance(intent, dict) or intent.get("object") != "payment_intent":
        raise MalformedWebhook("event without its PaymentIntent")
    reference = _token(intent.get("id"))
    metadata = intent.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    order_id, attempt = metadata.get("order_id"), metadata.get("attempt")
    if order_id is None and attempt is None:
        raise IgnoredWebhook("a PaymentIntent that is not ours")
    order_id, attempt = _token(order_id, 64), _token(attempt)
    if not order_id or not attempt or not reference.startswith("pi_"):
        raise MalformedWebhook("PaymentIntent without a readable id, order_id or attempt")
    if not _payload_storable(event):
        raise MalformedWebhook("body holds NUL bytes or invalid text")
    # Our key is `<order>:<channel>`: of the channels whose secret verified, the one that charged.
    attempt_channel = attempt.rpartition(":")[2]
    channel = attempt_channel if attempt_channel in signers else signers[0]
    failure_code = ""
    if status == "failed":
        failure_code = decline_code(intent.get("last_payment_error"))
    amount, currency = money_named(intent)
    return WebhookEvent(
        webhook_id=event_id,
        event_type=event_type,
        status=status,
        order_id=order_id,
        idempotency_key=attempt,
        channel=channel,
        failure_code=failure_code,
        provider_reference=reference,
        payload=event,
        amount=amount,
        currency=currency,
    )


def _refund_event(event: dict, event_id: str, event_type: str, signers: list[str]) -> WebhookEvent:
    """A Refund's event: the same refund-webhook event as the sandbox's, once the Refund has ended.

    Ours when its metadata names our refund key (`attempt`, set by `StripeAdapter.refund`);
    a refund still pending, or one made by another system on the account, is ignored (2xx).
    """
    data = event.get("data")
    refund = data.get("object") if isinstance(data, dict) else None
    if not isinstance(refund, dict) or refund.get("object") != "refund":
        raise MalformedWebhook("event without its Refund")
    metadata = refund.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    order_id, attempt = metadata.get("order_id"), metadata.get("attempt")
    if order_id is None and attempt is None:
        raise IgnoredWebhook("a Refund that is not ours")
    reference = _token(refund.get("id"))
    order_id, attempt = _token(order_id, 64), _token(attempt)
    if not order_id or not attempt.startswith("refund:") or not reference.startswith("re_"):
        raise MalformedWebhook("Refund without a readable id, order_id or attempt")
    status, failure_code = refund_status(refund)
    if status == "pending":
        raise IgnoredWebhook(f"refund still {_token(refund.get('status'), 32) or 'pending'}")
    if not _payload_storable(event):
        raise MalformedWebhook("body holds NUL bytes or invalid text")
    # A refund's key does not name its channel: of those whose secret verified, the one sent it.
    refund_channel = channel_of_refund(idempotency_key=attempt)
    channel = refund_channel if refund_channel in signers else signers[0]
    amount, currency = money_named(refund)
    return WebhookEvent(
        webhook_id=event_id,
        event_type=event_type,
        status=status,
        order_id=order_id,
        idempotency_key=attempt,
        channel=channel,
        failure_code=failure_code,
        provider_reference=reference,
        payload=event,
        kind="refund",
        amount=amount,
        currency=currency,
    )


register(StripeAdapter())
