"""Per-channel webhook secrets of the sandbox provider, shared by the sandbox and the gateway adapter."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

# Public on purpose: the sandbox is a test double, and dev/test runs must agree without configuration.
DEFAULT_MASTER_SECRET = "sandbox-dev-secret"  # noqa: S105


def master_secret() -> str:
    """The master secret from SANDBOX_SECRET; an unset or empty variable means the dev default."""
    return os.environ.get("SANDBOX_SECRET") or DEFAULT_MASTER_SECRET


def channel_webhook_secret(channel_code: str, master: str | None = None) -> str:
    """Standard Webhooks secret (`whsec_<base64 key>`) for one channel, derived from the master secret.

    Deriving instead of storing lets the sandbox and the gateway agree on every channel's secret
    without sharing a table: both only need the same master secret.
    """
    key = (master if master is not None else master_secret()).encode()
    digest = hmac.new(key, channel_code.encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(digest).decode("ascii")


# The Stripe events our endpoint at localstripe is registered for (the gateway acts on these; the
# launcher and seed_sandbox register the same list).
STRIPE_WEBHOOK_EVENTS = [
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "refund.created",
    "refund.updated",
    "refund.failed",
    "charge.refund.updated",
]


def stripe_endpoint_secret(channel_code: str, master: str | None = None) -> str:
    """The Stripe webhook endpoint secret (`whsec_…`) of a channel pointed at localstripe.

    Derived like the sandbox's, so localstripe (which keeps its webhook endpoints in memory only and
    registers ours again at every start) and `seed_sandbox` agree without sharing a table.
    """
    key = (master if master is not None else master_secret()).encode()
    return "whsec_" + hmac.new(key, b"stripe:" + channel_code.encode(), hashlib.sha256).hexdigest()[:32]
