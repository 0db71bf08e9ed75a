"""Reads of the gateway service for the operators' console."""

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Count

from gateway.models import ChargeAttempt, RefundAttempt

A = ChargeAttempt.Status
# Attempts whose outcome is known; accepted and sending ones are still waiting for it.
SETTLED = (A.PAID, A.FAILED, A.REJECTED, A.UNKNOWN)


@dataclass(frozen=True)
class ChannelResults:
    paid: int = 0
    failed: int = 0
    rejected: int = 0
    unknown: int = 0
    waiting: int = 0  # sending or accepted

    @property
    def settled(self) -> int:
        return self.paid + self.failed + self.rejected + self.unknown

    @property
    def success_rate(self) -> float | None:
        """paid / (paid + failed + rejected + unknown); None when nothing settled."""
        return self.paid / self.settled if self.settled else None


def charge_results_by_channel(*, since: datetime) -> dict[str, ChannelResults]:
    """Charge attempts made since `since`, by channel and result: one query (attempt_created index)."""
    counts: dict[str, dict[str, int]] = {}
    rows = (
        ChargeAttempt.objects.filter(created_at__gte=since)
        .values_list("channel", "status")
        .annotate(n=Count("id"))
        .order_by()
    )
    for channel, status, n in rows:
        per = counts.setdefault(channel, {})
        key = status if status in SETTLED else "waiting"
        per[key] = per.get(key, 0) + n
    return {channel: ChannelResults(**per) for channel, per in counts.items()}


def order_ids_by_provider_reference(*, reference: str, limit: int = 100) -> list:
    """Orders whose charge the provider knows as `reference` (attempt_provider_ref index)."""
    return list(
        ChargeAttempt.objects.filter(provider_reference=reference).values_list("order_id", flat=True)[:limit]
    )


def refund_ids_by_provider_reference(*, reference: str, limit: int = 100) -> list:
    """Refunds the provider knows as `reference` (refund_attempt_provider_ref index)."""
    return list(
        RefundAttempt.objects.filter(provider_reference=reference).values_list("refund_id", flat=True)[:limit]
    )


def provider_reference_of_charge(*, idempotency_key: str) -> str:
    """The provider's id of the charge made under our key ("" when not known yet)."""
    reference = ChargeAttempt.objects.filter(idempotency_key=idempotency_key).values_list(
        "provider_reference", flat=True
    )
    return next(iter(reference), "") or ""


def provider_reference_of_refund(*, idempotency_key: str) -> str:
    """The provider's id of the refund sent under our key ("" when not known yet)."""
    reference = RefundAttempt.objects.filter(idempotency_key=idempotency_key).values_list(
        "provider_reference", flat=True
    )
    return next(iter(reference), "") or ""


@dataclass(frozen=True)
class RefundLookupFacts:
    charge_reference: str  # the provider's id of the charge refunded ("" if unknown)
    amount: int
    currency: str


def refund_lookup_facts(*, idempotency_key: str) -> RefundLookupFacts | None:
    """What finds the refund sent under our key among its charge's refunds at the provider."""
    row = (
        RefundAttempt.objects.filter(idempotency_key=idempotency_key)
        .values_list("charge_idempotency_key", "amount", "currency")
        .first()
    )
    if row is None:
        return None
    charge_key, amount, currency = row
    return RefundLookupFacts(provider_reference_of_charge(idempotency_key=charge_key), amount, currency)


def channel_of_refund(*, idempotency_key: str) -> str:
    """The channel that was sent the refund under our key ("" when no refund has that key)."""
    channel = RefundAttempt.objects.filter(idempotency_key=idempotency_key).values_list("channel", flat=True)
    return next(iter(channel), "") or ""
