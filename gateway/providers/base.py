"""The one interface every payment provider sits behind: charge, fetch status, parse webhooks."""

import abc
import enum
from dataclasses import dataclass

from allocation.models import PaymentChannel


class ChargeOutcome(enum.Enum):
    ACCEPTED = "accepted"  # the provider took the charge; the result follows
    REJECTED = "rejected"  # definitively not charged: safe to fail over
    UNKNOWN = "unknown"  # maybe charged: never fail, never charge again under another key


@dataclass(frozen=True)
class ChargeResult:
    outcome: ChargeOutcome
    provider_reference: str = ""
    http_status: int | None = None
    error: str = ""
    # Providers that settle in the same call (Stripe confirms the PaymentIntent at once) also say
    # how it ended: "paid" or "failed" (with the provider's failure code); "" when it comes later.
    status: str = ""
    failure_code: str = ""


@dataclass(frozen=True)
class StatusResult:
    status: str  # "paid" | "failed" | "pending" | "not_found"
    failure_code: str = ""
    provider_reference: str = ""


@dataclass(frozen=True)
class WebhookEvent:
    webhook_id: str
    event_type: str
    status: str  # "paid" | "failed"
    order_id: str
    idempotency_key: str
    channel: str
    failure_code: str
    provider_reference: str
    payload: dict


class InvalidWebhook(Exception):
    """Bad signature, stale or future timestamp, or a channel that cannot be known: not authentic."""


class MalformedWebhook(InvalidWebhook):
    """A body that cannot be read (before verifying), or a verified one of the wrong shape."""


class IgnoredWebhook(Exception):
    """Authentic, but not about anything we act on (another event type, a charge not ours): 2xx."""


class ProviderError(Exception):
    """The provider could not be reached, or its answer could not be read: ask again later."""


@dataclass(frozen=True)
class ChargeRequest:
    order_id: str
    amount: int
    currency: str
    idempotency_key: str
    webhook_url: str
    payment_method: str = ""  # the payer's token, for providers that charge one (Stripe `pm_…`)


class ProviderAdapter(abc.ABC):
    name: str
    # The answer to a webhook whose signature does not verify (the sandbox: 401; Stripe: 400).
    invalid_signature_status: int = 401

    @abc.abstractmethod
    def charge(self, *, channel: PaymentChannel, request: ChargeRequest) -> ChargeResult: ...

    @abc.abstractmethod
    def fetch_status(
        self, *, channel: PaymentChannel, idempotency_key: str, provider_reference: str = ""
    ) -> StatusResult:
        """The charge's status, asked by our key or, where the provider needs it, by its own id."""

    @abc.abstractmethod
    def parse_webhook(self, *, body: bytes, headers: dict[str, str]) -> WebhookEvent: ...


_adapters: dict[str, ProviderAdapter] = {}


def register(adapter: ProviderAdapter) -> None:
    _adapters[adapter.name] = adapter


def get_adapter(name: str) -> ProviderAdapter | None:
    return _adapters.get(name)
