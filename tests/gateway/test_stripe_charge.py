"""A Stripe order through the gateway's charge stage, Stripe played by a real HTTP peer answering
Stripe's recorded answers: the answer of the create-and-confirm call settles the order at once."""

import json

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


def _refund_of(order: Order, amount: int = 400):
    from orders.models import Refund
    from orders.services import refund_create, refund_fingerprint

    result = refund_create(
        merchant=order.merchant,
        order_id=str(order.pk),
        idempotency_key=f"rk-{amount}",
        fingerprint=refund_fingerprint(order_id=order.pk, data={"amount": amount}),
        amount=amount,
    )
    return Refund.objects.get(pk=result.body["id"])


@pytest.mark.parametrize(
    ("status", "failure_reason", "settled", "failure_code"),
    [
        ("succeeded", None, "succeeded", None),
        ("failed", "expired_or_canceled_card", "failed", "expired_or_canceled_card"),
        ("pending", None, "processing", None),
    ],
)
def test_a_refund_answer_that_says_how_it_ended_settles_it_without_a_poll(
    stripe_peer, status, failure_reason, settled, failure_code
):
    import json

    from gateway.models import RefundAttempt
    from gateway.services import refund_confirm, refund_send
    from orders.models import IgnoredSignal, Refund

    # given: a Stripe order paid through the create-and-confirm call
    peer = stripe_peer(200, "payment_intent_succeeded")
    order = assigned_order("stripe-test")
    Order.objects.filter(pk=order.pk).update(payment_method="pm_card_visa")
    order_charge(order_id=order.pk)
    # and Stripe's answer to the refund says how the refund ended
    body = json.loads(recorded("refund_succeeded"))
    body.update(status=status, failure_reason=failure_reason)
    peer.script = answer(200, json.dumps(body))
    refund = _refund_of(order)
    # when: the refund stage sends it
    refund_send(refund_id=refund.pk)
    # then: one request, and the refund is settled by its answer, no poll asked
    assert [request.split(b" ", 2)[:2] for request in peer.requests[1:]] == [[b"POST", b"/v1/refunds"]]
    refund = Refund.objects.get(pk=refund.pk)
    assert (refund.status, refund.failure_code) == (settled, failure_code)
    attempt = RefundAttempt.objects.get(refund=refund)
    assert attempt.provider_reference == "re_3QxS2vLkdIwHu7ix0Rf1nD01"
    steps = [step[1] for step in refund.transitions.order_by("id").values_list("from_status", "to_status")]
    assert steps == ["pending", "processing"] + ([settled] if settled != "processing" else [])
    if settled == "processing":
        return
    assert Order.objects.get(pk=order.pk).amount_refunded == (400 if settled == "succeeded" else 0)
    # and a later word (the webhook, a poll) is a duplicate that changes nothing
    refund_confirm(
        idempotency_key=attempt.idempotency_key,
        status=status,
        failure_code=failure_reason or "",
        source="webhook",
        channel="stripe-test",
        provider="stripe",
    )
    assert Refund.objects.get(pk=refund.pk).status == settled
    assert refund.transitions.count() == len(steps)
    assert IgnoredSignal.objects.filter(refund=refund).count() == 1
    assert Order.objects.get(pk=order.pk).amount_refunded == (400 if settled == "succeeded" else 0)


def routes(table: dict[bytes, tuple[int, str]]):
    """A Stripe peer answering each request by the first of `table`'s request-line prefixes it has."""

    def script(peer: Peer, conn) -> None:
        request = peer.read_request(conn)
        status, body = next(reply for prefix, reply in table.items() if request.startswith(prefix))
        payload = body.encode()
        head = f"HTTP/1.1 {status} Whatever\r\nConnection: close\r\nContent-Type: application/json\r\n"
        conn.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)

    return script


def _refund_list(*refunds: dict) -> str:
    return json.dumps({"object": "list", "data": list(refunds), "has_more": False, "url": "/v1/refunds"})


def _lost_refund(stripe_peer):
    """A paid Stripe order and its refund, processing: the refund's answer was lost (a 500: maybe
    refunded), so no re_ id is known."""
    from gateway.services import refund_send
    from orders.models import Refund

    peer = stripe_peer(200, "payment_intent_succeeded")
    order = assigned_order("stripe-test")
    Order.objects.filter(pk=order.pk).update(payment_method="pm_card_visa")
    order_charge(order_id=order.pk)
    refund = _refund_of(order)
    peer.script = answer(500, recorded("error_api_error"))
    refund_send(refund_id=refund.pk)
    assert Refund.objects.get(pk=refund.pk).status == "processing"
    return peer, refund


def _requests(peer) -> list[list[bytes]]:
    return [request.split(b" ", 2)[:2] for request in peer.requests[1:]]


def test_a_refund_whose_answer_was_lost_is_found_among_the_intents_refunds_and_not_made_again(stripe_peer):
    from gateway.models import RefundAttempt
    from gateway.services import refund_poll
    from orders.models import Refund

    peer, refund = _lost_refund(stripe_peer)
    ours = _ours(refund)
    another = {**ours, "id": "re_another", "status": "failed", "metadata": {"attempt": "refund:another"}}
    # when: the poll, with no id to ask by, lists the PaymentIntent's refunds (before: it sent the
    # create again, which after Stripe's 24 h key window makes a second refund)
    peer.script = routes({b"GET /v1/refunds?": (200, _refund_list(another, ours))})
    refund_poll(refund_id=refund.pk)
    # then: ours is the one whose metadata names our key; settled by it, its id kept, nothing resent
    assert _requests(peer) == [
        [b"POST", b"/v1/refunds"],
        [b"GET", b"/v1/refunds?payment_intent=pi_3QxS2vLkdIwHu7ix0b7mYqLx&limit=100"],
    ]
    assert Refund.objects.get(pk=refund.pk).status == "succeeded"
    assert RefundAttempt.objects.get(refund=refund).provider_reference == "re_3QxS2vLkdIwHu7ix0Rf1nD01"


def test_a_refund_whose_answer_was_lost_and_that_stripe_has_not_is_sent_again_under_its_key(stripe_peer):
    from gateway.models import RefundAttempt
    from gateway.services import refund_poll
    from orders.models import Refund

    peer, refund = _lost_refund(stripe_peer)
    # when: the PaymentIntent has no refund of ours, the poll resends the create under the same key
    # (Stripe answers it with the first request's Refund if that one is still being made)
    other = {**json.loads(recorded("refund_succeeded")), "id": "re_x", "metadata": {"attempt": "refund:x"}}
    peer.script = routes(
        {
            b"GET /v1/refunds?": (200, _refund_list(other)),
            b"POST /v1/refunds ": (200, recorded("refund_succeeded")),
        }
    )
    refund_poll(refund_id=refund.pk)
    # then: settled by that answer, and the id kept for any later status query
    assert [step[0] for step in _requests(peer)] == [b"POST", b"GET", b"POST"]
    assert f"Idempotency-Key: refund:{refund.pk}".encode() in peer.requests[-1]
    assert Refund.objects.get(pk=refund.pk).status == "succeeded"
    assert RefundAttempt.objects.get(refund=refund).provider_reference == "re_3QxS2vLkdIwHu7ix0Rf1nD01"


def test_a_refund_list_stripe_cannot_answer_sends_nothing_and_leaves_it_processing(stripe_peer):
    from gateway.services import refund_poll
    from orders.models import Refund

    peer, refund = _lost_refund(stripe_peer)
    peer.script = routes({b"GET /v1/refunds?": (500, recorded("error_api_error"))})
    refund_poll(refund_id=refund.pk)
    assert [step[0] for step in _requests(peer)] == [b"POST", b"GET"]
    assert Refund.objects.get(pk=refund.pk).status == "processing"


def test_a_poll_past_stripes_key_window_never_sends_the_create_again(stripe_peer, caplog):
    from datetime import timedelta

    from django.utils import timezone

    # given: an order whose create's answer was lost a day ago (no PaymentIntent id known)
    peer = stripe_peer(200, "payment_intent_succeeded")
    order = _processing("")
    ChargeAttempt.objects.filter(order=order).update(created_at=timezone.now() - timedelta(hours=24))
    # when: polled (the sweep, or an operator's re-query)
    with caplog.at_level("ERROR", logger="gateway.services"):
        order_poll(order_id=order.pk)
    # then: nothing is sent (Stripe may have dropped the key: a resend could charge twice, or
    # decline where the first succeeded), the order stays processing, and an ERROR says why
    assert peer.requests == []
    assert Order.objects.get(pk=order.pk).status == OrderStatus.PROCESSING
    assert [r.msg for r in caplog.records if r.levelname == "ERROR"] == ["poll.resend_past_key_window"]


def _ours(refund, **changes) -> dict:
    return {
        **json.loads(recorded("refund_succeeded")),
        "metadata": {"attempt": f"refund:{refund.pk}"},
        **changes,
    }


@pytest.mark.parametrize(
    "listed",
    [
        '{"object": "list", "data": "nope", "has_more": false}',
        '{"object": "list", "has_more": false}',
        '{"object": "list", "data": [], "has_more": true}',
        '{"object": "list", "data": [7], "has_more": false}',
        '{"object": "refund", "id": "re_1"}',
    ],
    ids=["data not a list", "no data", "more pages", "an entry not a refund", "not a list"],
)
def test_a_refund_list_that_is_not_a_whole_list_sends_nothing(stripe_peer, listed):
    # A list answer that cannot say "none of ours is there" is no answer: before, a malformed one
    # read as empty, and the create was sent again (a second refund at localstripe; a refund failed
    # as refused while Stripe had made it)
    from gateway.services import refund_poll
    from orders.models import Refund

    peer, refund = _lost_refund(stripe_peer)
    peer.script = routes({b"GET /v1/refunds?": (200, listed)})
    refund_poll(refund_id=refund.pk)
    assert [step[0] for step in _requests(peer)] == [b"POST", b"GET"]
    assert Refund.objects.get(pk=refund.pk).status == "processing"


@pytest.mark.parametrize(
    "changes",
    [{"amount": 999999, "id": "re_other"}, {"currency": "eur"}],
    ids=["another amount", "another currency"],
)
def test_a_listed_refund_under_our_key_for_another_amount_settles_nothing(stripe_peer, caplog, changes):
    from gateway.models import RefundAttempt
    from gateway.services import refund_poll
    from orders.models import Refund

    peer, refund = _lost_refund(stripe_peer)
    peer.script = routes({b"GET /v1/refunds?": (200, _refund_list(_ours(refund, **changes)))})
    with caplog.at_level("ERROR"):
        refund_poll(refund_id=refund.pk)
    # then it is checked as a webhook's word is: not ours, nothing settled, nothing resent, loud
    assert [step[0] for step in _requests(peer)] == [b"POST", b"GET"]
    assert Refund.objects.get(pk=refund.pk).status == "processing"
    assert RefundAttempt.objects.get(refund=refund).provider_reference == ""
    assert "refund_poll.listed_refund_not_ours" in [r.msg for r in caplog.records]


def _closed_port() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"  # closed again: connections are refused


def _reach_stripe_at(url: str) -> None:
    from allocation.selectors import channel_cache_clear

    PaymentChannel.objects.filter(code="stripe-test").update(api_base=url)
    channel_cache_clear()  # as its few seconds running out would


def test_an_unasked_charge_whose_resend_is_not_sent_stays_processing_until_stripe_answers_it(stripe_peer):
    # given: the create's answer was lost, so Stripe cannot be asked (no intent id); Stripe made
    # the charge (the peer answers the resent create with the first request's succeeded intent)
    peer = stripe_peer(200, "payment_intent_succeeded")
    order = _processing("")
    # when: the sweep's poll resends it while Stripe cannot be reached
    _reach_stripe_at(_closed_port())
    polled = order_poll(order_id=order.pk)
    # then: nothing says the first request did not charge: not failed, still processing
    order = Order.objects.get(pk=order.pk)
    assert (order.status, order.outcome, order.failure_code) == (OrderStatus.PROCESSING, None, None)
    assert ChargeAttempt.objects.get(order=order).status == "unknown"
    assert polled.answered is False and "sends it again" in polled.said
    # when: the next poll reaches Stripe, which answers the key with the first request's result
    _reach_stripe_at(peer.url)
    order_poll(order_id=order.pk)
    # then: paid, by the intent Stripe made
    order = Order.objects.get(pk=order.pk)
    assert (order.status, order.provider_reference) == (OrderStatus.PAID, "pi_3QxS2vLkdIwHu7ix0b7mYqLx")


@pytest.mark.parametrize(
    ("status", "name", "settled", "failure_code"),
    [
        (401, "error_invalid_api_key", OrderStatus.PROCESSING, None),  # says nothing about the first
        (400, "error_no_such_payment_method", OrderStatus.FAILED, "channel_unavailable"),
    ],
    ids=["credentials-refused", "request-refused"],
)
def test_an_unasked_charge_fails_on_a_resend_only_when_stripe_refused_the_request_for_our_key(
    stripe_peer, status, name, settled, failure_code
):
    # given: the create's answer was lost; the resend under the same key is answered with a refusal
    stripe_peer(status, name)
    order = _processing("")
    # when
    order_poll(order_id=order.pk)
    # then: a refused request under our key means none was made (Stripe would have answered it with
    # the first one's result); refused credentials say nothing of the first request
    order = Order.objects.get(pk=order.pk)
    assert (order.status, order.failure_code) == (settled, failure_code)
