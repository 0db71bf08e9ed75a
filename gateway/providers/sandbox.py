"""Adapter for the sandbox provider (gateway/sandbox_server), spoken to over HTTP like any gateway."""

import json
import logging

import requests
from django.conf import settings
from requests.adapters import HTTPAdapter
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from urllib3.exceptions import NewConnectionError

from allocation.models import PaymentChannel
from allocation.selectors import channel_by_code
from gateway.providers.base import (
    ChargeOutcome,
    ChargeRequest,
    ChargeResult,
    InvalidWebhook,
    ProviderAdapter,
    StatusResult,
    WebhookEvent,
    register,
)
from orders import crypto

logger = logging.getLogger(__name__)


def _never_sent(exc: requests.ConnectionError) -> bool:
    """True when the request provably never reached the provider (refused, DNS, connect timeout)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = exc.args[0] if exc.args else None
    inner = getattr(reason, "reason", reason)
    return isinstance(inner, (NewConnectionError, ConnectionRefusedError))


class SandboxAdapter(ProviderAdapter):
    name = "sandbox"

    def __init__(self) -> None:
        self._session: requests.Session | None = None

    @property
    def session(self) -> requests.Session:
        # One keep-alive pool per process; created lazily so forked workers do not share sockets.
        if self._session is None:
            session = requests.Session()
            session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=0))
            session.mount("https://", HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=0))
            self._session = session
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
            response = self.session.post(
                f"{settings.SANDBOX_URL}/v1/charges",
                json=body,
                headers={"Idempotency-Key": request.idempotency_key},
                timeout=self._timeout,
            )
        except requests.ConnectionError as exc:
            if _never_sent(exc):
                return ChargeResult(ChargeOutcome.REJECTED, error=f"not sent: {exc.__class__.__name__}")
            return ChargeResult(ChargeOutcome.UNKNOWN, error=f"after sending: {exc.__class__.__name__}")
        except requests.Timeout as exc:
            return ChargeResult(ChargeOutcome.UNKNOWN, error=f"timeout: {exc.__class__.__name__}")
        try:
            data = response.json()
        except ValueError:
            data = {}
        code = response.status_code
        if code in (200, 201) and isinstance(data, dict) and data.get("id"):
            return ChargeResult(ChargeOutcome.ACCEPTED, provider_reference=str(data["id"]), http_status=code)
        error_code = (data.get("error") or {}).get("code", "") if isinstance(data, dict) else ""
        if code == 503 and error_code == "channel_unavailable":
            return ChargeResult(ChargeOutcome.REJECTED, http_status=code, error=error_code)
        if 400 <= code < 500:
            # The provider refused the request itself: nothing was charged.
            return ChargeResult(ChargeOutcome.REJECTED, http_status=code, error=error_code or f"http {code}")
        return ChargeResult(ChargeOutcome.UNKNOWN, http_status=code, error=error_code or f"http {code}")

    def fetch_status(self, *, channel: PaymentChannel, idempotency_key: str) -> StatusResult:
        response = self.session.get(
            f"{settings.SANDBOX_URL}/v1/charges",
            params={"idempotency_key": idempotency_key},
            timeout=self._timeout,
        )
        if response.status_code == 404:
            return StatusResult("not_found")
        response.raise_for_status()
        data = response.json()
        return StatusResult(
            status=data.get("status", "pending"),
            failure_code=data.get("failure_code") or "",
            provider_reference=data.get("id", ""),
        )

    def parse_webhook(self, *, body: bytes, headers: dict[str, str]) -> WebhookEvent:
        try:
            unverified = json.loads(body)
            data = unverified["data"]
            channel_code = str(data["channel"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidWebhook("unreadable body") from exc
        channel = channel_by_code(channel_code)
        if channel is None or channel.provider != self.name or not channel.webhook_secret_encrypted:
            raise InvalidWebhook("unknown channel")
        try:
            Webhook(crypto.decrypt(channel.webhook_secret_encrypted)).verify(body, headers)
        except (WebhookVerificationError, ValueError, TypeError) as exc:
            # ValueError covers malformed signature lists and bad base64 (binascii.Error).
            raise InvalidWebhook(str(exc) or exc.__class__.__name__) from exc
        event_type = str(unverified.get("type", ""))
        status = {"charge.paid": "paid", "charge.failed": "failed"}.get(event_type)
        if status is None:
            raise InvalidWebhook(f"unknown event type {event_type!r}")
        headers_lower = {k.lower(): v for k, v in headers.items()}
        return WebhookEvent(
            webhook_id=headers_lower["webhook-id"],
            event_type=event_type,
            status=status,
            order_id=str(data.get("order_id", "")),
            idempotency_key=str(data.get("idempotency_key", "")),
            channel=channel_code,
            failure_code=str(data.get("failure_code") or ""),
            provider_reference=str(data.get("id", "")),
            payload=unverified,
        )


register(SandboxAdapter())
