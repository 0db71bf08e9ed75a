"""Adapter for the sandbox provider (gateway/sandbox_server), spoken to over HTTP like any gateway."""

import base64
import hashlib
import hmac
import http.client
import json
import logging
import math
import re
import time
from typing import Any

import requests
import urllib3
from cryptography.fernet import InvalidToken
from django.conf import settings
from requests.adapters import HTTPAdapter
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook, WebhookVerificationError
from urllib3.exceptions import NewConnectionError

from allocation.models import PaymentChannel
from allocation.selectors import channel_by_code
from core import crypto
from core.http_deadline import deadline, watched
from gateway.providers.base import (
    ChargeOutcome,
    ChargeRequest,
    ChargeResult,
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

logger = logging.getLogger(__name__)

# The sandbox's answers are well under 1 KiB. Reading a provider's body without a bound lets a
# broken or hostile peer fill a worker's memory; requests has no such bound, so we count ourselves.
MAX_ANSWER_BYTES = 64 * 1024
_CHUNK_BYTES = 8 * 1024

# The 400s of `POST /v1/charges` all come from the sandbox's request validation
# (`parse_charge_request` in gateway/sandbox_server/app.py), which `create_charge` runs before
# it looks at its ledger: these codes say the charge was never processed. Any other 400 (another
# code, no body, a proxy's page) says nothing of the kind and is an unknown outcome.
_NOT_PROCESSED_400 = frozenset({"invalid_request", "invalid_json", "missing_idempotency_key"})
_FINAL_OR_PENDING = frozenset({"paid", "failed", "pending"})
# What a peer's code or id may look like before we log it, store it or compare it.
_TOKEN = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
# PaymentChannel.code is a SlugField(max_length=64).
_CHANNEL_CODE = re.compile(r"[-a-zA-Z0-9_]{1,64}")


def sandbox_channel_secret(channel_code: str, master: str) -> str:
    """The webhook secret the sandbox gives one channel (`whsec_<base64 key>`).

    The sandbox publishes how it derives a channel's secret from its master secret (HMAC-SHA256
    of the channel code): this is our side of that agreement, the way a merchant copies a
    secret off a provider's dashboard. We do not import the sandbox's code: it stands in for a
    third party. tests/sandbox checks that both sides agree.
    """
    digest = hmac.new(master.encode(), channel_code.encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(digest).decode("ascii")


class _Unreadable(Exception):
    """The answer's body was too large, too slow or cut off."""


class _NoAnswer(Exception):
    """No readable answer to a charge or refund request, and what that tells of its outcome."""

    def __init__(self, outcome: ChargeOutcome, error: str, *, http_status: int | None = None) -> None:
        super().__init__(error)
        self.outcome, self.error, self.http_status = outcome, error, http_status


def _never_sent(exc: requests.ConnectionError) -> bool:
    """True when the request provably never reached the provider (refused, DNS, connect timeout).

    No byte of the request leaves before the TCP (and TLS) handshake completes, so a failure to
    connect is proof; a reset, an abort or a bad status line after connecting is not.
    """
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = exc.args[0] if exc.args else None
    inner = getattr(reason, "reason", reason)
    return isinstance(inner, (NewConnectionError, ConnectionRefusedError))


def exchange_seconds() -> float:
    """How long one call to a provider may take, all of it: connect, send, status line, headers and
    body. A peer that drips its answer trips no per-read timeout; this bound is what keeps a worker
    from waiting on it (and inside the sending lease, gateway/services.py)."""
    return settings.GATEWAY_CONNECT_TIMEOUT + settings.GATEWAY_READ_TIMEOUT


def _failure(exc: Exception | None, watchdog) -> str:
    if watchdog.expired or exc is None:
        return f"no whole answer within {exchange_seconds():g} s"
    return exc.__class__.__name__ if not isinstance(exc, _Unreadable) else str(exc)


def _base(channel: PaymentChannel) -> str:
    """The channel's own API base when an operator set one, else the sandbox's address."""
    return (channel.api_base or settings.SANDBOX_URL).rstrip("/")


def _token(value: Any, max_length: int = 128) -> str:
    """`value` if it is a sane code or id, else ""."""
    if isinstance(value, str) and len(value) <= max_length and _TOKEN.fullmatch(value):
        return value
    return ""


def _error_code(data: Any) -> str:
    error = data.get("error") if isinstance(data, dict) else None
    return _token(error.get("code"), 64) if isinstance(error, dict) else ""


def declared_length(response: requests.Response) -> int | None:
    """The answer's Content-Length, when it is a number: ASCII digits only (str.isdigit() also says
    yes to "²", which int() refuses); anything else declares nothing and the read stays bounded."""
    declared = response.headers.get("Content-Length", "")
    return int(declared) if declared.isascii() and declared.isdigit() else None


def _read_json(response: requests.Response) -> Any:
    """The answer's JSON, or None when it is not JSON; `_Unreadable` past the size or time bound."""
    # The read timeout applies per socket read; a body dripped a byte at a time is cut off here.
    deadline = time.monotonic() + settings.GATEWAY_READ_TIMEOUT
    declared = declared_length(response)
    if declared is not None and declared > MAX_ANSWER_BYTES:
        raise _Unreadable(f"answer of {declared} bytes")
    chunks, size = [], 0
    try:
        # read1: one socket read at most per call, so the deadline is checked between them
        # (iter_content would block until a whole chunk arrived, however slowly).
        while chunk := response.raw.read1(_CHUNK_BYTES, decode_content=True):
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise _Unreadable(f"answer over {MAX_ANSWER_BYTES} bytes")
            if time.monotonic() > deadline:
                raise _Unreadable("answer too slow")
            chunks.append(chunk)
    except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
        raise _Unreadable(f"answer cut off: {exc.__class__.__name__}") from exc
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def sort_charge_answer(status_code: int, data: Any) -> ChargeResult:
    """What an HTTP answer to a charge request says about the money (SPEC 5, 9).

    Only an explicit "nothing was charged" may fail over; every other answer may hide a charge.
    `data` is the decoded JSON body, or None when it could not be read.
    """
    if 200 <= status_code < 300:
        reference = _token(data.get("id")) if isinstance(data, dict) else ""
        if reference:
            return ChargeResult(ChargeOutcome.ACCEPTED, provider_reference=reference, http_status=status_code)
        return ChargeResult(
            ChargeOutcome.UNKNOWN, http_status=status_code, error=f"http {status_code} without id"
        )
    error_code = _error_code(data)
    if status_code == 503 and error_code == "channel_unavailable":
        return ChargeResult(ChargeOutcome.REJECTED, http_status=status_code, error=error_code)
    if status_code == 400 and error_code in _NOT_PROCESSED_400:
        return ChargeResult(ChargeOutcome.REJECTED, http_status=status_code, error=error_code)
    # 409, 422 (idempotency_key_reused), 429, other 4xx and 5xx, 3xx: maybe charged.
    return ChargeResult(
        ChargeOutcome.UNKNOWN, http_status=status_code, error=error_code or f"http {status_code}"
    )


# `POST /v1/refunds` answers that say nothing was refunded and never will be under this key:
# request validation, and the ledger's refusals (no such charge, a failed charge, past the charge).
_REFUND_REFUSED = {
    400: frozenset(
        {
            "invalid_request",
            "invalid_json",
            "missing_idempotency_key",
            "amount_exceeds_charge",
            "charge_not_refundable",
        }
    ),
    404: frozenset({"charge_not_found"}),
}
_REFUND_FINAL_OR_PENDING = frozenset({"succeeded", "failed", "pending"})


def sort_refund_answer(status_code: int, data: Any) -> RefundResult:
    """What an HTTP answer to a refund request says about the money (SPEC 10).

    As for charges, only an explicit "nothing was refunded" is not an unknown outcome; the
    sandbox's 503 `channel_unavailable` is such a refusal that asks to be retried (same channel:
    a refund never goes anywhere but to the channel that charged).
    """
    if 200 <= status_code < 300:
        reference = _token(data.get("id")) if isinstance(data, dict) else ""
        if reference:
            return RefundResult(ChargeOutcome.ACCEPTED, provider_reference=reference, http_status=status_code)
        return RefundResult(
            ChargeOutcome.UNKNOWN, http_status=status_code, error=f"http {status_code} without id"
        )
    error_code = _error_code(data)
    if status_code == 503 and error_code == "channel_unavailable":
        return RefundResult(ChargeOutcome.REJECTED, http_status=status_code, error=error_code, retry=True)
    if error_code and error_code in _REFUND_REFUSED.get(status_code, ()):
        return RefundResult(ChargeOutcome.REJECTED, http_status=status_code, error=error_code)
    return RefundResult(
        ChargeOutcome.UNKNOWN, http_status=status_code, error=error_code or f"http {status_code}"
    )


def _text(data: dict, name: str, max_length: int, *, required: bool = True) -> str:
    value = data.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or len(value) > max_length or not _storable(value):
        raise MalformedWebhook(f"`{name}` must be a string of at most {max_length} characters")
    return value


def _storable(value: str) -> bool:
    """PostgreSQL text and jsonb take neither NUL nor lone surrogates."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _payload_storable(payload: Any) -> bool:
    stack = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not _storable(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _claimed_channel(body: bytes) -> tuple[dict | None, str]:
    """The body, parsed as we store it (None when only a lenient parse reads it: NaN, an infinity,
    a number out of range), and the channel it claims to come from, unverified.

    A body that names no channel cannot have its signature checked (the secret is the channel's),
    so it is refused as unverifiable, `InvalidWebhook` (401, SPEC 5), never as malformed: only a
    body whose signature has verified is judged for its shape (`MalformedWebhook`, 400).
    """
    try:
        text = body.decode("utf-8")
        try:
            # NaN and infinities are not JSON, and PostgreSQL's jsonb would refuse them when stored.
            strict = lenient = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
        except ValueError:
            strict, lenient = None, json.loads(text)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep
        raise InvalidWebhook("body is not JSON: no channel to verify it for") from exc
    data = lenient.get("data") if isinstance(lenient, dict) else None
    code = data.get("channel") if isinstance(data, dict) else None
    if not isinstance(code, str) or not _CHANNEL_CODE.fullmatch(code):
        raise InvalidWebhook("body has no `data.channel`: no channel to verify it for")
    return strict, code


class SandboxAdapter(ProviderAdapter):
    name = "sandbox"

    def __init__(self) -> None:
        self._session: requests.Session | None = None

    @property
    def session(self) -> requests.Session:
        # One keep-alive pool per process; created lazily so forked workers do not share sockets.
        if self._session is None:
            session = requests.Session()
            # The sandbox is addressed directly: no proxy or .netrc lookup in the environment on
            # every request (measured 0.25 ms of CPU per call).
            session.trust_env = False
            session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=0))
            session.mount("https://", HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=0))
            # Compressed answers could expand past any bound we count in raw bytes.
            session.headers["Accept-Encoding"] = "identity"
            # Each call inside `deadline`: a peer dripping its status line or headers is cut off too.
            self._session = watched(session)
        return self._session

    @property
    def _timeout(self) -> tuple[float, float]:
        return (settings.GATEWAY_CONNECT_TIMEOUT, settings.GATEWAY_READ_TIMEOUT)

    def charge(self, *, channel: PaymentChannel, request: ChargeRequest) -> ChargeResult:
        body = {
            "channel": channel.code,
            "order_id": request.order_id,
            "amount": request.amount,
            "currency": request.currency,
            "webhook_url": request.webhook_url,
        }
        try:
            code, data = self._send(_base(channel), "/v1/charges", body, request.idempotency_key)
        except _NoAnswer as failed:
            return ChargeResult(failed.outcome, http_status=failed.http_status, error=failed.error)
        return sort_charge_answer(code, data)

    def _send(self, base: str, path: str, body: dict, idempotency_key: str) -> tuple[int, Any]:
        """POST a charge or refund under its idempotency key: (HTTP status, JSON answer or None).

        `_NoAnswer` says what is known when no readable answer came back: REJECTED when the request
        provably never left, UNKNOWN once it may have (a timeout, a cut or oversized answer, no
        whole answer by the exchange's deadline).
        """
        with deadline(exchange_seconds()) as watchdog:
            try:
                # No redirects: a 307 would send the request somewhere else, a 302 turn it into a GET.
                response = self.session.post(
                    f"{base}{path}",
                    json=body,
                    headers={"Idempotency-Key": idempotency_key},
                    timeout=self._timeout,
                    stream=True,
                    allow_redirects=False,
                )
            except requests.ConnectionError as exc:
                if _never_sent(exc):
                    raise _NoAnswer(ChargeOutcome.REJECTED, f"not sent: {exc.__class__.__name__}") from exc
                raise _NoAnswer(ChargeOutcome.UNKNOWN, f"after sending: {_failure(exc, watchdog)}") from exc
            except (requests.RequestException, http.client.HTTPException, OSError) as exc:
                # A read timeout, or anything else once the request may have left: maybe made.
                raise _NoAnswer(ChargeOutcome.UNKNOWN, f"after sending: {_failure(exc, watchdog)}") from exc
            with response:
                try:
                    data = _read_json(response)
                except _Unreadable as exc:
                    raise _NoAnswer(
                        ChargeOutcome.UNKNOWN,
                        f"http {response.status_code}: {_failure(exc, watchdog)}",
                        http_status=response.status_code,
                    ) from exc
        if watchdog.expired:
            # Cut at the deadline, a head can still parse (its headers end where the cut fell) and
            # the body read as ended: what was read is not the whole answer.
            raise _NoAnswer(ChargeOutcome.UNKNOWN, f"after sending: {_failure(None, watchdog)}")
        return response.status_code, data

    def _status_query(
        self, *, base: str, path: str, idempotency_key: str, what: str, known: frozenset
    ) -> StatusResult:
        """GET `path` for the charge or refund under `idempotency_key`; `ProviderError` when the
        provider cannot be reached or read. A status we do not know yet is no outcome: keep
        waiting, never guess."""
        with deadline(exchange_seconds()) as watchdog:
            try:
                response = self.session.get(
                    f"{base}{path}",
                    params={"idempotency_key": idempotency_key},
                    timeout=self._timeout,
                    stream=True,
                    allow_redirects=False,
                )
            except (requests.RequestException, http.client.HTTPException, OSError) as exc:
                raise ProviderError(f"{what} status query failed: {_failure(exc, watchdog)}") from exc
            with response:
                code = response.status_code
                try:
                    data = _read_json(response)
                except _Unreadable as exc:
                    raise ProviderError(
                        f"{what} status answer http {code}: {_failure(exc, watchdog)}"
                    ) from exc
        if watchdog.expired:
            raise ProviderError(f"{what} status answer: {_failure(None, watchdog)}")
        if code == 404 and _error_code(data) == "not_found":
            return StatusResult("not_found")
        if not 200 <= code < 300 or not isinstance(data, dict):
            raise ProviderError(f"{what} status answer http {code} unreadable")
        if data.get("idempotency_key", idempotency_key) != idempotency_key:
            raise ProviderError(f"{what} status answer is about another {what}")
        status = data.get("status")
        return StatusResult(
            status=status if isinstance(status, str) and status in known else "pending",
            failure_code=_token(data.get("failure_code"), 64),
            provider_reference=_token(data.get("id")),
        )

    def fetch_status(
        self, *, channel: PaymentChannel, idempotency_key: str, provider_reference: str = ""
    ) -> StatusResult:
        """The charge's status; `ProviderError` when the provider cannot be reached or read."""
        return self._status_query(
            base=_base(channel),
            path="/v1/charges",
            idempotency_key=idempotency_key,
            what="charge",
            known=_FINAL_OR_PENDING,
        )

    def refund(self, *, channel: PaymentChannel, request: RefundRequest) -> RefundResult:
        body = {
            "charge_idempotency_key": request.charge_idempotency_key,
            "amount": request.amount,
            "webhook_url": request.webhook_url,
        }
        try:
            code, data = self._send(_base(channel), "/v1/refunds", body, request.idempotency_key)
        except _NoAnswer as failed:
            # Never sent: nothing refunded, so the refund is asked again later on the same channel.
            retry = failed.outcome == ChargeOutcome.REJECTED
            return RefundResult(
                failed.outcome, http_status=failed.http_status, error=failed.error, retry=retry
            )
        return sort_refund_answer(code, data)

    def fetch_refund_status(self, *, channel: PaymentChannel, idempotency_key: str) -> StatusResult:
        return self._status_query(
            base=_base(channel),
            path="/v1/refunds",
            idempotency_key=idempotency_key,
            what="refund",
            known=_REFUND_FINAL_OR_PENDING,
        )

    def parse_webhook(self, *, body: bytes, headers: dict[str, str]) -> WebhookEvent:
        # The channel (and so the secret) comes from the unverified body; reading it touches no
        # database, and only a well-formed code is looked up, through a cache of existing channels.
        unverified, channel_code = _claimed_channel(body)
        channel = channel_by_code(channel_code)
        if channel is None or channel.provider != self.name or not channel.webhook_secret_encrypted:
            raise InvalidWebhook("unknown channel")
        try:
            secret = crypto.decrypt(channel.webhook_secret_encrypted)
        except (InvalidToken, ValueError) as exc:
            logger.error("webhook.secret_unreadable", extra={"channel": channel_code})
            raise InvalidWebhook("channel secret unreadable") from exc
        try:
            Webhook(secret).verify(body, headers, json_parse=False)
        except (WebhookVerificationError, EmptyWebhookSecretError, ValueError, TypeError) as exc:
            # ValueError covers malformed signature lists and bad base64 (binascii.Error).
            raise InvalidWebhook(str(exc) or exc.__class__.__name__) from exc
        if unverified is None:
            raise MalformedWebhook("body holds NaN, an infinity or a number out of range")
        return _verified_event(unverified, channel_code, headers)


def _verified_event(payload: dict, channel_code: str, headers: dict[str, str]) -> WebhookEvent:
    """The event of a verified body: every field checked for type and size before anything stores it."""
    event_type = payload.get("type")
    known = _EVENT_TYPES.get(event_type) if isinstance(event_type, str) else None
    if known is None:
        raise MalformedWebhook("unknown event type")
    kind, status = known
    if not _payload_storable(payload):
        raise MalformedWebhook("body holds NUL bytes or invalid text")
    data = payload["data"]
    webhook_id = {k.lower(): v for k, v in headers.items()}.get("webhook-id", "")
    amount, currency = money_named(data)
    return WebhookEvent(
        webhook_id=_text({"webhook-id": webhook_id}, "webhook-id", 128),
        event_type=event_type,
        status=status,
        order_id=_text(data, "order_id", 64),
        idempotency_key=_text(data, "idempotency_key", 128),
        channel=channel_code,
        failure_code=_text(data, "failure_code", 64, required=False),
        provider_reference=_text(data, "id", 128, required=False),
        payload=payload,
        kind=kind,
        amount=amount,
        currency=currency,
    )


_EVENT_TYPES = {
    "charge.paid": ("charge", "paid"),
    "charge.failed": ("charge", "failed"),
    "refund.succeeded": ("refund", "succeeded"),
    "refund.failed": ("refund", "failed"),
}


register(SandboxAdapter())
