"""A Stripe order through the gateway's charge stage, Stripe played by a real HTTP peer answering
Stripe's recorded answers: the answer of the create-and-confirm call settles the order at once."""

import pytest

from allocation.models import PaymentChannel
from core import crypto
from gateway.models import ChargeAttempt
from gateway.services import order_charge, order_poll
from orders.models import Order, OrderStatus
from tests.factories import ChannelFactory
from tests.gateway.test_adapter_answers import Peer, answer
from tests.gateway.test_stripe_adapter import recorded
from tests.stub_provider import assigned_order, path

pytestmark = pytest.mark.django_db


@pytest.fixture
def stripe_peer(settings):
    settings.GATEWAY_CONNECT_TIMEOUT = settings.GATEWAY_READ_TIMEOUT = 1.0
    peers = []

    def start(status: int, name: str) -> Peer:
        peer = Peer(answer(status, recorded(name)))
        peers.append(peer)
        ChannelFactory(
            code="stripe-test",
            provider="stripe",
            currencies=["USD", "EUR"],
            api_base=peer.url,
            api_key_encrypted=crypto.encrypt("sk_test_recorded"),
        )
        return peer

    yield start
    for peer in peers:
        peer.close()


def _charged(status: int, name: str, stripe_peer) -> Order:
    stripe_peer(status, name)
    order = assigned_order("stripe-test")
    Order.objects.filter(pk=order.pk).update(payment_method="pm_card_visa")
    order_charge(order_id=order.pk)
    return Order.objects.get(pk=order.pk)


def test_a_succeeded_intent_is_paid_with_the_intent_as_provider_reference(stripe_peer):
    order = _charged(200, "payment_intent_succeeded", stripe_peer)
    assert (order.status, order.outcome) == (OrderStatus.PAID, "paid")
    assert order.provider_reference == "pi_3QxS2vLkdIwHu7ix0b7mYqLx"
    attempt = ChargeAttempt.objects.get(order=order)
    assert (attempt.status, attempt.provider_reference) == ("paid", "pi_3QxS2vLkdIwHu7ix0b7mYqLx")
    assert [step[1] for step in path(order)] == ["assigned", "processing", "paid"]


def test_a_card_decline_is_failed_with_the_decline_code_and_no_failover(stripe_peer):
    ChannelFactory(code="stripe-two", provider="stripe", currencies=["USD"], priority=2)
    order = _charged(402, "error_card_declined_insufficient_funds", stripe_peer)
    assert (order.status, order.failure_code) == (OrderStatus.FAILED, "insufficient_funds")
    assert order.provider_reference == "pi_3QxS5cLkdIwHu7ix1Fa1LeDd"
    assert {step[2] for step in path(order)} == {"stripe-test"}


@pytest.mark.parametrize(
    ("status", "name"),
    [
        (409, "error_idempotency_key_in_use"),
        (400, "error_idempotency_params_mismatch"),
        (500, "error_api_error"),
    ],
)
def test_an_answer_that_may_hide_a_charge_leaves_it_processing_never_failover(stripe_peer, status, name):
    ChannelFactory(code="stripe-two", provider="stripe", currencies=["USD"], priority=2)
    order = _charged(status, name, stripe_peer)
    assert (order.status, order.channel, order.outcome) == (OrderStatus.PROCESSING, "stripe-test", None)
    assert ChargeAttempt.objects.get(order=order).status == "unknown"


def _processing(reference: str = "") -> Order:
    order = assigned_order("stripe-test")
    Order.objects.filter(pk=order.pk).update(status=OrderStatus.PROCESSING, payment_method="pm_card_visa")
    ChargeAttempt.objects.create(
        order=order,
        channel="stripe-test",
        provider="stripe",
        idempotency_key=f"{order.pk}:stripe-test",
        status="unknown",
        provider_reference=reference,
    )
    return order


def test_a_poll_asks_by_the_intent_id_when_known(stripe_peer):
    peer = stripe_peer(200, "payment_intent_succeeded")
    order = _processing("pi_3QxS2vLkdIwHu7ix0b7mYqLx")
    # the recorded intent names the recorded order's attempt: make it this order's
    ChargeAttempt.objects.filter(order=order).update(
        idempotency_key="01a22a48-b737-786c-a84c-0b2d41ca6738:stripe-test"
    )
    order_poll(order_id=order.pk)
    assert peer.requests[0].startswith(b"GET /v1/payment_intents/pi_3QxS2vLkdIwHu7ix0b7mYqLx ")
    order = Order.objects.get(pk=order.pk)
    assert (order.status, order.provider_reference) == (OrderStatus.PAID, "pi_3QxS2vLkdIwHu7ix0b7mYqLx")


def test_a_poll_without_an_intent_id_resends_the_create_under_the_same_key(stripe_peer):
    # the create's answer was lost; Stripe answers the resent create with the first one's result
    peer = stripe_peer(200, "payment_intent_succeeded")
    order = _processing("")
    order_poll(order_id=order.pk)
    assert len(peer.requests) == 1
    assert peer.requests[0].startswith(b"POST /v1/payment_intents ")
    assert f"Idempotency-Key: {order.pk}:stripe-test".encode() in peer.requests[0]
    order = Order.objects.get(pk=order.pk)
    assert (order.status, order.provider_reference) == (OrderStatus.PAID, "pi_3QxS2vLkdIwHu7ix0b7mYqLx")
    assert ChargeAttempt.objects.get(order=order).provider_reference == "pi_3QxS2vLkdIwHu7ix0b7mYqLx"


@pytest.mark.parametrize(
    ("status", "name", "outcome", "retry"),
    [
        (200, "refund_succeeded", "accepted", False),
        (401, "error_invalid_api_key", "rejected", False),
        (409, "error_idempotency_key_in_use", "unknown", False),
        (500, "error_api_error", "unknown", False),
    ],
)
def test_a_refund_goes_to_the_charges_payment_intent_and_its_answer_is_sorted(
    stripe_peer, status, name, outcome, retry
):
    from gateway.providers.base import RefundRequest
    from gateway.providers.stripe import StripeAdapter

    peer = stripe_peer(status, name)
    order = _processing("pi_3QxS2vLkdIwHu7ix0b7mYqLx")
    request = RefundRequest(
        refund_id="r1",
        order_id=str(order.pk),
        amount=400,
        currency="USD",
        idempotency_key="rf-key",
        charge_idempotency_key=f"{order.pk}:stripe-test",
        webhook_url="",
    )
    channel = PaymentChannel.objects.get(code="stripe-test")
    result = StripeAdapter().refund(channel=channel, request=request)
    head, _, body = peer.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/refunds ") and b"Idempotency-Key: rf-key" in head
    assert b"payment_intent=pi_3QxS2vLkdIwHu7ix0b7mYqLx" in body and b"amount=400" in body
    assert (result.outcome.value, result.retry) == (outcome, retry)
    if outcome == "accepted":
        assert result.provider_reference == "re_3QxS2vLkdIwHu7ix0Rf1nD01"
