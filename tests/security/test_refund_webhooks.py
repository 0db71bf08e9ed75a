"""Refund webhooks through the provider webhook endpoint: a refund's word counts only when the
channel that made the refund signed it; replays are no-ops; the hand-off goes to the refund's own
confirm stage (SPEC 5, 7, 10). Real commits, so an accepted webhook really reaches the broker."""

import json

import pytest
from rest_framework.test import APIClient

from gateway.models import ProviderWebhook, RefundAttempt
from orders import events
from orders.models import Order, Refund
from orders.services import refund_create, refund_fingerprint
from tests.factories import OrderFactory, make_paid
from tests.security.test_provider_webhooks import confirm_messages, post, secret_of, signed_headers

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def processing_refund(redis_client):
    from django.core.management import call_command

    call_command("seed_sandbox", stdout=open("/dev/null", "w"))
    order = OrderFactory(amount=1000)
    make_paid(order.pk)  # charged on sandbox-a
    result = refund_create(
        merchant=order.merchant,
        order_id=str(order.pk),
        idempotency_key="rk",
        fingerprint=refund_fingerprint(order_id=order.pk, data={"amount": 400}),
        amount=400,
    )
    refund = Refund.objects.get(pk=result.body["id"])
    RefundAttempt.objects.create(
        refund=refund,
        order=order,
        channel="sandbox-a",
        provider="sandbox",
        idempotency_key=f"refund:{refund.pk}",
        charge_idempotency_key=f"{order.pk}:sandbox-a",
        amount=400,
        currency="USD",
        status="accepted",
    )
    redis_client.delete("gateway")
    yield refund
    redis_client.delete("gateway")


def refund_body(refund: Refund, *, channel: str = "sandbox-a", status: str = "succeeded") -> str:
    data = {
        "id": "re_test",
        "object": "refund",
        "status": status,
        "channel": channel,
        "order_id": str(refund.order_id),
        "idempotency_key": f"refund:{refund.pk}",
        "amount": refund.amount,
        "currency": refund.currency,
        "failure_code": None,
    }
    return json.dumps({"type": f"refund.{status}", "data": data}, separators=(",", ":"))


def test_a_refund_webhook_is_stored_once_and_handed_to_the_refund_confirm_stage(
    processing_refund, redis_client
):
    body = refund_body(processing_refund)
    headers = signed_headers(body, secret=secret_of("sandbox-a"), msg_id="msg_refund")
    first = post(body, headers)
    again = post(body, headers)
    assert first.json() == {"received": True, "duplicate": False}
    assert again.json() == {"received": True, "duplicate": True}
    assert ProviderWebhook.objects.filter(webhook_id="msg_refund", event_type="refund.succeeded").count() == 1
    (message,) = confirm_messages(redis_client, processing_refund.order)
    assert message["idempotency_key"] == f"refund:{processing_refund.pk}"
    assert (message["status"], message["channel"]) == ("succeeded", "sandbox-a")
    raw = redis_client.lrange("gateway", 0, -1)
    assert [json.loads(r)["headers"]["task"] for r in raw] == [events.REFUND_CONFIRM]


def test_a_refund_webhook_signed_by_another_channel_changes_nothing(processing_refund, redis_client):
    # sandbox-b signs (validly, with its own secret) a word about sandbox-a's refund
    body = refund_body(processing_refund, channel="sandbox-b")
    response = post(body, signed_headers(body, secret=secret_of("sandbox-b")))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "channel_mismatch"
    assert ProviderWebhook.objects.count() == 0
    assert confirm_messages(redis_client, processing_refund.order) == []
    assert Refund.objects.get(pk=processing_refund.pk).status == "pending"


def test_a_forged_refund_webhook_is_401(processing_refund, redis_client):
    body = refund_body(processing_refund)
    response = post(body, signed_headers(body, secret=secret_of("sandbox-b")))
    assert response.status_code == 401
    assert ProviderWebhook.objects.count() == 0
    assert confirm_messages(redis_client, processing_refund.order) == []


# --- Stripe's refund events: the same refund-webhook event, verified with the endpoint secret ---

STRIPE_SECRET = "whsec_test_secret_of_stripe_refunds"
RECORDED = "tests/gateway/stripe_recorded"
RECORDED_ORDER = "01a22a48-b737-786c-a84c-0b2d41ca6738"
RECORDED_REFUND = "01a22a49-0000-7000-8000-00000000r001"


@pytest.fixture
def stripe_refund(redis_client):
    from core import crypto
    from orders.transitions import order_transition
    from tests.factories import ChannelFactory

    ChannelFactory(
        code="stripe-test", provider="stripe", webhook_secret_encrypted=crypto.encrypt(STRIPE_SECRET)
    )
    order = OrderFactory(amount=1000)
    Order.objects.filter(pk=order.pk).update(status="processing", channel="stripe-test")
    order_transition(order_id=order.pk, to="paid", seen_status="processing", reason="test")
    result = refund_create(
        merchant=order.merchant,
        order_id=str(order.pk),
        idempotency_key="rk",
        fingerprint=refund_fingerprint(order_id=order.pk, data={"amount": 400}),
        amount=400,
    )
    refund = Refund.objects.get(pk=result.body["id"])
    RefundAttempt.objects.create(
        refund=refund,
        order=order,
        channel="stripe-test",
        provider="stripe",
        idempotency_key=f"refund:{refund.pk}",
        charge_idempotency_key=f"{order.pk}:stripe-test",
        amount=400,
        currency="USD",
        status="accepted",
        provider_reference="re_3QxS2vLkdIwHu7ix0Rf1nD01",
    )
    Refund.objects.filter(pk=refund.pk).update(status="processing")
    redis_client.delete("gateway")
    yield refund
    redis_client.delete("gateway")


def stripe_event(name: str, refund: Refund, **refund_fields) -> str:
    from pathlib import Path

    text = (Path(RECORDED) / f"{name}.json").read_text()
    text = text.replace(RECORDED_ORDER, str(refund.order_id)).replace(RECORDED_REFUND, str(refund.pk))
    if not refund_fields:
        return text
    event = json.loads(text)
    event["data"]["object"].update(refund_fields)
    return json.dumps(event)


def stripe_post(body: str, secret: str = STRIPE_SECRET):
    from tests.gateway.test_stripe_webhooks import URL, sign

    return APIClient().post(
        URL, body, content_type="application/json", HTTP_STRIPE_SIGNATURE=sign(body, secret)
    )


def handed_over(redis_client, refund: Refund) -> list[dict]:
    """The refund-confirm messages queued for the refund's order, run through the stage as a worker would."""
    from gateway.tasks import refund_confirm

    messages = confirm_messages(redis_client, refund.order)
    for message in messages:
        refund_confirm(message)
    return messages


@pytest.mark.parametrize(
    ("name", "fields", "settled", "failure_code", "refunded"),
    [
        ("event_refund_updated", {}, "succeeded", None, 400),
        ("event_refund_failed", {}, "failed", "expired_or_canceled_card", 0),
        ("event_refund_updated", {"status": "canceled"}, "failed", "refund_canceled", 0),
    ],
    ids=["refund.updated succeeded", "refund.failed", "refund.updated canceled"],
)
def test_a_stripe_refund_event_settles_the_refund_once_by_its_event_id(
    stripe_refund, redis_client, name, fields, settled, failure_code, refunded
):
    body = stripe_event(name, stripe_refund, **fields)
    first, again = stripe_post(body), stripe_post(body)
    assert first.json() == {"received": True, "duplicate": False}
    assert again.json() == {"received": True, "duplicate": True}
    (message,) = handed_over(redis_client, stripe_refund)
    assert (message["idempotency_key"], message["channel"], message["provider"]) == (
        f"refund:{stripe_refund.pk}",
        "stripe-test",
        "stripe",
    )
    refund = Refund.objects.get(pk=stripe_refund.pk)
    assert (refund.status, refund.failure_code) == (settled, failure_code)
    assert Order.objects.get(pk=refund.order_id).amount_refunded == refunded
    # a later event with the other word (another evt_ id) finds it settled and changes nothing
    handed = len(redis_client.lrange("gateway", 0, -1))
    other = json.loads(stripe_event("event_refund_updated", stripe_refund, status="failed"))
    other["id"] = "evt_later"
    assert stripe_post(json.dumps(other)).json()["duplicate"] is False
    redis_client.ltrim("gateway", handed, -1)
    handed_over(redis_client, stripe_refund)
    assert Refund.objects.get(pk=stripe_refund.pk).status == settled


def test_the_legacy_charge_refund_updated_event_settles_too(stripe_refund, redis_client):
    event = json.loads(stripe_event("event_refund_failed", stripe_refund))
    event["type"] = "charge.refund.updated"
    assert stripe_post(json.dumps(event)).status_code == 200
    handed_over(redis_client, stripe_refund)
    refund = Refund.objects.get(pk=stripe_refund.pk)
    assert (refund.status, refund.failure_code) == ("failed", "expired_or_canceled_card")


@pytest.mark.parametrize(
    "change",
    [
        lambda e: e["data"]["object"].update(status="pending"),
        lambda e: e["data"]["object"].update(metadata={"shop": "another system on the account"}),
        lambda e: e.update(type="charge.refunded"),
    ],
    ids=["still pending", "not ours", "charge.refunded"],
)
def test_stripe_refund_events_we_do_not_act_on_are_200_and_change_nothing(
    stripe_refund, redis_client, change
):
    event = json.loads(stripe_event("event_refund_updated", stripe_refund))
    change(event)
    response = stripe_post(json.dumps(event))
    assert (response.status_code, response.json().get("ignored")) == (200, True)
    assert ProviderWebhook.objects.count() == 0
    assert confirm_messages(redis_client, stripe_refund.order) == []
    assert Refund.objects.get(pk=stripe_refund.pk).status == "processing"


def test_a_stripe_refund_event_for_a_refund_we_do_not_know_is_200_and_changes_nothing(
    stripe_refund, redis_client
):
    event = json.loads(stripe_event("event_refund_updated", stripe_refund))
    unknown = "01a22a49-0000-7000-8000-0000000000ff"
    event["data"]["object"]["metadata"].update(attempt=f"refund:{unknown}", refund_id=unknown)
    response = stripe_post(json.dumps(event))
    assert response.status_code == 200
    handed_over(redis_client, stripe_refund)  # the stage finds no such refund: nothing to do
    assert Refund.objects.get(pk=stripe_refund.pk).status == "processing"


def test_a_stripe_refund_event_not_signed_with_the_endpoint_secret_is_400(stripe_refund, redis_client):
    response = stripe_post(stripe_event("event_refund_updated", stripe_refund), secret="whsec_forged")
    assert response.status_code == 400
    assert ProviderWebhook.objects.count() == 0
    assert confirm_messages(redis_client, stripe_refund.order) == []
    assert Refund.objects.get(pk=stripe_refund.pk).status == "processing"


def test_a_signed_refund_word_about_another_amount_changes_nothing_and_is_shown(
    processing_refund, redis_client, caplog
):
    # given a refund of 400, and a word signed by its channel about a refund of 1000 under its key
    payload = json.loads(refund_body(processing_refund))
    payload["data"]["amount"] = 1000
    body = json.dumps(payload, separators=(",", ":"))
    # when
    response = post(body, signed_headers(body, secret=secret_of("sandbox-a")))
    # then nothing is stored or handed on, the refund stays, and an operator is shown it
    assert response.json() == {"received": True, "duplicate": False, "ignored": True}
    assert ProviderWebhook.objects.count() == 0
    assert confirm_messages(redis_client, processing_refund.order) == []
    assert Refund.objects.get(pk=processing_refund.pk).status == "pending"
    [signal] = processing_refund.ignored_signals.all()
    assert signal.requested_status == "succeeded" and "amount is 1000, ours 400" in signal.reason
    assert "webhook.not_this_attempt" in [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
