"""Stripe orders through the real stack and localstripe over HTTP (SPEC 11): web, workers, beat,
localstripe's PaymentIntents and its signed webhooks back to our endpoint."""

import hashlib
import hmac
import json
import time

import pytest
import requests
from standardwebhooks.webhooks import Webhook

from gateway.models import ProviderWebhook
from orders.models import RefundTransition
from tests.e2e.conftest import WEB, Client, localstripe_get, path_of, wait_for
from tests.factories import make_merchant

pytestmark = [pytest.mark.e2e]

P, AS, PR, PD, F, C = "pending", "assigned", "processing", "paid", "failed", "completed"
S = "stripe-test"


def _stored_webhooks(order_id: str) -> list[str]:
    return list(
        ProviderWebhook.objects.filter(order_id=order_id, provider="stripe")
        .order_by("id")
        .values_list("event_type", flat=True)
    )


def test_stripe_orders_end_to_end(live, receiver):
    # given a merchant whose callback endpoint answers 200
    hook = "/hooks/stripe"
    creds = make_merchant(callback_url=receiver.url(hook))
    client = Client(creds.api_key)
    # when: a good card, a card that localstripe declines, and a currency no Stripe channel takes
    paid = client.create(1050, "USD", payment_method="pm_card_visa")
    declined = client.create(2050, "EUR", payment_method="pm_card_chargeCustomerFail")
    no_channel = client.create(1050, "GBP", payment_method="pm_card_visa")
    done = {o["id"]: client.wait_status(o["id"], C, timeout=40) for o in (paid, declined, no_channel)}

    # then the good card is paid at stripe-test, the PaymentIntent named as provider reference
    order = done[paid["id"]]
    assert (order["outcome"], order["channel"], order["payment_method"]) == ("paid", S, "pm_card_visa")
    assert path_of(client.events(paid["id"])) == [
        (None, P, None),
        (P, AS, S),
        (AS, PR, S),
        (PR, PD, S),
        (PD, C, S),
    ]
    intent = localstripe_get(f"/v1/payment_intents/{order['provider_reference']}")
    assert (intent["id"], intent["status"], intent["amount"], intent["currency"]) == (
        order["provider_reference"], "succeeded", 1050, "usd",
    )  # fmt: skip
    assert intent["metadata"]["order_id"] == paid["id"]
    # and localstripe's signed payment_intent.succeeded reached our endpoint and verified
    wait_for(lambda: "payment_intent.succeeded" in _stored_webhooks(paid["id"]), 15, "succeeded webhook")

    # the declined card failed with Stripe's code, never failed over
    order = done[declined["id"]]
    assert (order["outcome"], order["failure_code"], order["channel"]) == ("failed", "card_declined", S)
    assert path_of(client.events(declined["id"]))[-2:] == [(PR, F, S), (F, C, S)]
    # localstripe's decline names no PaymentIntent; its payment_failed webhook does
    wait_for(
        lambda: "payment_intent.payment_failed" in _stored_webhooks(declined["id"]), 15, "failed webhook"
    )
    reference = wait_for(lambda: client.get(declined["id"])["provider_reference"], 10, "reference")
    assert localstripe_get(f"/v1/payment_intents/{reference}")["metadata"]["order_id"] == declined["id"]

    # GBP: no Stripe channel takes it, and the sandbox channels that do cannot charge a pm_ token
    order = done[no_channel["id"]]
    assert (order["outcome"], order["failure_code"], order["channel"]) == (
        "failed",
        "no_channel_available",
        None,
    )

    # each merchant callback carries the order object with its provider reference
    bodies = {b["data"]["id"]: b for b in (json.loads(r["body"]) for r in receiver.received(hook))}
    assert bodies[paid["id"]]["data"]["provider_reference"] == done[paid["id"]]["provider_reference"]
    for request in receiver.received(hook):
        Webhook(creds.webhook_secret).verify(request["body"], request["headers"])


def test_a_forged_stripe_signature_is_400_and_changes_nothing(live, receiver):
    creds = make_merchant(callback_url=receiver.url("/hooks/stripe-forged"))
    client = Client(creds.api_key)
    order = client.create(1050, "USD", payment_method="pm_card_visa")
    paid = client.wait_status(order["id"], C, timeout=40)
    wait_for(lambda: _stored_webhooks(order["id"]), 15, "succeeded webhook")
    stored = _stored_webhooks(order["id"])
    # a payment_failed event about it, signed with a secret that is not the channel's
    event = {
        "id": "evt_forged_1",
        "object": "event",
        "type": "payment_intent.payment_failed",
        "data": {
            "object": {
                "id": paid["provider_reference"],
                "object": "payment_intent",
                "status": "requires_payment_method",
                "last_payment_error": {"code": "card_declined"},
                "metadata": {"order_id": order["id"], "attempt": f"{order['id']}:{S}"},
            }
        },
    }
    body = json.dumps(event)
    now = int(time.time())
    forged = hmac.new(b"whsec_forged", f"{now}.{body}".encode(), hashlib.sha256).hexdigest()
    response = requests.post(
        f"http://{WEB}/api/v1/gateway/webhooks/stripe",
        data=body,
        headers={"Content-Type": "application/json", "Stripe-Signature": f"t={now},v1={forged}"},
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_signature"
    after = client.get(order["id"])
    assert (after["status"], after["outcome"], after["failure_code"]) == (C, "paid", None)
    assert _stored_webhooks(order["id"]) == stored


def test_a_refund_of_a_stripe_order_reaches_localstripes_charge(live, receiver):
    creds = make_merchant(callback_url=receiver.url("/hooks/stripe-refund"))
    client = Client(creds.api_key)
    order = client.create(1050, "USD", payment_method="pm_card_visa")
    paid = client.wait_status(order["id"], C, timeout=40)
    # when: a partial refund through our API
    response = client.session.post(
        f"http://{WEB}/api/v1/orders/{order['id']}/refunds",
        json={"amount": 400},
        headers={"Idempotency-Key": f"rf-{order['id']}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    refund_id = response.json()["id"]
    # then it succeeds: Stripe's (here localstripe's) answer is a Refund already `succeeded`, which
    # settles it at once (localstripe sends no refund webhook; a status poll would be the fallback)
    done = wait_for(
        lambda: (
            (r := client.session.get(f"http://{WEB}/api/v1/refunds/{refund_id}", timeout=10).json())["status"]
            == "succeeded"
            and r
        ),
        40,
        "refund succeeded",
    )
    assert done["amount"] == 400
    last = RefundTransition.objects.filter(refund_id=refund_id).order_by("id").last()
    assert (last.to_status, last.reason) == ("succeeded", "provider says succeeded via refund answer")
    intent = localstripe_get(f"/v1/payment_intents/{paid['provider_reference']}")
    charge_id = (
        intent["latest_charge"]["id"]
        if isinstance(intent["latest_charge"], dict)
        else intent["latest_charge"]
    )
    assert localstripe_get(f"/v1/charges/{charge_id}")["amount_refunded"] == 400
    assert client.get(order["id"])["amount_refunded"] == 400
