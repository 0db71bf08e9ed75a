"""A provider adapter stub that honours idempotency keys like a real one (unit tests may stub the
provider), and the helpers the gateway's tests build orders with."""

import threading

from gateway import services
from gateway.providers import base
from gateway.providers.base import ChargeOutcome, ChargeResult, RefundResult, StatusResult
from orders.models import Order, OrderTransition
from orders.transitions import order_transition
from tests.factories import OrderFactory


class StubProvider(base.ProviderAdapter):
    """A provider that honours idempotency keys like a real one and answers as told per channel."""

    name = "stub"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[str] = []
        self.charges: set[str] = set()
        self.answers: dict[str, ChargeOutcome] = {}
        self.status = "pending"
        # Refunds: (channel, key) of every request; the keys refunded; the answers to give, in
        # order (then ACCEPTED); what a refund status query says.
        self.refund_calls: list[tuple[str, str]] = []
        self.refunds: set[str] = set()
        self.refund_answers: list[RefundResult] = []
        self.refund_status = "pending"
        self.refund_reference = ""  # the provider's id for the refund in its status answers

    def charge(self, *, channel, request):
        with self.lock:
            self.calls.append(request.idempotency_key)
            # an outcome, or a whole ChargeResult to answer as it is
            answer = self.answers.get(channel.code, ChargeOutcome.ACCEPTED)
            outcome = answer.outcome if isinstance(answer, ChargeResult) else answer
            if outcome != ChargeOutcome.REJECTED:
                self.charges.add(request.idempotency_key)
        if isinstance(answer, ChargeResult):
            return answer
        return ChargeResult(outcome, provider_reference=f"ch_{request.idempotency_key}", http_status=201)

    def fetch_status(self, *, channel, idempotency_key, provider_reference=""):
        if idempotency_key not in self.charges:
            return StatusResult("not_found")
        return StatusResult(self.status)

    def parse_webhook(self, *, body, headers):
        raise base.InvalidWebhook("stub has no webhooks")

    def refund(self, *, channel, request):
        with self.lock:
            self.refund_calls.append((channel.code, request.idempotency_key))
            answer = self.refund_answers.pop(0) if self.refund_answers else None
            answer = answer or RefundResult(
                ChargeOutcome.ACCEPTED, provider_reference="re_1", http_status=201
            )
            if answer.outcome != ChargeOutcome.REJECTED:
                self.refunds.add(request.idempotency_key)
        return answer

    def fetch_refund_status(self, *, channel, idempotency_key):
        if idempotency_key not in self.refunds:
            return StatusResult("not_found")
        return StatusResult(self.refund_status, provider_reference=self.refund_reference)


def assigned_order(channel_code: str = "stub-1") -> Order:
    order = OrderFactory()
    order_transition(
        order_id=order.pk, to="assigned", seen_status="pending", channel=channel_code, reason="test"
    )
    return Order.objects.get(pk=order.pk)


def path(order: Order) -> list[tuple]:
    return list(
        OrderTransition.objects.filter(order=order)
        .order_by("id")
        .values_list("from_status", "to_status", "channel")
    )


def stored_webhook(
    order: Order,
    key: str,
    status: str,
    n: int,
    *,
    failure_code: str = "",
    kind: str = "charge",
    provider_reference: str = "",
) -> services.Receipt:
    """A verified stub-1 webhook about `key` saying `status`, stored as the web stores one on arrival."""
    event = base.WebhookEvent(
        webhook_id=f"msg_{key}_{n}",
        event_type=f"{kind}.{status}",
        status=status,
        order_id=str(order.pk),
        idempotency_key=key,
        channel="stub-1",
        failure_code=failure_code,
        provider_reference=provider_reference,
        payload={"n": n},
        kind=kind,
    )
    receipt = services.webhook_receive(provider="stub", event=event)
    assert receipt in (services.Receipt.NEW, services.Receipt.HELD)
    return receipt
