"""The sandbox provider over real HTTP and PostgreSQL: every row of SPEC 5's table, idempotency, webhooks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.sandbox_server.dispatcher import backoff_seconds
from gateway.sandbox_server.secrets import DEFAULT_MASTER_SECRET, channel_webhook_secret

from .conftest import (
    MASTER_SECRET,
    SLOW_SECONDS,
    Receiver,
    Sandbox,
    database_url_for,
    free_port,
    run_sandbox,
    running_receiver,
    wait_until,
)

CHANNEL_A = "sandbox-a"
CHANNEL_B = "sandbox-b"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def charge_body(
    amount: int, *, order_id: str, channel: str = CHANNEL_A, webhook_url: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"channel": channel, "order_id": order_id, "amount": amount, "currency": "USD"}
    if webhook_url is not None:
        body["webhook_url"] = webhook_url
    return body


def post_charge(
    sandbox: Sandbox, body: dict[str, Any], *, key: str | None, timeout: float = 5.0
) -> requests.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return requests.post(sandbox.url("/v1/charges"), json=body, headers=headers, timeout=timeout)


def get_status(sandbox: Sandbox, key: str) -> requests.Response:
    return sandbox.session.get(sandbox.url("/v1/charges"), params={"idempotency_key": key}, timeout=5)


def verify(body: bytes, headers: dict[str, str], channel: str) -> dict[str, Any]:
    return Webhook(channel_webhook_secret(channel, MASTER_SECRET)).verify(body, headers)


# --- basics ---------------------------------------------------------------------------------------------


def test_healthz(sandbox: Sandbox) -> None:
    response = sandbox.session.get(sandbox.url("/healthz"), timeout=5)

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_unknown_path_is_json_404(sandbox: Sandbox) -> None:
    response = sandbox.session.get(sandbox.url("/nope"), timeout=5)

    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "not_found"


def test_wrong_method_is_json_405(sandbox: Sandbox) -> None:
    response = sandbox.session.delete(sandbox.url("/v1/charges"), timeout=5)

    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_status_query_of_unknown_key_is_404(sandbox: Sandbox) -> None:
    response = get_status(sandbox, new_id("missing"))

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_status_query_without_key_is_400(sandbox: Sandbox) -> None:
    response = sandbox.session.get(sandbox.url("/v1/charges"), timeout=5)

    assert response.status_code == 400


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "raw_body", "code"),
    [
        (
            {},
            json.dumps({"channel": "sandbox-a", "amount": 1000, "currency": "USD"}),
            "missing_idempotency_key",
        ),
        ({"Idempotency-Key": "k"}, "{not json", "invalid_json"),
        ({"Idempotency-Key": "k"}, json.dumps([1, 2]), "invalid_request"),
        ({"Idempotency-Key": "k"}, json.dumps({"amount": 1000, "currency": "USD"}), "invalid_request"),
        ({"Idempotency-Key": "k"}, json.dumps({"channel": "a", "amount": "1000", "currency": "USD"}), None),
        ({"Idempotency-Key": "k"}, json.dumps({"channel": "a", "amount": 10.5, "currency": "USD"}), None),
        ({"Idempotency-Key": "k"}, json.dumps({"channel": "a", "amount": True, "currency": "USD"}), None),
        ({"Idempotency-Key": "k"}, json.dumps({"channel": "a", "amount": -100, "currency": "USD"}), None),
        ({"Idempotency-Key": "k"}, json.dumps({"channel": "a", "amount": 100, "currency": "DOLLARS"}), None),
        (
            {"Idempotency-Key": "k"},
            json.dumps({"channel": "a", "amount": 100, "currency": "USD", "webhook_url": "ftp://x"}),
            None,
        ),
    ],
    ids=[
        "missing-key",
        "bad-json",
        "not-an-object",
        "missing-channel",
        "string-amount",
        "float-amount",
        "bool-amount",
        "negative-amount",
        "bad-currency",
        "bad-webhook-url",
    ],
)
def test_bad_input_is_400_and_charges_nothing(
    sandbox: Sandbox, headers: dict[str, str], raw_body: str, code: str | None
) -> None:
    # given: an order id of its own, so the ledger check sees only this request
    order_id = new_id("ord")
    payload = raw_body.replace('"currency"', f'"order_id": "{order_id}", "currency"', 1)
    headers = {**headers, "Content-Type": "application/json"}
    if "Idempotency-Key" in headers:
        headers["Idempotency-Key"] = new_id("key")

    # when
    response = requests.post(sandbox.url("/v1/charges"), data=payload, headers=headers, timeout=5)

    # then
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == (code or "invalid_request")
    assert sandbox.ledger(order_id) == []


_GARBAGE_QUERIES = [
    "/sandbox/charges?order=%00",
    "/sandbox/refunds?order=%00",
    "/v1/charges?idempotency_key=%00",
    "/v1/refunds?idempotency_key=%00",
    "/sandbox/charges?order=%ED%A0%80",
    "/sandbox/charges?order=" + "x" * 3000,
]


@pytest.mark.parametrize("path", _GARBAGE_QUERIES, ids=range(len(_GARBAGE_QUERIES)))
def test_a_query_the_database_cannot_hold_is_a_400_or_nothing_found(sandbox: Sandbox, path: str) -> None:
    # PostgreSQL text cannot hold a NUL: such a query never reaches it
    response = sandbox.session.get(sandbox.url(path), timeout=5)

    assert response.status_code in (200, 400, 404), response.text
    assert response.headers["Content-Type"] == "application/json"


_GARBAGE_BODIES = {
    "nested-5000-deep": "[" * 5000,
    "nul-in-order-id": '{"amount": 100, "currency": "USD", "order_id": "a\\u0000b", "channel": "sandbox-a"}',
    "lone-surrogate-in-channel": '{"amount": 100, "currency": "USD", "order_id": "o", "channel": "\\ud800"}',
    "nul-in-webhook-url": '{"amount": 100, "currency": "USD", "order_id": "o", "channel": "sandbox-a",'
    ' "webhook_url": "http://x/\\u0000"}',
    "nul-in-charge-key": '{"amount": 100, "charge_idempotency_key": "k\\u0000"}',
}


@pytest.mark.parametrize("path", ["/v1/charges", "/v1/refunds"])
@pytest.mark.parametrize("name", list(_GARBAGE_BODIES))
def test_a_body_the_database_cannot_hold_is_a_400(sandbox: Sandbox, path: str, name: str) -> None:
    response = sandbox.session.post(
        sandbox.url(path),
        data=_GARBAGE_BODIES[name],
        headers={"Idempotency-Key": new_id("key"), "Content-Type": "application/json"},
        timeout=5,
    )

    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in ("invalid_json", "invalid_request")


# --- outcomes by amount ---------------------------------------------------------------------------------


def test_paid_charge_pending_then_paid_with_one_signed_webhook(sandbox: Sandbox, receiver: Receiver) -> None:
    # given
    order_id, key, hook = new_id("ord"), new_id("key"), new_id("hook")

    # when
    created = post_charge(
        sandbox, charge_body(12_345 * 100 + 7, order_id=order_id, webhook_url=receiver.url(hook)), key=key
    )
    right_after = get_status(sandbox, key)

    # then: accepted and still pending until the delay has passed
    assert created.status_code == 201, created.text
    charge = created.json()
    assert charge["id"].startswith("ch_")
    assert charge["status"] == "pending"
    assert charge["failure_code"] is None
    assert {k: charge[k] for k in ("channel", "order_id", "idempotency_key", "amount", "currency")} == {
        "channel": CHANNEL_A,
        "order_id": order_id,
        "idempotency_key": key,
        "amount": 1_234_507,
        "currency": "USD",
    }
    assert right_after.json()["status"] == "pending"

    # then: one webhook, not before the delay, correctly signed, carrying the final state
    (sent,) = sandbox.settled_webhooks(receiver.url(hook))
    assert sent["status"] == "sent"
    assert sent["sent_at"] >= sent["final_at"]  # the sandbox's own record: not before the charge was final
    (delivery,) = receiver.received(hook)
    assert delivery.headers["webhook-id"] == sent["msg_id"]
    assert delivery.headers["webhook-id"].startswith("msg_")
    event = verify(delivery.body, delivery.headers, CHANNEL_A)
    assert event["type"] == "charge.paid"
    assert event["data"] == {**charge, "status": "paid"}
    assert get_status(sandbox, key).json()["status"] == "paid"

    # then: exactly one ledger entry
    (entry,) = sandbox.ledger(order_id)
    assert entry["id"] == charge["id"]
    assert entry["status"] == "paid"
    assert entry["channel"] == CHANNEL_A
    assert entry["idempotency_key"] == key


def test_webhook_signature_is_per_channel(sandbox: Sandbox, receiver: Receiver) -> None:
    order_id, hook = new_id("ord"), new_id("hook")
    post_charge(
        sandbox,
        charge_body(1000, order_id=order_id, channel=CHANNEL_B, webhook_url=receiver.url(hook)),
        key=new_id("key"),
    )

    (delivery,) = receiver.wait_for(hook, 1)

    assert verify(delivery.body, delivery.headers, CHANNEL_B)["type"] == "charge.paid"
    with pytest.raises(WebhookVerificationError):
        verify(delivery.body, delivery.headers, CHANNEL_A)
    with pytest.raises(WebhookVerificationError):
        Webhook(channel_webhook_secret(CHANNEL_B, DEFAULT_MASTER_SECRET)).verify(
            delivery.body, delivery.headers
        )


@pytest.mark.parametrize(("amount", "failure_code"), [(5051, "card_declined"), (5052, "insufficient_funds")])
def test_declined_charges_fail_with_their_code(
    sandbox: Sandbox, receiver: Receiver, amount: int, failure_code: str
) -> None:
    order_id, key, hook = new_id("ord"), new_id("key"), new_id("hook")

    created = post_charge(
        sandbox, charge_body(amount, order_id=order_id, webhook_url=receiver.url(hook)), key=key
    )

    assert created.status_code == 201
    assert created.json()["status"] == "pending"
    (delivery,) = receiver.wait_for(hook, 1)
    event = verify(delivery.body, delivery.headers, CHANNEL_A)
    assert event["type"] == "charge.failed"
    assert event["data"]["status"] == "failed"
    assert event["data"]["failure_code"] == failure_code
    status = get_status(sandbox, key).json()
    assert (status["status"], status["failure_code"]) == ("failed", failure_code)
    (entry,) = sandbox.ledger(order_id)
    assert (entry["status"], entry["failure_code"]) == ("failed", failure_code)


def test_61_is_paid_but_never_sends_a_webhook(sandbox: Sandbox, receiver: Receiver) -> None:
    order_id, key, hook = new_id("ord"), new_id("key"), new_id("hook")

    created = post_charge(
        sandbox, charge_body(2061, order_id=order_id, webhook_url=receiver.url(hook)), key=key
    )

    assert created.status_code == 201
    assert get_status(sandbox, key).json()["status"] == "pending"
    wait_until(lambda: get_status(sandbox, key).json()["status"] == "paid", timeout=3)
    # the sandbox queues a charge's webhooks with the charge: none queued, none will ever be sent
    assert sandbox.webhooks_to(receiver.url(hook)) == []
    assert receiver.received(hook) == []
    assert len(sandbox.ledger(order_id)) == 1


def test_62_times_out_but_charges_exactly_once(sandbox: Sandbox, receiver: Receiver) -> None:
    # given
    order_id, key, hook = new_id("ord"), new_id("key"), new_id("hook")
    body = charge_body(3062, order_id=order_id, webhook_url=receiver.url(hook))

    # when: the client gives up long before the sandbox answers
    with pytest.raises(requests.exceptions.ReadTimeout):
        post_charge(sandbox, body, key=key, timeout=0.5)

    # then: the charge was made anyway, once
    (entry,) = sandbox.ledger(order_id)
    assert entry["amount"] == 3062

    # when: the client retries with the same key
    replay = post_charge(sandbox, body, key=key)

    # then: the replay's answer (200, not the slow path's 201: only a new charge is held back),
    # same charge, still one ledger entry
    assert replay.status_code == 200
    assert replay.json()["id"] == entry["id"]
    assert len(sandbox.ledger(order_id)) == 1

    # then: it ends paid, with the usual webhook
    (delivery,) = receiver.wait_for(hook, 1)
    assert verify(delivery.body, delivery.headers, CHANNEL_A)["type"] == "charge.paid"
    assert get_status(sandbox, key).json()["status"] == "paid"


def test_62_holds_the_first_answer_while_the_charge_is_already_made(sandbox: Sandbox) -> None:
    order_id, key = new_id("ord"), new_id("key")

    # when: the first request is under way
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            post_charge, sandbox, charge_body(62, order_id=order_id), key=key, timeout=SLOW_SECONDS + 30
        )
        # then: the charge is in the ledger while its request is still unanswered (an order of
        # events, not a stopwatch: the sandbox holds the answer for SLOW_SECONDS after the commit)
        wait_until(lambda: sandbox.ledger(order_id))
        assert not answer.done()
        response = answer.result()

    assert response.status_code == 201
    assert len(sandbox.ledger(order_id)) == 1


def test_71_first_channel_unavailable_then_other_channel_pays(sandbox: Sandbox, receiver: Receiver) -> None:
    order_id, hook = new_id("ord"), new_id("hook")
    body_a = charge_body(4071, order_id=order_id, channel=CHANNEL_A, webhook_url=receiver.url(hook))
    body_b = charge_body(4071, order_id=order_id, channel=CHANNEL_B, webhook_url=receiver.url(hook))

    # when: the first channel asked for this order
    first = post_charge(sandbox, body_a, key=new_id("key"))
    # then: definitive 503, nothing charged
    assert first.status_code == 503
    assert first.json()["error"]["code"] == "channel_unavailable"
    assert sandbox.ledger(order_id) == []

    # when: the same channel is retried with the same or another key: it stays the "first" channel
    assert post_charge(sandbox, body_a, key=new_id("key")).status_code == 503

    # when: another channel is asked
    key_b = new_id("key")
    second = post_charge(sandbox, body_b, key=key_b)
    # then: it accepts and the charge ends paid
    assert second.status_code == 201, second.text
    (entry,) = sandbox.ledger(order_id)
    assert entry["channel"] == CHANNEL_B
    (delivery,) = receiver.wait_for(hook, 1)
    assert verify(delivery.body, delivery.headers, CHANNEL_B)["data"]["status"] == "paid"
    assert get_status(sandbox, key_b).json()["status"] == "paid"

    # then: the first channel is still remembered afterwards
    assert post_charge(sandbox, body_a, key=new_id("key")).status_code == 503
    assert len(sandbox.ledger(order_id)) == 1


def test_71_concurrent_first_requests_pick_exactly_one_first_channel(sandbox: Sandbox) -> None:
    order_id = new_id("ord")
    channels = [f"sandbox-{i}" for i in range(6)]
    barrier = threading.Barrier(len(channels))

    def ask(channel: str) -> int:
        barrier.wait()
        return post_charge(
            sandbox, charge_body(71, order_id=order_id, channel=channel), key=new_id("key")
        ).status_code

    with ThreadPoolExecutor(len(channels)) as pool:
        statuses = list(pool.map(ask, channels))

    assert sorted(statuses) == [201] * (len(channels) - 1) + [503]
    assert len(sandbox.ledger(order_id)) == len(channels) - 1


def test_72_every_channel_unavailable_and_nothing_charged(sandbox: Sandbox, receiver: Receiver) -> None:
    order_id, hook = new_id("ord"), new_id("hook")
    keys = [new_id("key") for _ in range(3)]

    responses = [
        post_charge(
            sandbox,
            charge_body(7072, order_id=order_id, channel=channel, webhook_url=receiver.url(hook)),
            key=key,
        )
        for channel, key in zip([CHANNEL_A, CHANNEL_B, "sandbox-c"], keys, strict=True)
    ]

    assert [r.status_code for r in responses] == [503, 503, 503]
    assert all(r.json()["error"]["code"] == "channel_unavailable" for r in responses)
    assert sandbox.ledger(order_id) == []
    assert all(get_status(sandbox, key).status_code == 404 for key in keys)
    # no charge, so no webhook queued: nothing will ever be sent
    assert sandbox.webhooks_to(receiver.url(hook)) == []
    assert receiver.received(hook) == []


def test_81_sends_paid_three_times_then_a_late_failed(sandbox: Sandbox, receiver: Receiver) -> None:
    # given
    order_id, key, hook = new_id("ord"), new_id("key"), new_id("hook")

    # when
    created = post_charge(
        sandbox, charge_body(8081, order_id=order_id, webhook_url=receiver.url(hook)), key=key
    )

    # then: four distinct, signed messages in order: paid, paid, paid, failed
    assert created.status_code == 201
    deliveries = receiver.wait_for(hook, 4)
    events = [verify(d.body, d.headers, CHANNEL_A) for d in deliveries]
    assert [e["type"] for e in events] == ["charge.paid"] * 3 + ["charge.failed"]
    assert [e["data"]["status"] for e in events] == ["paid"] * 3 + ["failed"]
    assert events[-1]["data"]["failure_code"] == "card_declined"
    assert len({d.headers["webhook-id"] for d in deliveries}) == 4
    assert all(e["data"]["id"] == created.json()["id"] for e in events)
    # then: the truth is still paid, and only one charge was made
    status = get_status(sandbox, key).json()
    assert (status["status"], status["failure_code"]) == ("paid", None)
    assert len(sandbox.ledger(order_id)) == 1
    # and nothing else comes: the sandbox has settled every message it queued, each sent once
    settled = sandbox.settled_webhooks(receiver.url(hook))
    assert [(row["status"], row["attempts"]) for row in settled] == [("sent", 1)] * 4
    assert len(receiver.received(hook)) == 4


def test_81_order_holds_when_the_receiver_fails_first(sandbox: Sandbox, receiver: Receiver) -> None:
    # given: the first delivery to this receiver fails, so the first paid message is retried after 1 s
    order_id, hook = new_id("ord"), new_id("hook")
    receiver.fail_first[f"/hooks/{hook}"] = 1

    post_charge(
        sandbox, charge_body(81, order_id=order_id, webhook_url=receiver.url(hook)), key=new_id("key")
    )

    # then: nothing overtakes the retried message
    deliveries = receiver.wait_for(hook, 5, timeout=8)
    accepted = [d for d in deliveries if d.answered == 200]
    types = [json.loads(d.body)["type"] for d in accepted]
    assert types == ["charge.paid"] * 3 + ["charge.failed"]
    assert deliveries[0].headers["webhook-id"] == deliveries[1].headers["webhook-id"]


# --- idempotency ----------------------------------------------------------------------------------------


def test_repeated_key_returns_the_same_charge_and_charges_once(sandbox: Sandbox, receiver: Receiver) -> None:
    order_id, key, hook = new_id("ord"), new_id("key"), new_id("hook")
    body = charge_body(1500, order_id=order_id, webhook_url=receiver.url(hook))

    first = post_charge(sandbox, body, key=key)
    second = post_charge(sandbox, body, key=key)

    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["id"] == first.json()["id"]
    assert len(sandbox.ledger(order_id)) == 1
    receiver.wait_for(hook, 1)
    # a replay after the delay shows the final status
    third = post_charge(sandbox, body, key=key)
    assert (third.status_code, third.json()["status"]) == (200, "paid")
    (sent,) = sandbox.settled_webhooks(receiver.url(hook))
    assert (sent["status"], sent["attempts"]) == ("sent", 1)
    assert len(receiver.received(hook)) == 1
    assert len(sandbox.ledger(order_id)) == 1


def test_same_key_with_different_body_is_422(sandbox: Sandbox) -> None:
    order_id, key = new_id("ord"), new_id("key")
    assert post_charge(sandbox, charge_body(1500, order_id=order_id), key=key).status_code == 201

    response = post_charge(sandbox, charge_body(1600, order_id=order_id), key=key)

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "idempotency_key_reused"
    (entry,) = sandbox.ledger(order_id)
    assert entry["amount"] == 1500


def test_concurrent_identical_requests_make_one_charge(sandbox: Sandbox, receiver: Receiver) -> None:
    # given
    order_id, key, hook = new_id("ord"), new_id("key"), new_id("hook")
    body = charge_body(2500, order_id=order_id, webhook_url=receiver.url(hook))
    barrier = threading.Barrier(10)

    def send(_: int) -> requests.Response:
        barrier.wait()
        return post_charge(sandbox, body, key=key)

    # when
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(send, range(10)))

    # then
    assert sorted(r.status_code for r in responses) == [200] * 9 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(sandbox.ledger(order_id)) == 1
    (sent,) = sandbox.settled_webhooks(receiver.url(hook))
    assert (sent["status"], sent["attempts"]) == ("sent", 1)
    assert len(receiver.received(hook)) == 1


# --- webhook delivery -----------------------------------------------------------------------------------


def test_webhook_is_retried_after_a_500(sandbox: Sandbox, receiver: Receiver) -> None:
    # given: the receiver answers 500 to the first attempt
    order_id, hook = new_id("ord"), new_id("hook")
    receiver.fail_first[f"/hooks/{hook}"] = 1

    # when
    post_charge(
        sandbox, charge_body(1000, order_id=order_id, webhook_url=receiver.url(hook)), key=new_id("key")
    )

    # then: the sandbox made two attempts and stopped; the receiver saw exactly those, same
    # message id, valid signature (the spacing is backoff_seconds', tested below)
    (sent,) = sandbox.settled_webhooks(receiver.url(hook))
    assert (sent["status"], sent["attempts"], sent["last_http_status"]) == ("sent", 2, 200)
    first, second = receiver.received(hook)
    assert (first.answered, second.answered) == (500, 200)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == sent["msg_id"]
    assert verify(second.body, second.headers, CHANNEL_A)["type"] == "charge.paid"


def test_webhook_reaches_a_receiver_that_was_down(sandbox: Sandbox) -> None:
    # given: a receiver whose port refuses connections until it is started
    with running_receiver(activate=False) as late:
        hook = new_id("hook")
        post_charge(
            sandbox, charge_body(1000, order_id=new_id("ord"), webhook_url=late.url(hook)), key=new_id("key")
        )
        # the sandbox's record shows an attempt that failed against the closed port
        wait_until(
            lambda: [
                row
                for row in sandbox.webhooks_to(late.url(hook))
                if row["status"] == "pending" and row["attempts"] >= 1 and row["last_error"]
            ]
        )
        assert late.received(hook) == []

        # when
        late.start()  # type: ignore[attr-defined]

        # then: a later retry gets through
        (delivery,) = late.wait_for(hook, 1, timeout=6)
        assert verify(delivery.body, delivery.headers, CHANNEL_A)["type"] == "charge.paid"


def test_backoff_doubles() -> None:
    assert [backoff_seconds(n) for n in range(1, 6)] == [1, 2, 4, 8, 16]


# --- ledger and state -----------------------------------------------------------------------------------


def test_ledger_without_order_lists_recent_entries(sandbox: Sandbox) -> None:
    order_id, key = new_id("ord"), new_id("key")
    charge_id = post_charge(sandbox, charge_body(1000, order_id=order_id), key=key).json()["id"]

    response = sandbox.session.get(sandbox.url("/sandbox/charges"), timeout=5)

    assert response.status_code == 200
    entries = response.json()
    assert entries[0]["id"] == charge_id  # newest first
    assert set(entries[0]) == {
        "id",
        "order_id",
        "channel",
        "idempotency_key",
        "amount",
        "currency",
        "status",
        "failure_code",
        "created_at",
    }
    assert len(entries) <= 1000


def test_state_is_shared_with_another_server_on_the_same_database(
    sandbox: Sandbox, sandbox_db: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # given: a charge made through the running server
    order_id, key = new_id("ord"), new_id("key")
    body = charge_body(1000, order_id=order_id)
    created = post_charge(sandbox, body, key=key)

    # when: a second server starts on the same database (as after a restart)
    log_path = tmp_path_factory.mktemp("sandbox-second") / "gunicorn.log"
    with run_sandbox(database_url_for(sandbox_db), log_path, free_port()) as other:
        replay = post_charge(other, body, key=key)
        ledger = other.ledger(order_id)

    # then: it knows the charge and does not make a second one
    assert replay.status_code == 200
    assert replay.json()["id"] == created.json()["id"]
    assert len(ledger) == 1


# --- secrets --------------------------------------------------------------------------------------------


def test_channel_secret_is_hmac_of_channel_under_master() -> None:
    expected_key = hmac.new(b"master", b"sandbox-a", hashlib.sha256).digest()

    secret = channel_webhook_secret("sandbox-a", "master")

    assert secret == "whsec_" + base64.b64encode(expected_key).decode()
    assert channel_webhook_secret("sandbox-b", "master") != secret


def test_channel_secret_defaults_to_env_then_dev_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_SECRET", "from-env")
    assert channel_webhook_secret("sandbox-a") == channel_webhook_secret("sandbox-a", "from-env")

    monkeypatch.delenv("SANDBOX_SECRET")
    assert channel_webhook_secret("sandbox-a") == channel_webhook_secret("sandbox-a", DEFAULT_MASTER_SECRET)


def test_the_adapter_and_the_sandbox_derive_the_same_channel_secret():
    # given: the sandbox's derivation and the gateway's copy of it (the adapter may not import the
    # sandbox, a stand-in for a third party)
    from gateway.providers.sandbox import sandbox_channel_secret

    # then: they agree for any channel and master secret, and differ between channels
    for code, master in (("sandbox-primary", "sandbox-dev-secret"), ("x_1", "another master")):
        assert sandbox_channel_secret(code, master) == channel_webhook_secret(code, master)
    assert sandbox_channel_secret("a", "m") != sandbox_channel_secret("b", "m")
