"""Factories for the domain; merchants go through the service so keys and secrets are real."""

import itertools
from datetime import timedelta

import factory
from django.utils import timezone
from factory.django import DjangoModelFactory

from allocation.models import PaymentChannel
from orders.models import Order, OrderStatus, Refund
from orders.services import MerchantCredentials, merchant_create, refund_create
from orders.transitions import order_transition, refund_transition

_counter = itertools.count(1)


def make_merchant(
    name: str | None = None, callback_url: str = "http://127.0.0.1:9/hook"
) -> MerchantCredentials:
    return merchant_create(name=name or f"merchant-{next(_counter)}", callback_url=callback_url)


class OrderFactory(DjangoModelFactory):
    class Meta:
        model = Order

    merchant = factory.LazyFunction(lambda: make_merchant().merchant)
    reference = factory.Sequence(lambda n: f"ref-{n}")
    amount = 1050
    currency = "USD"
    callback_url = "http://127.0.0.1:9/hook"
    status = OrderStatus.PENDING


def make_paid(order_id) -> None:
    """Move an order to paid the way the gateway does: processing on a channel, then the provider's word."""
    Order.objects.filter(pk=order_id).update(status=OrderStatus.PROCESSING, channel="sandbox-a")
    order_transition(
        order_id=order_id, to=OrderStatus.PAID, seen_status=OrderStatus.PROCESSING, reason="test"
    )


def make_paid_order(callback_url: str) -> tuple[MerchantCredentials, Order]:
    """A paid order, its callback due, of a new merchant, both with `callback_url`."""
    creds = make_merchant(callback_url=callback_url)
    order = OrderFactory(merchant=creds.merchant, callback_url=callback_url)
    make_paid(order.pk)
    return creds, Order.objects.get(pk=order.pk)


class ChannelFactory(DjangoModelFactory):
    class Meta:
        model = PaymentChannel
        django_get_or_create = ("code",)

    code = factory.Sequence(lambda n: f"channel-{n}")
    provider = "sandbox"
    currencies = factory.LazyFunction(lambda: ["USD", "EUR", "GBP"])
    priority = 1
    weight = 1
    enabled = True


def overdue_refund(status: str = "pending") -> Refund:
    """A refund of 100 on a paid order of 1000, moved to `status`, its sweep due a second ago."""
    order = OrderFactory(amount=1000)
    make_paid(order.pk)
    result = refund_create(
        merchant=Order.objects.get(pk=order.pk).merchant,
        order_id=str(order.pk),
        idempotency_key="k",
        fingerprint="f",
        amount=100,
    )
    refund_id = result.body["id"]
    if status != "pending":
        refund_transition(refund_id=refund_id, to="processing", seen_status="pending", reason="test")
    if status in ("succeeded", "failed"):
        refund_transition(refund_id=refund_id, to=status, seen_status="processing", reason="test")
    Refund.objects.filter(pk=refund_id).update(next_check_at=timezone.now() - timedelta(seconds=1))
    return Refund.objects.get(pk=refund_id)
