"""A provider adapter stub that honours idempotency keys like a real one (unit tests may stub the
provider), and the helpers the gateway's tests build orders with."""

import threading

from gateway.providers import base
from gateway.providers.base import ChargeOutcome, ChargeResult, StatusResult
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

    def charge(self, *, channel, request):
        with self.lock:
            self.calls.append(request.idempotency_key)
            outcome = self.answers.get(channel.code, ChargeOutcome.ACCEPTED)
            if outcome != ChargeOutcome.REJECTED:
                self.charges.add(request.idempotency_key)
        return ChargeResult(outcome, provider_reference=f"ch_{request.idempotency_key}", http_status=201)

    def fetch_status(self, *, channel, idempotency_key, provider_reference=""):
        if idempotency_key not in self.charges:
            return StatusResult("not_found")
        return StatusResult(self.status)

    def parse_webhook(self, *, body, headers):
        raise base.InvalidWebhook("stub has no webhooks")


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
