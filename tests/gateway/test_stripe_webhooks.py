"""Stripe's webhooks (SPEC 11): verified from `Stripe-Signature` by the library against each Stripe
channel's endpoint secret, read strictly, stored once; a forged one is 400 and changes nothing."""

import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from core import crypto
from gateway.models import ChargeAttempt, ProviderWebhook
from gateway.providers.base import IgnoredWebhook, InvalidWebhook, MalformedWebhook
from gateway.providers.stripe import StripeAdapter
from orders.models import Order
from tests.database_down import database_restarting
from tests.factories import ChannelFactory, OrderFactory

RECORDED = Path(__file__).parent / "stripe_recorded"
URL = "/api/v1/gateway/webhooks/stripe"
SECRET = "whsec_test_secret_of_stripe_test"
OTHER_SECRET = "whsec_test_secret_of_stripe_other"
RECORDED_ORDER = "01a22a48-b737-786c-a84c-0b2d41ca6738"

pytestmark = pytest.mark.django_db


def sign(body: str, secret: str = SECRET, at: int | None = None) -> str:
    at = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{at}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


@pytest.fixture
def channels():
    ChannelFactory(code="stripe-test", provider="stripe", webhook_secret_encrypted=crypto.encrypt(SECRET))
    ChannelFactory(
        code="stripe-other", provider="stripe", webhook_secret_encrypted=crypto.encrypt(OTHER_SECRET)
    )


def event(name: str, order_id: str = RECORDED_ORDER, channel: str = "stripe-test") -> str:
    text = (RECORDED / f"{name}.json").read_text()
    return text.replace(RECORDED_ORDER, order_id).replace(":stripe-test", f":{channel}")


def parse(body: str, signature: str | None):
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return StripeAdapter().parse_webhook(body=body.encode(), headers=headers)


def test_payment_intent_succeeded_is_paid_for_the_attempt_in_its_metadata(channels):
    body = event("event_payment_intent_succeeded")
    parsed = parse(body, sign(body))
    assert (parsed.status, parsed.channel, parsed.order_id) == ("paid", "stripe-test", RECORDED_ORDER)
    assert parsed.idempotency_key == f"{RECORDED_ORDER}:stripe-test"
    assert (parsed.webhook_id, parsed.provider_reference) == (
        "evt_3QxS2vLkdIwHu7ix0tq3Sx1Y",
        "pi_3QxS2vLkdIwHu7ix0b7mYqLx",
    )
    # what the PaymentIntent is for, compared with the order before the word is stored
    assert (parsed.amount, parsed.currency) == (1050, "USD")


def test_payment_intent_payment_failed_is_failed_with_the_decline_code(channels):
    body = event("event_payment_intent_payment_failed")
    parsed = parse(body, sign(body))
    assert (parsed.status, parsed.failure_code) == ("failed", "insufficient_funds")


def test_the_signer_is_the_channel_whose_secret_verifies(channels):
    body = event("event_payment_intent_succeeded", channel="stripe-other")
    assert parse(body, sign(body, OTHER_SECRET)).channel == "stripe-other"


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "t=1,v1=00",
        sign("another body"),
        sign("{}", "whsec_not_ours"),
        "garbage",
        "t=" + "9" * 5000,
        f"t={int(time.time())},v1=\u00e9",
        f"t={int(time.time())},v1=\u00ff" + "0" * 63,
    ],
    ids=[
        "absent",
        "empty",
        "wrong",
        "of another body",
        "unknown secret",
        "garbage",
        "huge",
        "non-ASCII",
        "latin-1",
    ],
)
def test_a_signature_that_does_not_verify_is_invalid(channels, signature):
    body = event("event_payment_intent_succeeded")
    with pytest.raises(InvalidWebhook) as raised:
        parse(body, signature)
    assert not isinstance(raised.value, MalformedWebhook)


def test_a_signature_more_than_five_minutes_off_is_invalid(channels):
    body = event("event_payment_intent_succeeded")
    parse(body, sign(body, at=int(time.time()) - 290))  # inside the tolerance
    parse(body, sign(body, at=int(time.time()) + 290))
    with pytest.raises(InvalidWebhook):
        parse(body, sign(body, at=int(time.time()) - 310))
    with pytest.raises(InvalidWebhook):
        parse(body, sign(body, at=int(time.time()) + 310))


def test_events_we_do_not_act_on_are_ignored_not_refused(channels):
    charge_event = event("event_charge_succeeded")
    with pytest.raises(IgnoredWebhook):
        parse(charge_event, sign(charge_event))
    not_ours = json.loads(event("event_payment_intent_succeeded"))
    not_ours["data"]["object"]["metadata"] = {"shop": "another system on the same account"}
    body = json.dumps(not_ours)
    with pytest.raises(IgnoredWebhook):
        parse(body, sign(body))


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        '{"object": "event"}',
        '{"object": "event", "id": "evt_1", "type": "payment_intent.succeeded", "data": {"object": 5}}',
        '{"object":"event","id":"evt_1","type":"payment_intent.succeeded",'
        '"data":{"object":{"object":"payment_intent","id":"pi_1","metadata":{"order_id":["x"],"attempt":"a:b"}}}}',
        '{"object":"event","id":"evt_1","type":"payment_intent.succeeded",'
        '"data":{"object":{"object":"payment_intent","id":"pi_1","metadata":{"order_id":"o","attempt":"a:b"},'
        '"note":"\\u0000"}}}',
        '{"object":"event","id":"evt_1","type":"payment_intent.succeeded","amount":NaN}',
        "[" * 100000,
        '{"object":"event","id":"evt_1","type":"refund.updated","data":{"object":{"object":"charge"}}}',
        '{"object":"event","id":"evt_1","type":"refund.failed","data":{"object":{"object":"refund",'
        '"id":"re_1","status":"failed","metadata":{"order_id":"o","attempt":["refund:x"]}}}}',
        '{"object":"event","id":"evt_1","type":"refund.failed","data":{"object":{"object":"refund",'
        '"id":"re_1","status":"failed","metadata":{"order_id":"o","attempt":"o:stripe-test"}}}}',
    ],
    ids=[
        "not json",
        "a list",
        "no id",
        "object not a dict",
        "order id a list",
        "NUL",
        "NaN",
        "deep",
        "refund event of a charge",
        "refund attempt a list",
        "refund event naming a charge's key",
    ],
)
def test_a_verified_body_of_the_wrong_shape_is_malformed(channels, body):
    with pytest.raises(MalformedWebhook):
        parse(body, sign(body))


@pytest.fixture
def paid_stripe_order(channels):
    order = OrderFactory(status="paid", outcome="paid", channel="stripe-test", payment_method="pm_card_visa")
    ChargeAttempt.objects.create(
        order=order,
        channel="stripe-test",
        provider="stripe",
        idempotency_key=f"{order.pk}:stripe-test",
        status="paid",
    )
    return order


def post(body: bytes | str, signature: str | None):
    headers = {"HTTP_STRIPE_SIGNATURE": signature} if signature is not None else {}
    return APIClient().post(URL, body, content_type="application/json", **headers)


def test_a_signed_intent_for_another_amount_is_acknowledged_and_not_stored(paid_stripe_order):
    # Stripe's signature, our order and attempt in the metadata, and a PaymentIntent of 1 JPY on a
    # 1050 USD order: another system's charge, not this order's (before: it settled the order)
    payload = json.loads(event("event_payment_intent_payment_failed", order_id=str(paid_stripe_order.pk)))
    payload["data"]["object"].update(amount=1, currency="jpy")
    body = json.dumps(payload)
    response = post(body, sign(body))
    assert (response.status_code, response.json()["ignored"]) == (200, True)
    assert ProviderWebhook.objects.count() == 0
    assert paid_stripe_order.ignored_signals.get().requested_status == "failed"


def test_a_forged_signature_is_400_and_changes_nothing(paid_stripe_order):
    # given: a "payment failed" for a paid order, signed with a secret that is not the channel's
    body = event("event_payment_intent_payment_failed", order_id=str(paid_stripe_order.pk))
    # when
    response = post(body, sign(body, "whsec_forged"))
    # then
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_signature"
    assert ProviderWebhook.objects.count() == 0
    order = Order.objects.get(pk=paid_stripe_order.pk)
    assert (order.status, order.outcome, order.failure_code) == ("paid", "paid", None)


def test_a_verified_event_is_stored_once_by_its_event_id(paid_stripe_order):
    body = event("event_payment_intent_succeeded", order_id=str(paid_stripe_order.pk))
    first = post(body, sign(body))
    again = post(body, sign(body))
    assert (first.status_code, first.json()["duplicate"]) == (200, False)
    assert (again.status_code, again.json()["duplicate"]) == (200, True)
    stored = ProviderWebhook.objects.get()
    assert (stored.provider, stored.webhook_id, stored.order_id) == (
        "stripe",
        "evt_3QxS2vLkdIwHu7ix0tq3Sx1Y",
        paid_stripe_order.pk,
    )


def test_an_event_we_do_not_act_on_is_acknowledged_and_not_stored(paid_stripe_order):
    body = event("event_charge_succeeded", order_id=str(paid_stripe_order.pk))
    response = post(body, sign(body))
    assert response.status_code == 200 and response.json()["ignored"] is True
    assert ProviderWebhook.objects.count() == 0


def test_another_stripe_channel_cannot_speak_for_this_ones_charge(paid_stripe_order):
    # signed by stripe-other, about stripe-test's attempt (its key names stripe-test)
    body = event("event_payment_intent_payment_failed", order_id=str(paid_stripe_order.pk))
    response = post(body, sign(body, OTHER_SECRET))
    assert response.status_code == 403
    assert ProviderWebhook.objects.count() == 0


@pytest.mark.parametrize(
    ("body", "signature"),
    [
        (b"\xff\xfe\x00garbage", "t=1,v1=00"),
        (b"\xff\xfe\x00garbage", None),
        (b"", "t=1,v1=00"),
        (b"{" * 60000, "t=1,v1=00"),
        (b'{"object":"event"}', "t=abc,v1=\x00"),
        # What a WSGI server makes of the bytes `v1=\xc3\xa9` (each byte a latin-1 character).
        (b"{}", f"t={int(time.time())},v1=\u00c3\u00a9"),
    ],
    ids=["binary", "binary unsigned", "empty", "deep", "bad header", "non-ASCII header"],
)
def test_garbage_is_a_4xx_json_error_never_a_500(channels, body, signature):
    response = post(body, signature)
    assert 400 <= response.status_code < 500
    assert "error" in response.json()
    assert ProviderWebhook.objects.count() == 0


def test_the_whole_garbage_battery_signed_is_never_a_500(channels):
    # The bodies the whole-surface garbage test throws at every endpoint, signed with the channel's
    # secret, so they pass verification and reach the event parser (unsigned, they stop before).
    from tests.security.test_garbage import BODIES

    problems = []
    for label, content_type, body in BODIES:
        text = body.decode("utf-8", "replace")
        response = APIClient().generic(
            "POST", URL, body, content_type=content_type, HTTP_STRIPE_SIGNATURE=sign(text)
        )
        if not 400 <= response.status_code < 500 and response.status_code != 200:
            problems.append(f"{label}: {response.status_code}")
        elif response.status_code >= 400 and "error" not in response.json():
            problems.append(f"{label}: not a JSON error")
    assert not problems, problems
    assert ProviderWebhook.objects.count() == 0


def test_localstripe_and_the_gateway_agree_on_the_endpoint_secret_and_events():
    # The launcher (a stand-in for a third party) and seed_sandbox derive it each on their side.
    from gateway.providers.stripe import LOCALSTRIPE_WEBHOOK_EVENTS, localstripe_endpoint_secret
    from gateway.sandbox_server.secrets import STRIPE_WEBHOOK_EVENTS, stripe_endpoint_secret

    for master in ("sandbox-dev-secret", "another"):
        assert localstripe_endpoint_secret("stripe-test", master) == stripe_endpoint_secret(
            "stripe-test", master
        )
    assert localstripe_endpoint_secret("a", "m") != localstripe_endpoint_secret("b", "m")
    assert LOCALSTRIPE_WEBHOOK_EVENTS == STRIPE_WEBHOOK_EVENTS


def test_a_webhook_while_the_database_restarts_is_a_503_to_redeliver_never_a_500(channels):
    # given: a good word, signed; PostgreSQL restarting as it arrives
    body = event("event_payment_intent_succeeded")
    # when
    with database_restarting():
        response = APIClient().post(
            URL, body, content_type="application/json", HTTP_STRIPE_SIGNATURE=sign(body)
        )
    # then: Stripe redelivers a 5xx; a 503 says "later", in the API's one error shape
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    assert response["Retry-After"] == "1"
    assert not ProviderWebhook.objects.exists()
