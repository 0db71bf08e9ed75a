"""Provider webhooks that must change nothing: forged, tampered, stale, future-dated, replayed
(SPEC 5, 7). Real commits, so a webhook that is accepted really hands off to the broker."""

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from rest_framework.test import APIClient
from standardwebhooks.webhooks import Webhook

from gateway.models import ChargeAttempt, ProviderWebhook
from gateway.sandbox_server.secrets import channel_webhook_secret
from orders.models import IgnoredSignal, Order
from tests.factories import OrderFactory

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/api/v1/gateway/webhooks/sandbox"


@pytest.fixture
def processing_order(redis_client):
    call_command("seed_sandbox", stdout=open("/dev/null", "w"))
    order = OrderFactory(status="processing", channel="sandbox-a")
    ChargeAttempt.objects.create(
        order=order,
        channel="sandbox-a",
        provider="sandbox",
        idempotency_key=f"{order.pk}:sandbox-a",
        status="accepted",
    )
    redis_client.delete("gateway")
    yield order
    redis_client.delete("gateway")


def event_body(order, *, channel: str = "sandbox-a", status: str = "paid") -> str:
    data = {
        "id": "ch_test",
        "status": status,
        "channel": channel,
        "order_id": str(order.pk),
        "idempotency_key": f"{order.pk}:{channel}",
        "amount": order.amount,
        "currency": order.currency,
        "failure_code": None,
    }
    return json.dumps({"type": f"charge.{status}", "data": data}, separators=(",", ":"))


def signed_headers(body: str, *, secret: str, msg_id: str = "msg_1", at: datetime | None = None) -> dict:
    at = at or datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id, at, body)
    return {
        "HTTP_WEBHOOK_ID": msg_id,
        "HTTP_WEBHOOK_TIMESTAMP": str(int(at.timestamp())),
        "HTTP_WEBHOOK_SIGNATURE": signature,
    }


def secret_of(channel: str) -> str:
    return channel_webhook_secret(channel, settings.SANDBOX_SECRET)


def post(body: str, headers: dict):
    return APIClient().post(URL, body, content_type="application/json", **headers)


def confirm_messages(redis_client, order) -> list[dict]:
    messages = []
    for raw in redis_client.lrange("gateway", 0, -1):
        args = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
        if args[0].get("order_id") == str(order.pk):
            messages.append(args[0])
    return messages


def assert_nothing_changed(order, redis_client) -> None:
    fresh = Order.objects.get(pk=order.pk)
    assert (fresh.status, fresh.outcome) == ("processing", None)
    assert ProviderWebhook.objects.count() == 0
    assert IgnoredSignal.objects.filter(order=order).count() == 0
    # The hand-off runs on commit, and these tests commit: it would be in the queue already.
    assert confirm_messages(redis_client, order) == []


def _forgeries(order):
    body = event_body(order)
    now = datetime.now(UTC)
    random_secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    return {
        "signed with another secret": (body, signed_headers(body, secret=random_secret)),
        "signed with another channel's secret": (body, signed_headers(body, secret=secret_of("sandbox-b"))),
        "body changed after signing": (
            body.replace('"paid"', '"failed"'),
            signed_headers(body, secret=secret_of("sandbox-a")),
        ),
        "timestamp 6 minutes old": (
            body,
            signed_headers(body, secret=secret_of("sandbox-a"), at=now - timedelta(minutes=6)),
        ),
        "timestamp 6 minutes ahead": (
            body,
            signed_headers(body, secret=secret_of("sandbox-a"), at=now + timedelta(minutes=6)),
        ),
        # a replay dressed up as new: another webhook-id, or a fresh timestamp on an old message
        "webhook-id changed after signing": (
            body,
            {
                **signed_headers(body, secret=secret_of("sandbox-a"), msg_id="msg_1"),
                "HTTP_WEBHOOK_ID": "msg_2",
            },
        ),
        "old message with a fresh timestamp": (
            body,
            {
                **signed_headers(body, secret=secret_of("sandbox-a"), at=now - timedelta(minutes=10)),
                "HTTP_WEBHOOK_TIMESTAMP": str(int(now.timestamp())),
            },
        ),
        "no signature headers": (body, {}),
        "signature header garbage": (
            body,
            {**signed_headers(body, secret=secret_of("sandbox-a")), "HTTP_WEBHOOK_SIGNATURE": "v1,%%%"},
        ),
        "unknown channel": (
            event_body(order, channel="nope"),
            signed_headers(event_body(order, channel="nope"), secret=secret_of("nope")),
        ),
        "not JSON": ("not json", signed_headers("not json", secret=secret_of("sandbox-a"))),
    }


FORGERIES = [
    "signed with another secret",
    "signed with another channel's secret",
    "body changed after signing",
    "timestamp 6 minutes old",
    "timestamp 6 minutes ahead",
    "webhook-id changed after signing",
    "old message with a fresh timestamp",
    "no signature headers",
    "signature header garbage",
    "unknown channel",
    "not JSON",
]


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_or_out_of_time_webhook_is_401_and_changes_nothing(processing_order, redis_client, forgery):
    body, headers = _forgeries(processing_order)[forgery]
    response = post(body, headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_signature"
    assert_nothing_changed(processing_order, redis_client)


@pytest.mark.parametrize("case", ["4 minutes old", "4 minutes ahead", "one of several signatures"])
def test_a_genuine_webhook_inside_the_window_is_accepted_and_handed_off(processing_order, redis_client, case):
    # the refusals above are about the signature and the clock, not an endpoint that refuses all
    body = event_body(processing_order)
    now = datetime.now(UTC)
    secret = secret_of("sandbox-a")
    if case == "4 minutes old":
        headers = signed_headers(body, secret=secret, at=now - timedelta(minutes=4))
    elif case == "4 minutes ahead":
        headers = signed_headers(body, secret=secret, at=now + timedelta(minutes=4))
    else:  # secret rotation: a stale signature next to the good one
        headers = signed_headers(body, secret=secret)
        stale = signed_headers(body, secret=secret_of("sandbox-b"))["HTTP_WEBHOOK_SIGNATURE"]
        headers["HTTP_WEBHOOK_SIGNATURE"] = f"{stale} {headers['HTTP_WEBHOOK_SIGNATURE']}"
    response = post(body, headers)
    assert (response.status_code, response.json()) == (200, {"received": True, "duplicate": False})
    assert ProviderWebhook.objects.filter(webhook_id="msg_1").count() == 1
    assert len(confirm_messages(redis_client, processing_order)) == 1


def test_a_valid_webhook_replayed_is_a_200_duplicate_and_a_no_op(processing_order, redis_client):
    # given one genuine webhook, accepted and handed off once
    body = event_body(processing_order)
    headers = signed_headers(body, secret=secret_of("sandbox-a"), msg_id="msg_replay")
    first = post(body, headers)
    assert (first.status_code, first.json()) == (200, {"received": True, "duplicate": False})
    assert len(confirm_messages(redis_client, processing_order)) == 1
    # when it is sent again, as is (a replay within the 5 minutes)
    for _ in range(3):
        again = post(body, headers)
        # then it is acknowledged as a duplicate, stored once, and handed off no more
        assert (again.status_code, again.json()) == (200, {"received": True, "duplicate": True})
    assert ProviderWebhook.objects.filter(webhook_id="msg_replay").count() == 1
    assert len(confirm_messages(redis_client, processing_order)) == 1


def test_an_unknown_provider_is_404(processing_order, redis_client):
    body = event_body(processing_order)
    response = APIClient().post(
        "/api/v1/gateway/webhooks/evil",
        body,
        content_type="application/json",
        **signed_headers(body, secret=secret_of("sandbox-a")),
    )
    assert response.status_code == 404
    assert_nothing_changed(processing_order, redis_client)
