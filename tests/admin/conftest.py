"""The operators' console: a logged-in operator, a fake provider adapter, orders in real states.

Only the provider adapter is stubbed (registered under its own provider name for a test channel);
orders move through the real services and transitions, on the real database.
"""

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from allocation.services import order_allocate
from gateway.models import ChargeAttempt
from gateway.providers import base
from gateway.providers.base import (
    ChargeOutcome,
    ChargeResult,
    InvalidWebhook,
    ProviderAdapter,
    RefundResult,
    StatusResult,
)
from gateway.services import order_charge, order_confirm
from orders.models import Order, OrderStatus
from tests.factories import ChannelFactory

FAKE_PROVIDER = "fake-console"


class FakeAdapter(ProviderAdapter):
    name = FAKE_PROVIDER

    def __init__(self) -> None:
        self.status = StatusResult("pending")
        self.unreachable: Exception | None = None  # raised by status queries when set
        self.status_queries: list[str] = []
        self.refund_status = StatusResult("pending")
        self.refund_answer: RefundResult | None = None  # None: accepted
        self.refund_status_queries: list[str] = []

    def charge(self, *, channel, request):
        return ChargeResult(
            ChargeOutcome.ACCEPTED, provider_reference=f"fake-{request.order_id}", http_status=201
        )

    def fetch_status(self, *, channel, idempotency_key, provider_reference=""):
        self.status_queries.append(idempotency_key)
        if self.unreachable is not None:
            raise self.unreachable
        return self.status

    def refund(self, *, channel, request):
        if self.refund_answer is not None:
            return self.refund_answer
        return RefundResult(
            ChargeOutcome.ACCEPTED, provider_reference=f"fake-refund-{request.refund_id}", http_status=201
        )

    def fetch_refund_status(self, *, channel, idempotency_key):
        self.refund_status_queries.append(idempotency_key)
        if self.unreachable is not None:
            raise self.unreachable
        return self.refund_status

    def parse_webhook(self, *, body, headers):
        raise InvalidWebhook("the fake provider sends no webhooks")


@pytest.fixture
def fake_provider():
    adapter = FakeAdapter()
    base.register(adapter)
    yield adapter
    base._adapters.pop(FAKE_PROVIDER, None)


@pytest.fixture
def fake_channel(db, fake_provider):
    return ChannelFactory(
        code="fake-a", provider=FAKE_PROVIDER, currencies=["USD", "EUR", "JPY"], daily_cap=10**9
    )


@pytest.fixture
def operator(admin_client):
    """A logged-in superuser (pytest-django's admin_client)."""
    return admin_client


@pytest.fixture
def staff(db, django_user_model):
    """Log in a staff user (not a superuser) who holds exactly the permissions named, "app.codename".

    Each call is a new user on a new client, so one test can hold several operators.
    """

    def login(*perms: str) -> Client:
        login.count += 1
        user = django_user_model.objects.create_user(
            username=f"staff-{login.count}", password="x" * 12, is_staff=True
        )
        for perm in perms:
            app_label, codename = perm.split(".")
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )
        client = Client()
        client.force_login(user)
        client.user = user
        return client

    login.count = 0
    return login


@pytest.fixture
def make_order(api, fake_channel):
    """Create an order through the API and drive it with the real services to `status`."""

    def make(status: str = OrderStatus.PENDING, amount: int = 1050, currency: str = "USD", **extra) -> Order:
        reference = extra.pop("reference", None) or f"ref-{make.count}"
        make.count += 1
        response = api.post(
            "/api/v1/orders",
            {"amount": amount, "currency": currency, "reference": reference, **extra},
            format="json",
            HTTP_IDEMPOTENCY_KEY=reference,
        )
        assert response.status_code == 201, response.content
        order_id = response.json()["id"]
        if status != OrderStatus.PENDING:
            order_allocate(order_id=order_id)
        if status not in (OrderStatus.PENDING, OrderStatus.ASSIGNED):
            order_charge(order_id=order_id)
        if status in (OrderStatus.PAID, OrderStatus.FAILED):
            attempt = ChargeAttempt.objects.get(order_id=order_id)
            order_confirm(
                order_id=order_id,
                idempotency_key=attempt.idempotency_key,
                status=status,
                failure_code="card_declined" if status == OrderStatus.FAILED else "",
                source="test",
            )
        order = Order.objects.get(pk=order_id)
        assert order.status == status
        return order

    make.count = 1
    return make


@pytest.fixture
def make_refund(api, make_order):
    """Refund 100 of a new paid order through the API, and send it (the real service) when asked:
    a pending or a processing refund."""
    from gateway.services import refund_send
    from orders.models import Refund, RefundStatus

    def make(status: str = RefundStatus.PENDING) -> Refund:
        order = make_order(OrderStatus.PAID)
        response = api.post(
            f"/api/v1/orders/{order.pk}/refunds",
            {"amount": 100},
            format="json",
            HTTP_IDEMPOTENCY_KEY=f"refund-{order.pk}",
        )
        assert response.status_code == 201, response.content
        refund_id = response.json()["id"]
        if status == RefundStatus.PROCESSING:
            refund_send(refund_id=refund_id)
        refund = Refund.objects.get(pk=refund_id)
        assert refund.status == status
        return refund

    return make
