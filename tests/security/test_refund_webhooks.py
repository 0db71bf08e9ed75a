"""Refund webhooks through the provider webhook endpoint: a refund's word counts only when the
channel that made the refund signed it; replays are no-ops; the hand-off goes to the refund's own
confirm stage (SPEC 5, 7, 10). Real commits, so an accepted webhook really reaches the broker."""

import json

import pytest

from gateway.models import ProviderWebhook, RefundAttempt
from orders import events
from orders.models import Refund
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
