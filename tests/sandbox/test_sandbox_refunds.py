"""The sandbox's refunds over real HTTP and PostgreSQL: every row of SPEC 10's table, the 400 past
what was charged, idempotency, signed webhooks and the refund ledger."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from standardwebhooks.webhooks import Webhook

from gateway.sandbox_server.secrets import channel_webhook_secret

from .conftest import MASTER_SECRET, SLOW_SECONDS, Receiver, Sandbox, wait_until

CHANNEL = "sandbox-a"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def paid_charge(sandbox: Sandbox, amount: int = 10_000) -> tuple[str, str]:
    """(order id, charge key) of a charge the sandbox made and settles as paid."""
    order_id, key = new_id("ord"), new_id("chk")
    body = {"channel": CHANNEL, "order_id": order_id, "amount": amount, "currency": "USD"}
    response = requests.post(
        sandbox.url("/v1/charges"), json=body, headers={"Idempotency-Key": key}, timeout=5
    )
    assert response.status_code == 201, response.text
    return order_id, key


def refund(
    sandbox: Sandbox,
    charge_key: str,
    amount: Any,
    *,
    key: str | None = None,
    webhook_url: str | None = None,
    timeout: float = 5.0,
) -> requests.Response:
    body: dict[str, Any] = {"charge_idempotency_key": charge_key, "amount": amount}
    if webhook_url:
        body["webhook_url"] = webhook_url
    headers = {"Idempotency-Key": key or new_id("rfk")}
    return requests.post(sandbox.url("/v1/refunds"), json=body, headers=headers, timeout=timeout)


def refund_ledger(sandbox: Sandbox, order_id: str) -> list[dict[str, Any]]:
    response = sandbox.session.get(sandbox.url("/sandbox/refunds"), params={"order": order_id}, timeout=5)
    assert response.status_code == 200
    return response.json()


def refund_status(sandbox: Sandbox, key: str) -> dict[str, Any]:
    response = sandbox.session.get(sandbox.url("/v1/refunds"), params={"idempotency_key": key}, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(
    ("amount", "webhook", "final", "failure_code", "ledger"),
    [(1000, "refund.succeeded", "succeeded", None, 1), (1049, "refund.succeeded", "succeeded", None, 1),
     (1051, "refund.failed", "failed", "refund_declined", 0), (1061, None, "succeeded", None, 1)],
)  # fmt: skip
def test_refund_rows(
    sandbox: Sandbox, receiver: Receiver, amount, webhook, final, failure_code, ledger
) -> None:
    # given
    order_id, charge_key = paid_charge(sandbox)
    key, hook = new_id("rfk"), new_id("hook")
    # when
    created = refund(sandbox, charge_key, amount, key=key, webhook_url=receiver.url(hook))
    # then
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "pending"
    assert created.json()["order_id"] == order_id and created.json()["channel"] == CHANNEL
    wait_until(lambda: refund_status(sandbox, key)["status"] == final)
    assert refund_status(sandbox, key)["failure_code"] == failure_code
    assert len(refund_ledger(sandbox, order_id)) == ledger
    if webhook is None:
        assert (
            sandbox.query("SELECT 1 FROM sandbox_webhooks WHERE url = %(u)s", {"u": receiver.url(hook)}) == []
        )
        return
    (delivery,) = receiver.wait_for(hook, 1)
    event = Webhook(channel_webhook_secret(CHANNEL, MASTER_SECRET)).verify(delivery.body, delivery.headers)
    assert event["type"] == webhook
    assert event["data"]["idempotency_key"] == key
    assert event["data"]["status"] == final and event["data"]["failure_code"] == failure_code


def test_refund_62_times_out_but_is_made_once(sandbox: Sandbox) -> None:
    order_id, charge_key = paid_charge(sandbox)
    key = new_id("rfk")
    with pytest.raises(requests.Timeout):
        refund(sandbox, charge_key, 1062, key=key, timeout=SLOW_SECONDS / 4)
    again = refund(sandbox, charge_key, 1062, key=key, timeout=SLOW_SECONDS * 3)
    assert again.status_code == 200
    wait_until(lambda: refund_status(sandbox, key)["status"] == "succeeded")
    assert [entry["idempotency_key"] for entry in refund_ledger(sandbox, order_id)] == [key]


def test_refund_72_first_request_503_nothing_refunded_retry_accepted(sandbox: Sandbox) -> None:
    order_id, charge_key = paid_charge(sandbox)
    key = new_id("rfk")
    first = refund(sandbox, charge_key, 1072, key=key)
    assert first.status_code == 503
    assert first.json()["error"]["code"] == "channel_unavailable"
    assert refund_ledger(sandbox, order_id) == []
    retry = refund(sandbox, charge_key, 1072, key=key)
    assert retry.status_code == 201
    assert len(refund_ledger(sandbox, order_id)) == 1


def test_refund_beyond_the_charge_is_400_and_declined_ones_free_their_share(sandbox: Sandbox) -> None:
    order_id, charge_key = paid_charge(sandbox, amount=3000)
    assert refund(sandbox, charge_key, 3001).json()["error"]["code"] == "amount_exceeds_charge"
    assert refund(sandbox, charge_key, 2000).status_code == 201
    assert refund(sandbox, charge_key, 951).status_code == 201  # declined: takes nothing in the end
    over = refund(sandbox, charge_key, 1001)
    assert over.status_code == 400
    assert over.json()["error"]["code"] == "amount_exceeds_charge"
    assert refund(sandbox, charge_key, 1000).status_code == 201
    assert sum(entry["amount"] for entry in refund_ledger(sandbox, order_id)) == 3000


def test_concurrent_refunds_never_exceed_the_charge(sandbox: Sandbox) -> None:
    order_id, charge_key = paid_charge(sandbox, amount=10_000)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: refund(sandbox, charge_key, 3000).status_code, range(8)))
    assert sorted(answers) == [201] * 3 + [400] * 5
    assert sum(entry["amount"] for entry in refund_ledger(sandbox, order_id)) == 9000


def test_refund_key_replays_and_refuses_another_body(sandbox: Sandbox) -> None:
    order_id, charge_key = paid_charge(sandbox)
    key = new_id("rfk")
    first = refund(sandbox, charge_key, 500, key=key)
    replay = refund(sandbox, charge_key, 500, key=key)
    other = refund(sandbox, charge_key, 600, key=key)
    assert (first.status_code, replay.status_code, other.status_code) == (201, 200, 422)
    assert replay.json()["id"] == first.json()["id"]
    assert len(refund_ledger(sandbox, order_id)) == 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [({"charge_idempotency_key": "nope", "amount": 100}, 404, "charge_not_found"),
     ({"amount": 100}, 400, "invalid_request"),
     ({"charge_idempotency_key": "k", "amount": 0}, 400, "invalid_request"),
     ({"charge_idempotency_key": "k", "amount": True}, 400, "invalid_request"),
     ({"charge_idempotency_key": "k", "amount": 1.5}, 400, "invalid_request")],
)  # fmt: skip
def test_bad_refund_requests(sandbox: Sandbox, body, status, code) -> None:
    response = requests.post(
        sandbox.url("/v1/refunds"), json=body, headers={"Idempotency-Key": new_id("rfk")}, timeout=5
    )
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_refund_of_a_failed_charge_is_refused(sandbox: Sandbox) -> None:
    order_id, charge_key = paid_charge(sandbox, amount=1051)
    response = refund(sandbox, charge_key, 100)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "charge_not_refundable"
    assert refund_ledger(sandbox, order_id) == []
