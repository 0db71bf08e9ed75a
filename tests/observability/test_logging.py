"""Structured logs: every stage's line carries the order id; keys and secrets never reach a line."""

import json
import logging
import re

import pytest

from allocation.services import order_allocate
from callbacks.services import callback_deliver
from core.logging import order_id_var
from gateway.models import ChargeAttempt
from gateway.services import order_charge, order_confirm
from orders.models import Merchant
from tests.logs import console_output

pytestmark = pytest.mark.django_db


@pytest.fixture
def log_lines():
    """What the console handler would print at INFO, one parsed JSON object a line."""
    with console_output(logging.INFO) as output:
        yield lambda: [json.loads(line) for line in output().splitlines()]


def _created(api, reference: str) -> str:
    """The id of a new 10.50 USD order, created through the API under its reference as key."""
    body = {"amount": 1050, "currency": "USD", "reference": reference}
    return api.post("/api/v1/orders", body, format="json", HTTP_IDEMPOTENCY_KEY=reference).json()["id"]


def test_each_stage_logs_a_line_with_the_order_id(api, log_lines, settings, accepting_channel):
    # given
    settings.CALLBACK_RETRY_SCHEDULE = [60]
    order_id = _created(api, "log-1")

    # when: the four stages, as their tasks call them
    order_allocate(order_id=order_id)
    order_charge(order_id=order_id)
    key = ChargeAttempt.objects.get(order_id=order_id).idempotency_key
    order_confirm(order_id=order_id, idempotency_key=key, status="paid", source="provider webhook")
    callback_deliver(order_id=order_id)

    # then
    lines = log_lines()
    events = {(line["event"], line.get("to")) for line in lines if line.get("order_id") == order_id}
    assert ("order.created", None) in events
    assert ("order.transition", "assigned") in events  # allocate
    assert ("charge.sent", None) in events and ("order.transition", "processing") in events  # charge
    assert ("order.transition", "paid") in events  # confirm
    assert ("callback.failed", None) in events  # callback (127.0.0.1:9 refuses)
    assert all("time" in line and "level" in line for line in lines)
    # in UTC to the millisecond, saying so, whatever the host's zone (before: "2026-12-01 14:44:03,262")
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]) for line in lines)
    # how long the provider took is on the line of the send (a slow provider is visible in the logs)
    (sent,) = [line for line in lines if line["event"] == "charge.sent"]
    assert isinstance(sent["duration_ms"], int) and sent["duration_ms"] >= 0


def test_a_task_line_without_its_own_order_id_gets_the_context_one(log_lines):
    token = order_id_var.set("order-from-task-message")
    try:
        logging.getLogger("gateway.tasks").info("task.something")
    finally:
        order_id_var.reset(token)

    assert log_lines()[-1]["order_id"] == "order-from-task-message"


def test_secrets_are_redacted_from_messages_fields_and_tracebacks(log_lines, merchant_creds):
    api_key, secret = merchant_creds.api_key, merchant_creds.webhook_secret
    logger = logging.getLogger("tests.redaction")

    logger.info("auth header was Bearer %s", api_key)
    logger.info(
        "request.seen",
        extra={
            "headers": {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
            "api_key": api_key,
            "webhook_secret": secret,
            "note": f"rotated to {secret}",
            "error": "HTTPConnectionPool: Max retries exceeded with url: /hook?order=1&token=s3cr3t-value",
        },
    )
    try:
        raise ValueError(f"cannot use {api_key}")
    except ValueError:
        logger.exception("boom")

    output = json.dumps(log_lines())
    assert api_key not in output and secret not in output
    assert secret.removeprefix("whsec_") not in output
    prefix = merchant_creds.merchant.api_key_prefix
    assert f"sk_{prefix}_[redacted]" in output  # the public prefix still names the key
    lines = {line["event"].split(" ")[0]: line for line in log_lines()}
    seen = lines["request.seen"]
    assert seen["headers"] == {"Authorization": "[redacted]", "Content-Type": "application/json"}
    assert seen["api_key"] == "[redacted]" and seen["webhook_secret"] == "[redacted]"
    assert seen["error"].endswith("/hook?order=1&token=[redacted]")
    assert "ValueError: cannot use sk_" in lines["boom"]["exc_info"]


def test_the_api_and_the_console_never_log_keys_or_secrets(api, merchant_creds, log_lines, admin_client):
    api.post(
        "/api/v1/orders",
        {"amount": 1050, "currency": "USD", "reference": "log-2"},
        format="json",
        HTTP_IDEMPOTENCY_KEY="log-2",
    )
    api.get("/api/v1/orders/not-a-uuid")
    admin_client.post(
        "/admin/orders/merchant/",
        {"action": "rotate_api_key", "_selected_action": [merchant_creds.merchant.pk]},
        follow=True,
    )
    admin_client.post(
        "/admin/orders/merchant/",
        {"action": "rotate_webhook_secret", "_selected_action": [merchant_creds.merchant.pk]},
    )

    output = json.dumps(log_lines())
    merchant = Merchant.objects.get(pk=merchant_creds.merchant.pk)
    assert "admin.action" in output  # the rotations were logged...
    for secret in (merchant_creds.api_key, merchant_creds.webhook_secret, merchant.api_key_hash):
        assert secret not in output  # ...without their values
    assert "whsec_" not in output.replace("whsec_[redacted]", "")
    assert "sk_" not in output.replace(f"sk_{merchant.api_key_prefix}_[redacted]", "")


def test_a_refused_request_is_one_info_line_with_its_request_id_code_and_order(api, log_lines):
    # given an order that cannot be refunded yet (pending)
    order_id = _created(api, "log-refused")
    # when the merchant asks for a refund, naming its request, and sends garbage elsewhere
    refused = api.post(
        f"/api/v1/orders/{order_id}/refunds",
        {"amount": 1},
        format="json",
        HTTP_IDEMPOTENCY_KEY="refund-1",
        HTTP_X_REQUEST_ID="merchant-req-1",
    )
    assert refused.status_code == 409
    assert api.get("/api/v1/orders?status=nope", HTTP_X_REQUEST_ID="merchant-req-2").status_code == 400
    # then each is one INFO line, found by the request id the merchant quotes, with the error's
    # code and the order its path names (before: Django's WARNING "Conflict: /api/v1/...", with
    # no request id, no order id and no code)
    lines = log_lines()
    refusals = {
        line["request_id"]: (line["level"], line["status_code"], line["code"], line.get("order_id"))
        for line in lines
        if line["event"] == "http.client_error"
    }
    assert refusals == {
        "merchant-req-1": ("INFO", 409, "order_not_refundable", order_id),
        "merchant-req-2": ("INFO", 400, "invalid_request", None),
    }
    assert not [line for line in lines if line["logger"] == "django.request"]


def test_a_transition_line_says_why(api, log_lines, accepting_channel):
    # given an order charged and then declined by the provider
    order_id = _created(api, "log-why")
    order_allocate(order_id=order_id)
    order_charge(order_id=order_id)
    key = ChargeAttempt.objects.get(order_id=order_id).idempotency_key
    order_confirm(
        order_id=order_id, idempotency_key=key, status="failed", failure_code="card_declined", source="poll"
    )
    # then its failed transition's line carries the reason and the code, as the transition row
    # does (before: from, to and channel only; two declines of different codes read the same)
    [line] = [
        line
        for line in log_lines()
        if line["event"] == "order.transition" and line.get("order_id") == order_id and line["to"] == "failed"
    ]
    assert line["failure_code"] == "card_declined"
    assert line["reason"] == "provider says failed (card_declined) via poll"
