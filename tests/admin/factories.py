"""Factories for rows the console reads but the tests here do not drive through the pipeline."""

import factory
from factory.django import DjangoModelFactory

from gateway.models import ChargeAttempt
from tests.factories import OrderFactory


class ChargeAttemptFactory(DjangoModelFactory):
    class Meta:
        model = ChargeAttempt

    order = factory.SubFactory(OrderFactory)
    channel = "sandbox-a"
    provider = "sandbox"
    idempotency_key = factory.LazyAttribute(lambda a: f"{a.order.pk}:{a.channel}")
    status = ChargeAttempt.Status.PAID
