"""Factories for the domain; merchants go through the service so keys and secrets are real."""

import itertools

import factory
from factory.django import DjangoModelFactory

from allocation.models import PaymentChannel
from orders.models import Order, OrderStatus
from orders.services import MerchantCredentials, merchant_create

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
