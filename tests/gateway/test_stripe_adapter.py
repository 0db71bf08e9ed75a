"""The Stripe adapter against a real HTTP peer that answers as Stripe does (SPEC 5, 9, 11).

The peer, on 127.0.0.1, answers with Stripe's own JSON (tests/gateway/stripe_recorded/), so the
official library raises its own error classes (CardError, IdempotencyError, APIError, …) from real
answers, and the adapter sorts them: only "nothing was sent or processed" may fail over; a decline
is a definitive failure; whatever may hide a charge is unknown.
"""

import json
import socket
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import stripe

from allocation.models import PaymentChannel
from core import crypto
from gateway.providers.base import ChargeOutcome, ChargeRequest, ProviderError
from gateway.providers.stripe import MAX_ANSWER_BYTES, StripeAdapter, sort_stripe_error
from tests.gateway.test_adapter_answers import (
    CUT_BY_THE_DEADLINE,
    HEAD_DRIPS,
    Peer,
    answer,
    drip,
    hang_up,
    raw,
    reset,
    silent,
)

ACCEPTED, REJECTED, UNKNOWN = ChargeOutcome.ACCEPTED, ChargeOutcome.REJECTED, ChargeOutcome.UNKNOWN
RECORDED = Path(__file__).parent / "stripe_recorded"
TIMEOUT = 0.5
ORDER_ID = "01a22a48-b737-786c-a84c-0b2d41ca6738"
KEY = f"{ORDER_ID}:stripe-test"


def recorded(name: str) -> str:
    return (RECORDED / f"{name}.json").read_text()


# name: (peer script, outcome, http status, settled status, failure code, provider reference)
ANSWERS = {
    "200 intent succeeded": (
        answer(200, recorded("payment_intent_succeeded")),
        ACCEPTED, 200, "paid", "", "pi_3QxS2vLkdIwHu7ix0b7mYqLx",
    ),
    "200 intent processing": (
        answer(200, recorded("payment_intent_processing")),
        ACCEPTED, 200, "", "", "pi_3QxS4bLkdIwHu7ix0Pr0cEss",
    ),
    "200 intent requires_action (3-D Secure, no payer)": (
        answer(200, recorded("payment_intent_requires_action")),
        ACCEPTED, 200, "failed", "authentication_required", "pi_3QxS3aLkdIwHu7ix1c0RQ7dE",
    ),
    "402 card declined, insufficient funds": (
        answer(402, recorded("error_card_declined_insufficient_funds")),
        ACCEPTED, 402, "failed", "insufficient_funds", "pi_3QxS5cLkdIwHu7ix1Fa1LeDd",
    ),
    "402 card declined, generic": (
        answer(402, recorded("error_card_declined_generic")),
        ACCEPTED, 402, "failed", "card_declined", "pi_3QxS6dLkdIwHu7ix0Gen3r1c",
    ),
    "402 card declined as localstripe says it": (
        answer(402, recorded("error_card_declined_localstripe")),
        ACCEPTED, 402, "failed", "card_declined", "",
    ),
    # refused before anything was processed: no intent exists, Stripe saved no idempotent result
    "401 expired API key": (answer(401, recorded("error_invalid_api_key")), REJECTED, 401, "", "", ""),
    "403 key without permission": (answer(403, recorded("error_permission")), REJECTED, 403, "", "", ""),
    "400 no such payment method": (
        answer(400, recorded("error_no_such_payment_method")), REJECTED, 400, "", "", "",
    ),
    # may hide a charge
    "400 with an intent made": (
        answer(400, recorded("error_intent_unexpected_state")), UNKNOWN, 400, "", "", "",
    ),
    "400 idempotency error (key used with other parameters)": (
        answer(400, recorded("error_idempotency_params_mismatch")), UNKNOWN, 400, "", "", "",
    ),
    "409 idempotency key in use": (
        answer(409, recorded("error_idempotency_key_in_use")), UNKNOWN, 409, "", "", "",
    ),
    "429 rate limited": (answer(429, recorded("error_rate_limit")), UNKNOWN, 429, "", "", ""),
    "500 api error": (answer(500, recorded("error_api_error")), UNKNOWN, 500, "", "", ""),
    "502 proxy page": (
        answer(502, "<html>Bad Gateway</html>", {"Content-Type": "text/html"}), UNKNOWN, 502, "", "", "",
    ),
    "200 not JSON": (answer(200, "<html>ok</html>"), UNKNOWN, 200, "", "", ""),
    "200 without an intent id": (answer(200, '{"object": "payment_intent"}'), UNKNOWN, 200, "", "", ""),
    "307 elsewhere": (answer(307, "", {"Location": "http://127.0.0.1:9/v1/payment_intents"}), UNKNOWN, 307, "", "", ""),
    "200 too large": (
        answer(200, '{"id":"pi_1","pad":"%s"}' % ("x" * MAX_ANSWER_BYTES)), UNKNOWN, None, "", "", "",
    ),
    "no answer (read timeout)": (silent, UNKNOWN, None, "", "", ""),
    "reset after the request": (reset, UNKNOWN, None, "", "", ""),
    "hung up after the request": (hang_up, UNKNOWN, None, "", "", ""),
    "body dripped past the deadline": (drip(200), UNKNOWN, None, "", "", ""),
    # "\xb2" is "²" in Latin-1, as HTTP headers are read: str.isdigit() says yes, int() says no;
    # a length that is not a number is not a bound, and the body is read to its end as without one
    "200 declaring a Content-Length of a superscript two": (
        raw(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Content-Length: \xb2\r\n\r\n" + recorded("payment_intent_processing").encode()),
        ACCEPTED, 200, "", "", "pi_3QxS4bLkdIwHu7ix0Pr0cEss",
    ),
}  # fmt: skip


@pytest.fixture
def adapter(settings):
    settings.GATEWAY_CONNECT_TIMEOUT = TIMEOUT
    settings.GATEWAY_READ_TIMEOUT = TIMEOUT
    return StripeAdapter()


@pytest.fixture
def peers():
    started: list[Peer] = []

    def start(script) -> Peer:
        peer = Peer(script)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.close()


def channel(api_base: str) -> PaymentChannel:
    return PaymentChannel(
        code="stripe-test",
        provider="stripe",
        api_base=api_base,
        api_key_encrypted=crypto.encrypt("sk_test_recorded"),
    )


def charge(adapter: StripeAdapter, api_base: str):
    request = ChargeRequest(
        order_id=ORDER_ID,
        amount=1050,
        currency="USD",
        idempotency_key=KEY,
        webhook_url="http://127.0.0.1:8000/api/v1/gateway/webhooks/stripe",
        payment_method="pm_card_visa",
    )
    return adapter.charge(channel=channel(api_base), request=request)


@pytest.mark.parametrize("name", list(HEAD_DRIPS))
def test_a_stripe_answer_dripping_its_head_is_cut_by_the_deadline_and_unknown(adapter, peers, name):
    peer = peers(HEAD_DRIPS[name])
    result = charge(adapter, peer.url)
    assert len(peer.requests) == 1
    assert (result.outcome, result.http_status) == (UNKNOWN, None), result
    assert CUT_BY_THE_DEADLINE in result.error, result


@pytest.mark.parametrize("name", list(ANSWERS))
def test_a_stripe_answer_is_sorted_by_what_it_says_about_the_money(adapter, peers, name):
    script, outcome, http_status, status, failure_code, reference = ANSWERS[name]
    peer = peers(script)
    # when
    result = charge(adapter, peer.url)
    # then: one create-and-confirm request, under our key, reached the peer
    assert len(peer.requests) == 1
    head, _, body = peer.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/payment_intents HTTP/1.1")
    assert f"Idempotency-Key: {KEY}".encode() in head
    assert b"Authorization: Bearer sk_test_recorded" in head
    form = parse_qs(body.decode())
    assert form["amount"] == ["1050"] and form["currency"] == ["usd"]
    assert form["payment_method"] == ["pm_card_visa"] and form["confirm"] == ["true"]
    assert form["capture_method"] == ["automatic"]
    assert form["metadata[order_id]"] == [ORDER_ID] and form["metadata[attempt]"] == [KEY]
    # and its answer is sorted as the table says
    assert (result.outcome, result.http_status) == (outcome, http_status), result
    assert (result.status, result.failure_code, result.provider_reference) == (
        status,
        failure_code,
        reference,
    )
    assert len(result.error) <= 500


def test_a_refused_connection_is_rejected_nothing_was_sent(adapter):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    try:
        result = charge(adapter, f"http://127.0.0.1:{closed.getsockname()[1]}")
    finally:
        closed.close()
    assert result.outcome == REJECTED
    assert result.error.startswith("not sent")


def _error(cls, status: int, name: str, **kwargs):
    body = recorded(name)
    data = json.loads(body)
    error = data["error"]
    if cls in (stripe.CardError, stripe.InvalidRequestError):
        return cls(error["message"], error.get("param"), error.get("code"), body, status, data, {})
    return cls(error["message"], body, status, data, {})


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (_error(stripe.CardError, 402, "error_card_declined_insufficient_funds"), ACCEPTED),
        (_error(stripe.IdempotencyError, 400, "error_idempotency_params_mismatch"), UNKNOWN),
        (_error(stripe.APIError, 409, "error_idempotency_key_in_use"), UNKNOWN),
        (_error(stripe.RateLimitError, 429, "error_rate_limit"), UNKNOWN),
        (_error(stripe.APIError, 500, "error_api_error"), UNKNOWN),
        (_error(stripe.AuthenticationError, 401, "error_invalid_api_key"), REJECTED),
        (_error(stripe.PermissionError, 403, "error_permission"), REJECTED),
        (_error(stripe.InvalidRequestError, 400, "error_no_such_payment_method"), REJECTED),
        (_error(stripe.InvalidRequestError, 400, "error_intent_unexpected_state"), UNKNOWN),
        (stripe.APIConnectionError("Network error: ReadTimeout"), UNKNOWN),
    ],
    ids=lambda value: value.__class__.__name__ if isinstance(value, Exception) else value.value,
)
def test_each_library_error_class_maps_onto_one_outcome(error, outcome):
    # An APIConnectionError without a refused connection behind it may have been sent.
    assert sort_stripe_error(error).outcome == outcome


@pytest.mark.parametrize(
    ("error", "request_refused"),
    [
        (_error(stripe.InvalidRequestError, 400, "error_no_such_payment_method"), True),
        (_error(stripe.AuthenticationError, 401, "error_invalid_api_key"), False),
        (_error(stripe.PermissionError, 403, "error_permission"), False),
    ],
    ids=["no-such-payment-method", "invalid-api-key", "key-without-permission"],
)
def test_a_refusal_of_the_requests_payment_method_is_not_the_channels_fault(error, request_refused):
    # the circuit breaker counts only what says something about the channel (SPEC 4)
    result = sort_stripe_error(error)
    assert (result.outcome, result.request_refused) == (REJECTED, request_refused)


def test_status_is_asked_by_payment_intent_id(adapter, peers):
    peer = peers(answer(200, recorded("payment_intent_succeeded")))
    status = adapter.fetch_status(
        channel=channel(peer.url), idempotency_key=KEY, provider_reference="pi_3QxS2vLkdIwHu7ix0b7mYqLx"
    )
    assert peer.requests[0].startswith(b"GET /v1/payment_intents/pi_3QxS2vLkdIwHu7ix0b7mYqLx ")
    assert (status.status, status.provider_reference) == ("paid", "pi_3QxS2vLkdIwHu7ix0b7mYqLx")


def test_status_of_a_declined_intent_is_failed_with_its_decline_code(adapter, peers):
    intent = json.loads(recorded("error_card_declined_insufficient_funds"))["error"]["payment_intent"]
    peer = peers(answer(200, json.dumps(intent)))
    status = adapter.fetch_status(
        channel=channel(peer.url), idempotency_key=KEY, provider_reference=intent["id"]
    )
    assert (status.status, status.failure_code) == ("failed", "insufficient_funds")


def test_status_of_another_attempts_intent_is_an_error_not_an_outcome(adapter, peers):
    peer = peers(answer(200, recorded("payment_intent_succeeded")))
    with pytest.raises(ProviderError):
        adapter.fetch_status(
            channel=channel(peer.url),
            idempotency_key="other:stripe-test",
            provider_reference="pi_3QxS2vLkdIwHu7ix0b7mYqLx",
        )


def test_status_without_an_intent_id_asks_nothing_and_says_not_found(adapter, peers):
    # The create's answer was lost: the poll resends it under the same key (Stripe replays it).
    peer = peers(answer(500, recorded("error_api_error")))
    status = adapter.fetch_status(channel=channel(peer.url), idempotency_key=KEY, provider_reference="")
    assert (status.status, status.looked) == ("not_found", False)  # a resend is safe only in the key window
    assert peer.requests == []


def test_status_answer_5xx_is_a_provider_error(adapter, peers):
    peer = peers(answer(500, recorded("error_api_error")))
    with pytest.raises(ProviderError):
        adapter.fetch_status(channel=channel(peer.url), idempotency_key=KEY, provider_reference="pi_1")


def test_status_of_an_intent_stripe_does_not_know_is_not_found(adapter, peers):
    # Stripe's answer to retrieving an unknown object: 404 resource_missing (an InvalidRequestError)
    missing = json.dumps(
        {
            "error": {
                "code": "resource_missing",
                "message": "No such payment_intent: 'pi_1'",
                "param": "intent",
                "type": "invalid_request_error",
            }
        }
    )
    peer = peers(answer(404, missing))
    status = adapter.fetch_status(channel=channel(peer.url), idempotency_key=KEY, provider_reference="pi_1")
    assert status.status == "not_found"
    assert len(peer.requests) == 1
