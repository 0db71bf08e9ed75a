"""The refund API (SPEC 10): creation with Idempotency-Key, reads, every rule and bad input."""

import itertools
import threading
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from rest_framework.test import APIClient

from orders import services
from orders.models import IdempotencyKey, Order, OutboxEvent, Refund, RefundTransition
from orders.transitions import refund_transition
from tests.factories import OrderFactory, make_paid

_keys = itertools.count(1)


def _paid_order(merchant, amount: int = 1000) -> Order:
    order = OrderFactory(merchant=merchant, amount=amount)
    make_paid(order.pk)
    return Order.objects.get(pk=order.pk)


def _refund(api, order_id, body: dict | None = None, *, key: str | None = None, **extra):
    return api.post(
        f"/api/v1/orders/{order_id}/refunds",
        body if body is not None else {},
        format="json",
        HTTP_IDEMPOTENCY_KEY=key or f"rk-{next(_keys)}",
        **extra,
    )


def _create(merchant, order, **data) -> services.CreateResult:
    return services.refund_create(
        merchant=merchant,
        order_id=str(order.pk),
        idempotency_key="k",
        fingerprint=services.refund_fingerprint(order_id=order.pk, data=data),
        **data,
    )


def _error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code, error
    return error


@pytest.mark.django_db
def test_a_full_refund_by_default_and_its_reads(api, merchant_creds):
    # given
    order = _paid_order(merchant_creds.merchant, amount=1000)
    # when
    response = _refund(
        api, order.pk, {"reason": "requested_by_customer", "reference": "rf-1", "metadata": {"t": "9"}}
    )
    # then
    assert response.status_code == 201, response.content
    refund = response.json()
    assert set(refund) == {
        "id", "order_id", "amount", "currency", "status", "reason", "reference", "metadata",
        "failure_code", "failure_message", "created_at", "updated_at",
    }  # fmt: skip
    assert (refund["amount"], refund["currency"], refund["status"]) == (1000, "USD", "pending")
    assert refund["order_id"] == str(order.pk) and refund["reference"] == "rf-1"
    assert api.get(f"/api/v1/refunds/{refund['id']}").json() == refund
    assert api.get(f"/api/v1/orders/{order.pk}/refunds").json() == [refund]
    events = api.get(f"/api/v1/refunds/{refund['id']}/events").json()
    assert [(e["from"], e["to"], e["channel"]) for e in events] == [(None, "pending", "sandbox-a")]
    # the order is not refunded until the refund succeeds, and its own status stays
    body = api.get(f"/api/v1/orders/{order.pk}").json()
    assert (body["amount_refunded"], body["status"]) == (0, "paid")
    # announced in the same transaction
    event = OutboxEvent.objects.get(topic="refund-created")
    assert event.payload["refund_id"] == refund["id"] and event.order_id == order.pk


@pytest.mark.django_db
def test_partial_refunds_are_listed_oldest_first_and_the_rest_is_refundable(api, merchant_creds):
    order = _paid_order(merchant_creds.merchant, amount=1000)
    first = _refund(api, order.pk, {"amount": 300}).json()
    second = _refund(api, order.pk, {"amount": 200}).json()
    rest = _refund(api, order.pk).json()
    assert rest["amount"] == 500
    listed = api.get(f"/api/v1/orders/{order.pk}/refunds").json()
    assert [r["id"] for r in listed] == [first["id"], second["id"], rest["id"]]
    error = _error(_refund(api, order.pk, {"amount": 1}), 400, "amount_exceeds_refundable")
    assert "amount" in error["fields"]
    # no amount sent: the error names no field, and says nothing is left (before: "amount: at most 0")
    error = _error(_refund(api, order.pk), 400, "amount_exceeds_refundable")
    assert (
        error["fields"] == {}
        and error["message"] == "Nothing is left to refund: refunds made or under way cover all 1000."
    )


@pytest.mark.django_db
def test_more_than_refundable_is_400(api, merchant_creds):
    order = _paid_order(merchant_creds.merchant, amount=1000)
    _error(_refund(api, order.pk, {"amount": 1001}), 400, "amount_exceeds_refundable")
    assert Refund.objects.count() == 0
    assert Order.objects.get(pk=order.pk).refund_held == 0


@pytest.mark.django_db
@pytest.mark.parametrize("amount", [10**12 + 1, 2**63 - 1])
def test_an_amount_over_any_orders_is_more_than_refundable_too(api, merchant_creds, amount):
    # above the largest order amount (before: invalid_request "between 1 and 10^12"), the code
    # SPEC 10 gives for an amount over what is refundable
    order = _paid_order(merchant_creds.merchant, amount=1000)
    _error(_refund(api, order.pk, {"amount": amount}), 400, "amount_exceeds_refundable")
    # beyond a bigint it is no amount at all
    _error(_refund(api, order.pk, {"amount": 2**63}), 400, "invalid_request")
    assert Refund.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["pending", "assigned", "processing", "failed"])
def test_an_order_without_a_paid_outcome_is_409_order_not_refundable(api, merchant_creds, status):
    order = OrderFactory(
        merchant=merchant_creds.merchant, status=status, outcome="failed" if status == "failed" else None
    )
    _error(_refund(api, order.pk, {"amount": 1}), 409, "order_not_refundable")
    assert Refund.objects.count() == 0


@pytest.mark.django_db
def test_a_completed_paid_order_is_refundable(api, merchant_creds):
    order = _paid_order(merchant_creds.merchant)
    Order.objects.filter(pk=order.pk).update(status="completed")
    assert _refund(api, order.pk, {"amount": 5}).status_code == 201


@pytest.mark.django_db
def test_another_merchants_order_and_refund_are_404(api, other_api, merchant_creds):
    order = _paid_order(merchant_creds.merchant)
    refund = _refund(api, order.pk, {"amount": 5}).json()
    _error(_refund(other_api, order.pk, {"amount": 5}), 404, "not_found")
    _error(other_api.get(f"/api/v1/orders/{order.pk}/refunds"), 404, "not_found")
    _error(other_api.get(f"/api/v1/refunds/{refund['id']}"), 404, "not_found")
    _error(other_api.get(f"/api/v1/refunds/{refund['id']}/events"), 404, "not_found")
    _error(api.get("/api/v1/refunds/not-a-uuid"), 404, "not_found")
    _error(_refund(api, "not-a-uuid"), 404, "not_found")
    assert Refund.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [({"amount": 0}, "amount"), ({"amount": -5}, "amount"), ({"amount": 10.0}, "amount"),
     ({"amount": "100"}, "amount"), ({"amount": True}, "amount"), ({"amount": None}, "amount"),
     ({"amount": 10, "currency": "USD"}, "currency"), ({"reason": "x" * 501}, "reason"),
     ({"reason": 5}, "reason"), ({"reference": ""}, "reference"), ({"reference": "r" * 65}, "reference"),
     ({"reference": "   "}, "reference"), ({"metadata": {"a": 1}}, "metadata"), ({"metadata": "x"}, "metadata")],
    ids=["zero", "negative", "float", "string", "boolean", "null", "unknown-field", "reason-too-long",
         "reason-not-text", "reference-empty", "reference-too-long", "reference-blank", "metadata-value",
         "metadata-not-object"],
)  # fmt: skip
def test_bad_input_is_400_and_refunds_nothing(api, merchant_creds, body, field):
    order = _paid_order(merchant_creds.merchant)
    error = _error(_refund(api, order.pk, body), 400, "invalid_request")
    assert field in error["fields"]
    assert Refund.objects.count() == 0


@pytest.mark.django_db
def test_null_for_an_optional_field_is_the_field_left_out_but_not_for_the_amount(api, merchant_creds):
    # given a paid order
    order = _paid_order(merchant_creds.merchant, amount=1000)
    # when a refund names its optional fields as null
    response = _refund(api, order.pk, {"amount": 300, "reason": None, "reference": None, "metadata": None})
    # then it is the refund without them
    assert response.status_code == 201, response.content
    assert {name: response.json()[name] for name in ("amount", "reason", "reference", "metadata")} == {
        "amount": 300,
        "reason": None,
        "reference": None,
        "metadata": {},
    }
    # but a null amount is not read as "everything still refundable", which leaving it out means:
    # money does not move on a value the client may not have meant
    error = _error(_refund(api, order.pk, {"amount": None}), 400, "invalid_request")
    assert "amount" in error["fields"]
    assert Refund.objects.count() == 1


@pytest.mark.django_db
def test_a_body_that_is_not_an_object_is_400(api, merchant_creds):
    order = _paid_order(merchant_creds.merchant)
    response = api.post(
        f"/api/v1/orders/{order.pk}/refunds", "[1]", content_type="application/json", HTTP_IDEMPOTENCY_KEY="k"
    )
    _error(response, 400, "invalid_request")


@pytest.mark.django_db
def test_reason_of_500_characters_is_accepted(api, merchant_creds):
    order = _paid_order(merchant_creds.merchant)
    assert _refund(api, order.pk, {"amount": 1, "reason": "x" * 500}).status_code == 201


@pytest.mark.django_db
def test_missing_key_is_400(api, merchant_creds):
    order = _paid_order(merchant_creds.merchant)
    response = api.post(f"/api/v1/orders/{order.pk}/refunds", {"amount": 1}, format="json")
    _error(response, 400, "idempotency_key_missing")
    assert Refund.objects.count() == 0


@pytest.mark.django_db
def test_replay_answers_the_same_without_a_second_refund_and_another_body_is_422(api, merchant_creds):
    order = _paid_order(merchant_creds.merchant)
    first = _refund(api, order.pk, {"amount": 100}, key="same")
    replay = _refund(api, order.pk, {"amount": 100}, key="same")
    assert (first.status_code, replay.status_code) == (201, 201)
    assert replay.content == first.content  # byte for byte, fields in the same order
    assert replay["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first
    _error(_refund(api, order.pk, {"amount": 101}, key="same"), 422, "idempotency_key_reused")
    # the same key and body for another order is another request
    other = _paid_order(merchant_creds.merchant)
    _error(_refund(api, other.pk, {"amount": 100}, key="same"), 422, "idempotency_key_reused")
    # an order's create key cannot be replayed as a refund either
    assert Refund.objects.count() == 1


@pytest.mark.django_db
def test_key_in_flight_is_409(api, merchant_creds):
    order = _paid_order(merchant_creds.merchant)
    IdempotencyKey.objects.create(
        merchant=merchant_creds.merchant,
        key="busy",
        request_hash=services.refund_fingerprint(order_id=order.pk, data={"amount": 100}),
        state=IdempotencyKey.State.IN_FLIGHT,
        created_at=timezone.now() - timedelta(seconds=1),
    )
    _error(_refund(api, order.pk, {"amount": 100}, key="busy"), 409, "idempotency_key_in_use")
    assert Refund.objects.count() == 0


@pytest.mark.django_db
def test_a_refused_refund_does_not_use_up_its_key(api, merchant_creds):
    order = _paid_order(merchant_creds.merchant, amount=100)
    _error(_refund(api, order.pk, {"amount": 101}, key="k1"), 400, "amount_exceeds_refundable")
    _error(_refund(api, order.pk, {"amount": 101}, key="k1"), 400, "amount_exceeds_refundable")
    assert _refund(api, order.pk, {"amount": 100}, key="k2").status_code == 201


@pytest.mark.django_db
def test_reference_is_unique_per_merchant_among_refunds(api, other_api, merchant_creds):
    order = _paid_order(merchant_creds.merchant)
    assert _refund(api, order.pk, {"amount": 1, "reference": "rf"}).status_code == 201
    error = _error(_refund(api, order.pk, {"amount": 1, "reference": "rf"}), 409, "duplicate_reference")
    assert "reference" in error["fields"]
    assert Order.objects.get(pk=order.pk).refund_held == 1  # the refused one holds nothing
    theirs = _paid_order(other_api.creds.merchant)
    assert _refund(other_api, theirs.pk, {"amount": 1, "reference": "rf"}).status_code == 201


@pytest.mark.django_db
def test_amount_refunded_is_the_sum_of_succeeded_refunds_and_a_failed_one_frees_its_share(
    api, merchant_creds
):
    # given three refunds: one succeeds, one fails, one stays processing
    order = _paid_order(merchant_creds.merchant, amount=1000)
    ids = [_refund(api, order.pk, {"amount": amount}).json()["id"] for amount in (300, 300, 400)]
    for refund_id in ids:
        refund_transition(refund_id=refund_id, to="processing", seen_status="pending", reason="test")
    # when
    refund_transition(refund_id=ids[0], to="succeeded", seen_status="processing", reason="test")
    refund_transition(
        refund_id=ids[1], to="failed", seen_status="processing", reason="test", failure_code="x"
    )
    # then
    body = api.get(f"/api/v1/orders/{order.pk}").json()
    assert body["amount_refunded"] == 300
    assert Order.objects.get(pk=order.pk).refund_held == 700
    assert _refund(api, order.pk).json()["amount"] == 300  # what the failed one gave back
    failed = api.get(f"/api/v1/refunds/{ids[1]}").json()
    assert (failed["status"], failed["failure_code"]) == ("failed", "x")


@pytest.mark.django_db
def test_a_late_or_duplicate_refund_signal_changes_nothing(merchant_creds):
    order = _paid_order(merchant_creds.merchant, amount=1000)
    refund = _create(merchant_creds.merchant, order, amount=100)
    refund_id = refund.body["id"]
    refund_transition(refund_id=refund_id, to="processing", seen_status="pending", reason="test")
    first = refund_transition(refund_id=refund_id, to="succeeded", seen_status="processing", reason="webhook")
    again = refund_transition(refund_id=refund_id, to="succeeded", seen_status="processing", reason="webhook")
    late = refund_transition(
        refund_id=refund_id, to="failed", seen_status="processing", reason="late webhook"
    )
    assert (first.applied, again.applied, late.applied) == (True, False, False)
    assert Refund.objects.get(pk=refund_id).status == "succeeded"
    assert Order.objects.get(pk=order.pk).amount_refunded == 100
    assert RefundTransition.objects.filter(refund_id=refund_id).count() == 3
    assert OutboxEvent.objects.filter(topic="refund-updated").count() == 2


@pytest.mark.django_db
def test_the_database_refuses_refunds_past_the_amount_and_edits_of_the_log(merchant_creds):
    order = _paid_order(merchant_creds.merchant, amount=1000)
    with pytest.raises(IntegrityError), transaction.atomic():
        Order.objects.filter(pk=order.pk).update(refund_held=1001)
    _create(merchant_creds.merchant, order, amount=100)
    with pytest.raises(Exception, match="append-only"), transaction.atomic():
        RefundTransition.objects.update(reason="edited")


@pytest.mark.django_db(transaction=True)
def test_sixteen_concurrent_refunds_of_30_percent_make_exactly_three(merchant_creds):
    # given a paid order of 1000 and 16 clients, each with its own connection, asking 300 at once
    order = _paid_order(merchant_creds.merchant, amount=1000)
    threads = 16
    barrier = threading.Barrier(threads)
    statuses: list[int] = []
    lock = threading.Lock()

    def ask(index: int) -> None:
        try:
            client = APIClient()
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {merchant_creds.api_key}")
            barrier.wait(timeout=10)
            response = _refund(client, order.pk, {"amount": 300}, key=f"c-{index}")
            with lock:
                statuses.append(response.status_code)
        finally:
            connection.close()

    workers = [threading.Thread(target=ask, args=(i,)) for i in range(threads)]
    # when
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    # then
    assert sorted(statuses) == [201] * 3 + [400] * 13
    assert Refund.objects.filter(order=order).count() == 3
    assert Order.objects.get(pk=order.pk).refund_held == 900


def test_openapi_documents_the_refund_api(client):
    schema = client.get("/api/schema/", {"format": "json"}).json()
    paths = schema["paths"]
    assert {"get", "post"} <= set(paths["/api/v1/orders/{order_id}/refunds"])
    assert "get" in paths["/api/v1/refunds/{refund_id}"]
    assert "get" in paths["/api/v1/refunds/{refund_id}/events"]
    post = paths["/api/v1/orders/{order_id}/refunds"]["post"]
    assert any(p["name"] == "Idempotency-Key" and p["required"] for p in post["parameters"])
    assert {"201", "400", "404", "409", "422"} <= set(post["responses"])
    body = schema["components"]["schemas"]["RefundCreateRequest"]
    assert body["additionalProperties"] is False
    assert set(body["properties"]) == {"amount", "reason", "reference", "metadata"}
    assert body["properties"]["reason"]["maxLength"] == 500
    assert "amount_refunded" in schema["components"]["schemas"]["Order"]["properties"]
    assert set(schema["components"]["schemas"]["Refund"]["properties"]) >= {"id", "order_id", "status"}
