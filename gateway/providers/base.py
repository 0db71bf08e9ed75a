"""The one interface every payment provider sits behind: charge, refund, fetch status, parse webhooks."""

import abc
import enum
from dataclasses import dataclass
from datetime import timedelta

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
    # A REJECTED charge refused for what the request carries (the payer's payment method, the
    # order's amount), not for the channel's health: the circuit breaker does not count it, so
    # one merchant's bad tokens cannot close a channel to every merchant (SPEC 4, 9).
    request_refused: bool = False


@dataclass(frozen=True)
class StatusResult:
    status: str  # "paid" | "failed" | "pending" | "not_found"
    failure_code: str = ""
    provider_reference: str = ""
    # False: the provider was not asked, for want of an id to ask it by (Stripe without the create's
    # answer). "not_found" then only means "send the create again under its key", which is safe only
    # while the provider still answers that key with the first request's result (`key_window`).
    looked: bool = True


@dataclass(frozen=True)
class WebhookEvent:
    webhook_id: str
    event_type: str
    status: str  # charges: "paid" | "failed"; refunds: "succeeded" | "failed"
    order_id: str
    idempotency_key: str  # of the charge, or of the refund (kind)
    channel: str
    failure_code: str
    provider_reference: str
    payload: dict
    kind: str = "charge"  # "charge" | "refund"
    # What the provider says the charge or refund is for, when its event says it (minor units, and
    # the ISO code in upper case): a word about another amount is not about our charge or refund.
    amount: int | None = None
    currency: str = ""


@dataclass(frozen=True)
class RefundRequest:
    """A refund of (part of) a charge, built only from facts stored before the first send."""

    refund_id: str
    order_id: str
    amount: int
    currency: str
    idempotency_key: str
    charge_idempotency_key: str
    webhook_url: str


@dataclass(frozen=True)
class RefundResult:
    outcome: ChargeOutcome  # ACCEPTED, REJECTED (nothing refunded) or UNKNOWN (maybe refunded)
    provider_reference: str = ""
    http_status: int | None = None
    error: str = ""
    # REJECTED only: the provider was unavailable and asks to try again later (same channel, same
    # key); otherwise it refused this refund for good.
    retry: bool = False
    # ACCEPTED only, for providers whose answer already says how the refund ended (Stripe's Refund
    # object): "succeeded" or "failed" (with the provider's failure reason) settles it at once;
    # "" when it comes later, by webhook or poll.
    status: str = ""
    failure_code: str = ""


class InvalidWebhook(Exception):
    """Bad signature, stale or future timestamp, or a channel that cannot be known: not authentic."""


class MalformedWebhook(InvalidWebhook):
    """A body that cannot be read (before verifying), or a verified one of the wrong shape."""


class IgnoredWebhook(Exception):
    """Authentic, but not about anything we act on (another event type, a charge not ours): 2xx."""


def money_named(obj: dict) -> tuple[int | None, str]:
    """(amount, currency) of a provider's charge or refund object, or (None, "") where it names
    none; `MalformedWebhook` for an amount that is not a whole number or a currency that is not
    three letters."""
    amount, currency = obj.get("amount"), obj.get("currency")
    if amount is not None and (type(amount) is not int or not 0 <= amount <= 10**15):
        raise MalformedWebhook("amount is not a whole number of minor units")
    if currency is not None and not (
        isinstance(currency, str) and len(currency) == 3 and currency.isascii() and currency.isalpha()
    ):
        raise MalformedWebhook("currency is not a three-letter code")
    return amount, (currency or "").upper()


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
    # How long after a request the provider answers the same request under the same key with the
    # first one's result; None: for as long as it keeps the charge or refund (the sandbox).
    key_window: timedelta | None = None

    @abc.abstractmethod
    def charge(self, *, channel: PaymentChannel, request: ChargeRequest) -> ChargeResult: ...

    @abc.abstractmethod
    def fetch_status(
        self, *, channel: PaymentChannel, idempotency_key: str, provider_reference: str = ""
    ) -> StatusResult:
        """The charge's status, asked by our key or, where the provider needs it, by its own id."""

    @abc.abstractmethod
    def parse_webhook(self, *, body: bytes, headers: dict[str, str]) -> WebhookEvent: ...

    def refund(self, *, channel: PaymentChannel, request: RefundRequest) -> RefundResult:
        raise NotImplementedError(f"{self.name} does not refund")

    def fetch_refund_status(self, *, channel: PaymentChannel, idempotency_key: str) -> StatusResult:
        """status: "succeeded" | "failed" | "pending" | "not_found"; ProviderError if unreadable."""
        raise NotImplementedError(f"{self.name} does not refund")


_adapters: dict[str, ProviderAdapter] = {}


def register(adapter: ProviderAdapter) -> None:
    _adapters[adapter.name] = adapter


def get_adapter(name: str) -> ProviderAdapter | None:
    return _adapters.get(name)


def provider_names() -> list[str]:
    """The providers a channel can name: those with an adapter."""
    return sorted(_adapters)
