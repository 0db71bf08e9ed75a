"""Refunds through the real stack (SPEC 10): every row of the sandbox's refund table, a full refund,
three partial ones adding up, signed refund callbacks; the sandbox's refund ledger agrees with us."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from standardwebhooks.webhooks import Webhook

from tests.e2e.conftest import SANDBOX, WEB, Client, wait_for
from tests.factories import make_merchant

pytestmark = [pytest.mark.e2e]

# refund amount, end state, failure code, ledger entries (SPEC 10's table)
ROWS = [
    (1000, "succeeded", None, 1),
    (1049, "succeeded", None, 1),
    (1051, "failed", "refund_declined", 0),
    (1061, "succeeded", None, 1),  # no webhook: settled by polling
    (1062, "succeeded", None, 1),  # our request times out; the refund is made once
    (1072, "succeeded", None, 1),  # first request 503, nothing refunded; the retry is accepted
]


class RefundClient(Client):
    def refund(self, order_id: str, body: dict, *, key: str | None = None) -> requests.Response:
        return self.session.post(
            f"http://{WEB}/api/v1/orders/{order_id}/refunds",
            json=body,
            headers={"Idempotency-Key": key or f"rf-{time.monotonic_ns()}"},
            timeout=10,
        )

    def get_refund(self, refund_id: str) -> dict:
        return self.session.get(f"http://{WEB}/api/v1/refunds/{refund_id}", timeout=10).json()

    def wait_refund(self, refund_id: str, status: str, timeout: float = 40) -> dict:
        return wait_for(
            lambda: (r := self.get_refund(refund_id))["status"] == status and r, timeout, f"refund {status}"
        )

    def paid_order(self, amount: int) -> dict:
        order = self.create(amount)
        return self.wait_status(order["id"], "completed", timeout=40)


def refund_ledger(order_id: str) -> list[dict]:
    return requests.get(f"http://{SANDBOX}/sandbox/refunds", params={"order": order_id}, timeout=10).json()


def refund_callbacks(receiver, hook: str, secret: str) -> list[dict]:
    bodies = [Webhook(secret).verify(r["body"], r["headers"]) for r in receiver.received(hook)]
    return [body for body in bodies if body["type"].startswith("refund.")]


def test_every_row_of_the_refund_table(live, receiver):
    # given one paid order per row, each of a merchant whose callbacks answer 200
    creds = make_merchant(callback_url=receiver.url("/hooks/refund-rows"))
    client = RefundClient(creds.api_key)
    with ThreadPoolExecutor(len(ROWS)) as pool:
        orders = list(pool.map(lambda _: client.paid_order(10_000), ROWS))
        # when each is refunded with its row's amount
        created = [
            client.refund(order["id"], {"amount": row[0]}) for order, row in zip(orders, ROWS, strict=True)
        ]
        assert [r.status_code for r in created] == [201] * len(ROWS), [r.text for r in created]
        refunds = [r.json() for r in created]
        ends = list(
            pool.map(
                lambda pair: client.wait_refund(pair[0]["id"], pair[1][1]), zip(refunds, ROWS, strict=True)
            )
        )
    # then each ends as its row says, with exactly the ledger entries it says
    for order, refund, end, (amount, status, failure_code, entries) in zip(
        orders, refunds, ends, ROWS, strict=True
    ):
        assert (end["status"], end["failure_code"], end["amount"]) == (status, failure_code, amount)
        ledger = refund_ledger(order["id"])
        assert len(ledger) == entries, (amount, ledger)
        assert sum(e["amount"] for e in ledger) == client.get(order["id"])["amount_refunded"]
        path = [
            (e["from"], e["to"])
            for e in client.session.get(f"http://{WEB}/api/v1/refunds/{refund['id']}/events").json()
        ]
        assert path == [(None, "pending"), ("pending", "processing"), ("processing", status)], (amount, path)
    # and one signed callback per refund, of its end, carrying the refund object
    callbacks = wait_for(
        lambda: (
            len(got := refund_callbacks(receiver, "/hooks/refund-rows", creds.webhook_secret)) >= len(ROWS)
            and got
        ),
        30,
        "refund callbacks",
    )
    assert len(callbacks) == len(ROWS)
    by_refund = {body["data"]["id"]: body for body in callbacks}
    for refund, end in zip(refunds, ends, strict=True):
        assert by_refund[refund["id"]]["type"] == f"refund.{end['status']}"
        assert by_refund[refund["id"]]["data"]["status"] == end["status"]
        assert by_refund[refund["id"]]["data"]["order_id"] == refund["order_id"]


def test_a_full_refund_and_three_partial_ones_adding_up(live, receiver):
    creds = make_merchant(callback_url=receiver.url("/hooks/refund-sums"))
    client = RefundClient(creds.api_key)
    with ThreadPoolExecutor(2) as pool:
        full_order, split_order = pool.map(client.paid_order, (5000, 9000))
    # when: one refund of everything still refundable, and three of a third each
    full = client.refund(full_order["id"], {"reason": "requested_by_customer"}).json()
    parts = [
        client.refund(
            split_order["id"], {"amount": 3000, "reference": f"part-{i}-{time.monotonic_ns()}"}
        ).json()
        for i in range(3)
    ]
    refused = client.refund(split_order["id"], {"amount": 1})
    # then
    assert full["amount"] == 5000
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "amount_exceeds_refundable"
    for refund in [full, *parts]:
        client.wait_refund(refund["id"], "succeeded")
    for order, amount in ((full_order, 5000), (split_order, 9000)):
        body = client.get(order["id"])
        assert body["amount_refunded"] == amount
        assert body["status"] == "completed" and body["outcome"] == "paid"  # its own status stays
        ledger = refund_ledger(order["id"])
        assert sum(e["amount"] for e in ledger) == amount
        assert len({e["idempotency_key"] for e in ledger}) == len(ledger)
    listed = client.session.get(f"http://{WEB}/api/v1/orders/{split_order['id']}/refunds", timeout=10).json()
    assert [r["id"] for r in listed] == [r["id"] for r in parts]
    callbacks = wait_for(
        lambda: (
            len(got := refund_callbacks(receiver, "/hooks/refund-sums", creds.webhook_secret)) >= 4 and got
        ),
        30,
        "refund callbacks",
    )
    assert sorted(json.dumps(c["type"]) for c in callbacks) == ['"refund.succeeded"'] * 4
