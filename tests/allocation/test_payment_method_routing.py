"""Payment-method routing (SPEC 11): a `pm_` order only to Stripe channels, an order without a token
only to providers that need none, whatever the priorities say."""

import pytest

from allocation.services import NO_CHANNEL, order_allocate, order_reallocate
from orders.models import Order, OrderStatus
from tests.factories import ChannelFactory, OrderFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def both():
    # The Stripe channel is first by priority for the currencies both take.
    ChannelFactory(code="stripe-test", provider="stripe", currencies=["USD", "EUR"], priority=1)
    ChannelFactory(code="sandbox-b", provider="sandbox", currencies=["USD", "EUR", "GBP"], priority=2)


def _allocate(**fields) -> Order:
    order = OrderFactory(**fields)
    order_allocate(order_id=order.pk)
    return Order.objects.get(pk=order.pk)


def test_a_pm_order_goes_to_a_stripe_channel(both):
    # a sandbox channel of the same priority that weighs a thousand times more
    ChannelFactory(code="sandbox-a", provider="sandbox", currencies=["USD"], priority=1, weight=1000)
    order = _allocate(payment_method="pm_card_visa")
    assert (order.status, order.channel) == (OrderStatus.ASSIGNED, "stripe-test")


def test_an_order_without_a_token_never_goes_to_stripe_even_when_stripe_is_first(both):
    orders = [_allocate() for _ in range(5)]
    assert {(o.status, o.channel) for o in orders} == {(OrderStatus.ASSIGNED, "sandbox-b")}


def test_a_pm_order_in_a_currency_no_stripe_channel_takes_fails_no_channel_available(both):
    # sandbox-b takes GBP, but it cannot charge a payment method
    order = _allocate(payment_method="pm_card_visa", currency="GBP")
    assert (order.status, order.failure_code) == (OrderStatus.FAILED, NO_CHANNEL)


def test_failover_of_a_pm_order_stays_on_stripe_channels(both):
    ChannelFactory(code="stripe-two", provider="stripe", currencies=["USD"], priority=3)
    order = _allocate(payment_method="pm_card_visa")
    assert order.channel == "stripe-test"
    # when: stripe-test refused the charge; sandbox-b (priority 2) is skipped
    result = order_reallocate(order=order, failed_channel="stripe-test", refused_by=("stripe-test",))
    assert (result.status, result.channel) == (OrderStatus.ASSIGNED, "stripe-two")
