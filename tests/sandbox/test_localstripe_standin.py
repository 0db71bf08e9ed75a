"""Our localstripe (gateway/sandbox_server/localstripe.py) honours `Idempotency-Key` as Stripe does.

localstripe itself ignores the header: a create sent again after a lost answer made a second
PaymentIntent (a black-box audit saw an order charged twice on this stack). Run as the dev stack
runs it, over real HTTP, with the official library's form encoding.
"""

import os
import subprocess
import sys

import pytest
import requests

from tests.sandbox.conftest import free_port, wait_until

AUTH = {"Authorization": "Bearer sk_test_localstripe"}
INTENT = {
    "amount": "1050",
    "currency": "usd",
    "payment_method": "pm_card_visa",
    "payment_method_types[0]": "card",
    "confirm": "true",
    "metadata[attempt]": "order-1:stripe-test",
}


@pytest.fixture(scope="module")
def localstripe():
    port = free_port()
    env = {**os.environ, "LOCALSTRIPE_BIND": f"127.0.0.1:{port}", "PUBLIC_BASE_URL": "http://127.0.0.1:9"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.sandbox_server.localstripe"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return requests.get(f"{url}/v1/charges", headers=AUTH, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(answers, timeout=30)
        yield url
    finally:
        process.kill()
        process.wait(10)


def _post(url: str, path: str, data: dict, key: str) -> requests.Response:
    return requests.post(f"{url}{path}", data=data, headers={**AUTH, "Idempotency-Key": key}, timeout=10)


def _intents(url: str) -> list[str]:
    listed = requests.get(f"{url}/v1/payment_intents", params={"limit": 100}, headers=AUTH, timeout=10)
    return [intent["id"] for intent in listed.json()["data"]]


def test_a_create_sent_again_under_its_key_gets_the_first_answer_not_a_second_object(localstripe):
    # given a PaymentIntent created under a key
    before = set(_intents(localstripe))
    first = _post(localstripe, "/v1/payment_intents", INTENT, key="charge-key-1")
    assert first.status_code == 200 and first.json()["status"] == "succeeded"
    # when the same request is sent again (the first answer was lost)
    again = _post(localstripe, "/v1/payment_intents", INTENT, key="charge-key-1")
    # then it is the first answer, replayed, and localstripe holds one PaymentIntent, not two
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert set(_intents(localstripe)) - before == {first.json()["id"]}
    # and a refund sent twice under its key is one refund
    refund = {"payment_intent": first.json()["id"], "amount": "400", "metadata[attempt]": "refund:1"}
    refunds = [_post(localstripe, "/v1/refunds", refund, key="refund:1").json() for _ in range(2)]
    assert refunds[0] == refunds[1]
    listed = requests.get(
        f"{localstripe}/v1/refunds", params={"payment_intent": first.json()["id"]}, headers=AUTH, timeout=10
    ).json()["data"]
    assert [r["id"] for r in listed] == [refunds[0]["id"]]


def test_a_key_is_the_accounts_so_a_rotated_api_key_still_gets_the_first_answer(localstripe):
    # the channel's API key rotated between a lost answer and the poll's resend (before: a second
    # PaymentIntent, the order charged twice)
    first = _post(localstripe, "/v1/payment_intents", INTENT, key="charge-key-3").json()
    rotated = requests.post(
        f"{localstripe}/v1/payment_intents",
        data=INTENT,
        headers={"Authorization": "Bearer sk_test_rotated", "Idempotency-Key": "charge-key-3"},
        timeout=10,
    )
    assert rotated.json() == first and rotated.headers["Idempotent-Replayed"] == "true"


def test_a_request_refused_before_anything_was_made_leaves_its_key_unused(localstripe):
    refused = _post(localstripe, "/v1/payment_intents", {**INTENT, "amount": "abc"}, key="charge-key-4")
    assert refused.status_code == 400
    made = _post(localstripe, "/v1/payment_intents", INTENT, key="charge-key-4")
    assert made.status_code == 200 and made.json()["status"] == "succeeded"


def test_a_key_used_with_other_parameters_is_refused_as_stripe_does(localstripe):
    _post(localstripe, "/v1/payment_intents", INTENT, key="charge-key-2")
    other = _post(localstripe, "/v1/payment_intents", {**INTENT, "amount": "999"}, key="charge-key-2")
    assert other.status_code == 400 and other.json()["error"]["type"] == "idempotency_error"
