"""Provider webhooks that must change nothing: forged, tampered, stale, future-dated, replayed
(SPEC 5, 7). Real commits, so a webhook that is accepted really hands off to the broker."""

import base64
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from rest_framework.test import APIClient
from standardwebhooks.webhooks import Webhook

from allocation import selectors
from allocation.models import PaymentChannel
from gateway import services, tasks
from gateway.models import ChargeAttempt, ProviderWebhook
from gateway.sandbox_server.secrets import channel_webhook_secret
from orders.models import IgnoredSignal, Order
from tests.database_down import database_restarting
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


# --- garbage on the endpoint: a clear 4xx JSON error, never a 500, nothing touched -------------------

_GARBAGE_BODIES = {
    "not JSON": b"not json",
    "5000 open brackets": b"[" * 5000,
    "5000 nested objects": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "NUL as the channel": b'{"data":{"channel":"\\u0000"}}',
    "NUL byte raw in the channel": b'{"data":{"channel":"a\x00b"}}',
    "not UTF-8": b'{"data":{"channel":"\xff\xfe"}}',
    "UTF-16": '{"data":{"channel":"sandbox-a"}}'.encode("utf-16"),
    "a list": b"[]",
    "a string": b'"sandbox-a"',
    "a number": b"1e999999",
    "data is a list": b'{"data":["sandbox-a"]}',
    "channel is a number": b'{"data":{"channel":5}}',
    "channel is an object": b'{"data":{"channel":{"code":"sandbox-a"}}}',
    "channel is too long": b'{"data":{"channel":"' + b"a" * 5000 + b'"}}',
    "channel is a lone surrogate": b'{"data":{"channel":"\\ud800"}}',
    "empty": b"",
}


@pytest.mark.parametrize("name", list(_GARBAGE_BODIES))
def test_a_webhook_body_that_names_no_channel_is_a_401_before_any_query(
    processing_order, redis_client, django_assert_num_queries, name
):
    body = _GARBAGE_BODIES[name]
    headers = signed_headers("x", secret=secret_of("sandbox-a"))
    # when: not even the channel table is read for a body that cannot name a channel
    with django_assert_num_queries(0):
        response = APIClient().post(URL, body, content_type="application/json", **headers)
    # then its signature cannot be checked against any channel's secret: a bad signature (SPEC 5),
    # whatever else is wrong with the body
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_signature"
    assert_nothing_changed(processing_order, redis_client)


@pytest.mark.parametrize(
    "body",
    [
        '{"type": "charge.succeeded", "order_id": "%(order)s", "status": "paid"}',
        '{"event": "payment.paid", "data": {"order_id": "%(order)s"}}',
        '{"type": "charge.paid", "data": {"channel": "sandbox-a", "order_id": "%(order)s"}}',
    ],
    ids=["no-data", "data-without-channel", "names-a-channel"],
)
def test_a_webhook_with_a_bad_signature_is_a_401_whatever_shape_its_body_has(
    processing_order, redis_client, body
):
    # given an event as someone who has not read our sandbox's format might write it, and a
    # signature made with a secret that is not the channel's
    body = body % {"order": processing_order.pk}
    headers = signed_headers(body, secret="whsec_" + base64.b64encode(b"not the channel's").decode())
    # when
    response = post(body, headers)
    # then
    assert response.status_code == 401, response.content
    assert response.json()["error"]["code"] == "invalid_signature"
    assert_nothing_changed(processing_order, redis_client)


def test_a_huge_webhook_body_is_a_413_json_error(processing_order, redis_client):
    body = event_body(processing_order)[:-1] + ',"pad":"' + "x" * (settings.MAX_REQUEST_BODY_BYTES) + '"}'
    response = post(body, signed_headers(body, secret=secret_of("sandbox-a")))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert_nothing_changed(processing_order, redis_client)


def test_a_get_on_the_webhook_endpoint_is_a_405_json_error(processing_order, redis_client):
    response = APIClient().get(URL)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def _signed_event(order, mutate) -> tuple[str, dict]:
    payload = json.loads(event_body(order))
    mutate(payload)
    body = json.dumps(payload)
    return body, signed_headers(body, secret=secret_of("sandbox-a"))


_SIGNED_BUT_MALFORMED = {
    "unknown event type": lambda p: p.update(type="charge.refunded"),
    "type is a list": lambda p: p.update(type=["charge.paid"]),
    "order_id is an object": lambda p: p["data"].update(order_id={"id": 1}),
    "order_id missing": lambda p: p["data"].pop("order_id"),
    "idempotency_key is a number": lambda p: p["data"].update(idempotency_key=5),
    "idempotency_key is too long": lambda p: p["data"].update(idempotency_key="k" * 500),
    "failure_code is a list": lambda p: p["data"].update(failure_code=["card_declined"]),
    "failure_code holds NUL": lambda p: p["data"].update(failure_code="card\x00declined"),
    "NUL deep in the payload": lambda p: p.update(extra={"list": [1, {"k": "a\x00b"}]}),
    "NUL in a key": lambda p: p.update({"k\x00": 1}),
    "lone surrogate in the payload": lambda p: p.update(extra="\ud800"),
    "NaN in the payload": lambda p: p["data"].update(amount=float("nan")),
    "Infinity in the payload": lambda p: p["data"].update(amount=float("inf")),
}


@pytest.mark.parametrize("name", list(_SIGNED_BUT_MALFORMED))
def test_a_signed_webhook_of_the_wrong_shape_is_a_400_and_changes_nothing(
    processing_order, redis_client, name
):
    body, headers = _signed_event(processing_order, _SIGNED_BUT_MALFORMED[name])
    response = post(body, headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_body"
    assert_nothing_changed(processing_order, redis_client)


def test_a_signed_webhook_with_a_number_out_of_range_is_a_400(processing_order, redis_client):
    body = event_body(processing_order).replace('"amount":1050', '"amount":1e999')
    assert '"amount":1e999' in body
    response = post(body, signed_headers(body, secret=secret_of("sandbox-a")))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_body"
    assert_nothing_changed(processing_order, redis_client)


def test_a_signed_webhook_with_an_overlong_id_is_a_400(processing_order, redis_client):
    body = event_body(processing_order)
    response = post(body, signed_headers(body, secret=secret_of("sandbox-a"), msg_id="m" * 500))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_body"
    assert_nothing_changed(processing_order, redis_client)


def test_channel_codes_that_name_no_channel_are_never_cached(processing_order, redis_client):
    # given: the cache holds the one channel a genuine webhook named
    body = event_body(processing_order)
    assert post(body, signed_headers(body, secret=secret_of("sandbox-a"), msg_id="msg_ok")).status_code == 200
    assert set(selectors._cache) == {"sandbox-a"}
    # when: an unauthenticated sender names more channels that do not exist than the cache holds
    for n in range(selectors._CACHE_MAX + 10):
        forged = event_body(processing_order, channel=f"nope-{n}")
        response = post(forged, signed_headers(forged, secret=secret_of(f"nope-{n}")))
        assert response.status_code == 401
    # then: none of them is remembered
    assert set(selectors._cache) == {"sandbox-a"}


def test_the_channel_cache_is_bounded_however_many_channels_exist(db):
    PaymentChannel.objects.bulk_create(
        PaymentChannel(code=f"many-{n}", provider="sandbox") for n in range(selectors._CACHE_MAX + 50)
    )
    for n in range(selectors._CACHE_MAX + 50):
        assert selectors.channel_by_code(f"many-{n}").code == f"many-{n}"
    assert len(selectors._cache) == selectors._CACHE_MAX
    # the most recently used stay
    assert f"many-{selectors._CACHE_MAX + 49}" in selectors._cache


# --- a channel's secret speaks only for that channel's charges (SPEC 9) ----------------------------


def _cross_channel_body(order) -> str:
    # signed by sandbox-b, about the charge sandbox-a made
    payload = json.loads(event_body(order, channel="sandbox-b"))
    payload["data"]["idempotency_key"] = f"{order.pk}:sandbox-a"
    return json.dumps(payload)


def test_a_webhook_signed_by_another_channel_is_403_and_changes_nothing(processing_order, redis_client):
    # given: sandbox-a made the charge; the sender holds sandbox-b's secret only
    body = _cross_channel_body(processing_order)
    # when
    response = post(body, signed_headers(body, secret=secret_of("sandbox-b")))
    # then
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "channel_mismatch"
    assert_nothing_changed(processing_order, redis_client)
    assert ChargeAttempt.objects.get(order=processing_order).status == "accepted"


def test_a_confirm_vouched_for_by_another_channel_settles_nothing(processing_order, redis_client):
    # given: a webhook by sandbox-b stored before sandbox-a's attempt existed, its confirm now running
    message = {
        "order_id": str(processing_order.pk),
        "idempotency_key": f"{processing_order.pk}:sandbox-a",
        "status": "failed",
        "failure_code": "card_declined",
        "webhook_id": "msg_x",
        "channel": "sandbox-b",
        "provider": "sandbox",
    }
    # when
    tasks.confirm.run(message)
    # then
    fresh = Order.objects.get(pk=processing_order.pk)
    assert (fresh.status, fresh.outcome) == ("processing", None)
    assert ChargeAttempt.objects.get(order=processing_order).status == "accepted"
    # and the same message from the channel that made the charge does settle it
    tasks.confirm.run({**message, "channel": "sandbox-a"})
    fresh = Order.objects.get(pk=processing_order.pk)
    assert (fresh.status, fresh.failure_code) == ("failed", "card_declined")
    assert ChargeAttempt.objects.get(order=processing_order).status == "failed"


def test_a_genuine_webhook_hands_off_its_verified_channel(processing_order, redis_client):
    body = event_body(processing_order)
    assert post(body, signed_headers(body, secret=secret_of("sandbox-a"))).status_code == 200
    [message] = confirm_messages(redis_client, processing_order)
    assert (message["channel"], message["provider"]) == ("sandbox-a", "sandbox")
    tasks.confirm.run(message)
    assert Order.objects.get(pk=processing_order.pk).status == "paid"


def test_a_confirm_of_another_providers_channel_settles_nothing(processing_order):
    result = services.order_confirm(
        order_id=processing_order.pk,
        idempotency_key=f"{processing_order.pk}:sandbox-a",
        status="paid",
        source="provider webhook",
        channel="sandbox-a",
        provider="stripe",
    )
    assert result is None
    assert Order.objects.get(pk=processing_order.pk).status == "processing"


# --- production refuses the public sandbox secret ------------------------------------------------


def _production_settings_load(sandbox_secret: str | None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "SECRET_KEY": "k" * 50,
        "DATABASE_URL": "postgres://nobody@127.0.0.1:1/none",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "PUBLIC_BASE_URL": "https://payments.example",
        "FIELD_ENCRYPTION_KEY": base64.urlsafe_b64encode(b"f" * 32).decode(),
        "METRICS_TOKEN": "m" * 32,
    }
    env.pop("SANDBOX_SECRET", None)
    if sandbox_secret is not None:
        env["SANDBOX_SECRET"] = sandbox_secret
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("secret", [None, "", "sandbox-dev-secret"])
def test_production_refuses_to_start_without_a_sandbox_secret_of_its_own(secret):
    loaded = _production_settings_load(secret)
    assert loaded.returncode != 0
    assert "ImproperlyConfigured" in loaded.stderr and "SANDBOX_SECRET" in loaded.stderr


def test_production_starts_with_a_sandbox_secret_of_its_own():
    loaded = _production_settings_load("a-secret-of-our-own-" + "x" * 20)
    # Other settings may be required too: this one, at least, is not what stops it.
    assert "SANDBOX_SECRET" not in loaded.stderr


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda data: data.update(amount=data["amount"] + 1), "amount"),
        (lambda data: data.update(currency="JPY"), "currency"),
        (lambda data: data.update(id="ch_someone_elses"), "names ch_someone_elses"),
    ],
    ids=["another amount", "another currency", "another charge"],
)
def test_a_signed_word_about_another_charge_changes_nothing_and_is_shown(
    processing_order, redis_client, caplog, change, said
):
    # given a charge whose reference we know, and a word signed by its channel that names its
    # attempt but another amount, currency or charge (another system tagged its charge with our
    # metadata; before: applied as this charge's word)
    ChargeAttempt.objects.filter(order=processing_order).update(provider_reference="ch_ours")
    payload = json.loads(event_body(processing_order))
    change(payload["data"])
    body = json.dumps(payload, separators=(",", ":"))
    # when
    response = post(body, signed_headers(body, secret=secret_of("sandbox-a")))
    # then it is acknowledged, stored as no word and handed to no stage; the order stays
    assert (response.status_code, response.json()) == (
        200,
        {"received": True, "duplicate": False, "ignored": True},
    )
    assert ProviderWebhook.objects.count() == 0
    assert confirm_messages(redis_client, processing_order) == []
    fresh = Order.objects.get(pk=processing_order.pk)
    assert (fresh.status, fresh.outcome) == ("processing", None)
    # and an operator is shown it: on the order, and as an error to alert on
    [signal] = IgnoredSignal.objects.filter(order=processing_order)
    assert signal.requested_status == "paid" and said in signal.reason and "ask the provider" in signal.reason
    assert "webhook.not_this_attempt" in [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_a_word_without_a_reference_of_ours_yet_is_checked_by_amount_only(processing_order, redis_client):
    # The charge's answer has not come back yet (no reference stored): the word names the charge.
    body = event_body(processing_order)
    response = post(body, signed_headers(body, secret=secret_of("sandbox-a")))
    assert response.json() == {"received": True, "duplicate": False}
    assert [m["provider_reference"] for m in confirm_messages(redis_client, processing_order)] == ["ch_test"]


def test_a_webhook_while_the_database_restarts_is_a_503_to_redeliver(processing_order):
    body = event_body(processing_order)

    with database_restarting():
        response = post(body, signed_headers(body, secret=secret_of("sandbox-a")))

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    assert (ProviderWebhook.objects.count(), Order.objects.get(pk=processing_order.pk).status) == (
        0,
        "processing",
    )
