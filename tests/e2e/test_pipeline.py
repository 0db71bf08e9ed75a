"""Every row of SPEC 5's sandbox table through the real stack: web, workers, beat, sandbox, callbacks."""

import pytest
from standardwebhooks.webhooks import Webhook

from tests.e2e.conftest import Client, callback_bodies, path_of, sandbox_charges, wait_for
from tests.factories import make_merchant

pytestmark = [pytest.mark.e2e]

P, AS, PR, PD, F, C = "pending", "assigned", "processing", "paid", "failed", "completed"
A, B, JP = "sandbox-a", "sandbox-b", "sandbox-jp"

ROWS = [
    # amount, currency, outcome, failure_code, path, charges
    (1000, "USD", "paid", None, [(None, P, None), (P, AS, A), (AS, PR, A), (PR, PD, A), (PD, C, A)], 1),
    (1049, "EUR", "paid", None, [(None, P, None), (P, AS, A), (AS, PR, A), (PR, PD, A), (PD, C, A)], 1),
    (1051, "USD", "failed", "card_declined", [(None, P, None), (P, AS, A), (AS, PR, A), (PR, F, A), (F, C, A)], 1),
    (1052, "GBP", "failed", "insufficient_funds", [(None, P, None), (P, AS, A), (AS, PR, A), (PR, F, A), (F, C, A)], 1),
    (1061, "USD", "paid", None, [(None, P, None), (P, AS, A), (AS, PR, A), (PR, PD, A), (PD, C, A)], 1),
    (1062, "USD", "paid", None, [(None, P, None), (P, AS, A), (AS, PR, A), (PR, PD, A), (PD, C, A)], 1),
    (1071, "USD", "paid", None,
     [(None, P, None), (P, AS, A), (AS, AS, B), (AS, PR, B), (PR, PD, B), (PD, C, B)], 1),
    (1072, "USD", "failed", "channel_unavailable",
     [(None, P, None), (P, AS, A), (AS, AS, B), (AS, F, B), (F, C, B)], 0),
    (1081, "USD", "paid", None, [(None, P, None), (P, AS, A), (AS, PR, A), (PR, PD, A), (PD, C, A)], 1),
    (5000, "JPY", "paid", None, [(None, P, None), (P, AS, JP), (AS, PR, JP), (PR, PD, JP), (PD, C, JP)], 1),
]  # fmt: skip


@pytest.mark.parametrize(("amount", "currency", "outcome", "failure_code", "path", "charges"), ROWS)
def test_sandbox_row_end_to_end(live, receiver, amount, currency, outcome, failure_code, path, charges):
    # given a merchant whose callback endpoint answers 200
    hook = f"/hooks/row-{amount}"
    creds = make_merchant(callback_url=receiver.url(hook))
    client = Client(creds.api_key)
    # when
    order = client.create(amount, currency)
    done = client.wait_status(order["id"], "completed", timeout=40)
    # then the end state
    assert done["outcome"] == outcome
    assert done["failure_code"] == failure_code
    assert done["completed_at"] is not None
    # the exact transition path
    assert path_of(client.events(order["id"])) == path
    # exactly one charge at the provider (none when every channel refused)
    ledger = sandbox_charges(order["id"])
    assert len(ledger) == charges
    if charges:
        assert ledger[0]["channel"] == path[-1][2]
    # one callback of the right type, signed with the merchant's secret
    received = receiver.received(hook)
    assert len(received) == 1
    request = received[0]
    body = Webhook(creds.webhook_secret).verify(request["body"], request["headers"])
    assert body["type"] == f"order.{outcome}"
    assert body["data"]["id"] == order["id"]
    assert body["data"]["status"] == outcome
    assert body["data"]["outcome"] == outcome


def test_late_failed_webhook_after_paid_is_recorded_and_ignored(live, receiver):
    # given the 81 row: three paid webhooks then a late failed one
    creds = make_merchant(callback_url=receiver.url("/hooks/late"))
    client = Client(creds.api_key)
    order = client.create(2081)
    client.wait_status(order["id"], "completed", timeout=40)
    from orders.models import IgnoredSignal, Order

    # then the late and duplicate signals were recorded as ignored, the outcome never moved
    ignored = wait_for(
        lambda: IgnoredSignal.objects.filter(order_id=order["id"], requested_status="failed").exists(),
        15,
        "late failed webhook recorded",
    )
    assert ignored
    assert IgnoredSignal.objects.filter(order_id=order["id"], requested_status="paid").count() >= 2
    assert Order.objects.get(pk=order["id"]).outcome == "paid"


def test_callback_500_503_then_200_completes_with_three_attempts_one_webhook_id(live, receiver):
    # given
    hook = "/hooks/flaky"
    receiver.script(hook, [500, 503, 200])
    creds = make_merchant(callback_url=receiver.url(hook))
    client = Client(creds.api_key)
    # when
    order = client.create(1100)
    client.wait_status(order["id"], "completed", timeout=40)
    # then
    attempts = receiver.received(hook)
    assert len(attempts) == 3
    assert len({a["headers"]["webhook-id"] for a in attempts}) == 1
    for attempt in attempts:
        Webhook(creds.webhook_secret).verify(attempt["body"], attempt["headers"])
    from callbacks.models import CallbackAttempt

    assert list(
        CallbackAttempt.objects.filter(delivery__order_id=order["id"])
        .order_by("attempted_at")
        .values_list("status_code", flat=True)
    ) == [500, 503, 200]


def test_unreachable_client_leaves_order_paid_with_a_delivery_due(live):
    # given a callback URL where nothing listens
    creds = make_merchant(callback_url="http://127.0.0.1:9/nothing-listens")
    client = Client(creds.api_key)
    # when
    order = client.create(1200)
    client.wait_status(order["id"], "paid", timeout=30)
    from callbacks.models import CallbackDelivery

    delivery = wait_for(
        lambda: CallbackDelivery.objects.filter(order_id=order["id"], attempts__gte=2).first(), 20, "retries"
    )
    # then
    assert client.get(order["id"])["status"] == "paid"
    assert delivery.status == "pending"
    assert delivery.next_attempt_at is not None


def test_callbacks_are_body_of_order_object(live, receiver):
    creds = make_merchant(callback_url=receiver.url("/hooks/body"))
    client = Client(creds.api_key)
    order = client.create(1300, metadata={"cart": "77"}, description="two mugs")
    client.wait_status(order["id"], "completed", timeout=40)
    (body,) = callback_bodies(receiver, "/hooks/body")
    assert body["data"]["metadata"] == {"cart": "77"}
    assert body["data"]["description"] == "two mugs"
    assert body["data"]["channel"] == "sandbox-a"
