"""The charge and confirm stages against a stub provider adapter (the one thing unit tests may stub)."""

import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection

from core.logging import request_id_var
from gateway import services
from gateway.models import ChargeAttempt
from gateway.providers.base import ChargeOutcome, ChargeResult
from orders.models import Order, OrderTransition, OutboxEvent
from tests.stub_provider import assigned_order, path, stored_webhook


@pytest.mark.django_db
def test_charge_twice_in_a_row_is_one_transition_and_one_charge(stub, channels):
    order = assigned_order()
    services.order_charge(order_id=order.pk)
    services.order_charge(order_id=order.pk)
    assert stub.calls == [f"{order.pk}:stub-1"]
    assert ChargeAttempt.objects.filter(order=order).count() == 1
    assert path(order)[-1] == ("assigned", "processing", "stub-1")
    assert OrderTransition.objects.filter(order=order, to_status="processing").count() == 1


@pytest.mark.django_db(transaction=True)
def test_charge_twice_at_once_is_one_transition_and_one_charge(stub, channels):
    # given
    order = assigned_order()
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        try:
            services.order_charge(order_id=order.pk)
        finally:
            connection.close()

    # when
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # then: both copies may reach the provider, but with one key, so one charge
    assert stub.charges == {f"{order.pk}:stub-1"}
    assert ChargeAttempt.objects.filter(order=order).count() == 1
    assert OrderTransition.objects.filter(order=order, to_status="processing").count() == 1
    assert Order.objects.get(pk=order.pk).status == "processing"


@pytest.mark.django_db
def test_definitive_rejection_fails_over_to_the_next_channel(stub, channels):
    stub.answers["stub-1"] = ChargeOutcome.REJECTED
    order = assigned_order()
    services.order_charge(order_id=order.pk)  # rejected at stub-1 -> assigned to stub-2
    services.order_charge(order_id=order.pk)  # the charge task that the new event triggers
    assert path(order)[-2:] == [("assigned", "assigned", "stub-2"), ("assigned", "processing", "stub-2")]
    assert stub.charges == {f"{order.pk}:stub-2"}
    assert Order.objects.get(pk=order.pk).channel == "stub-2"


@pytest.mark.django_db
def test_rejection_everywhere_fails_with_channel_unavailable(stub, channels):
    stub.answers.update({"stub-1": ChargeOutcome.REJECTED, "stub-2": ChargeOutcome.REJECTED})
    order = assigned_order()
    services.order_charge(order_id=order.pk)
    services.order_charge(order_id=order.pk)
    order.refresh_from_db()
    assert (order.status, order.outcome, order.failure_code) == ("failed", "failed", "channel_unavailable")
    assert stub.charges == set()


@pytest.mark.django_db
def test_unknown_outcome_waits_in_processing_and_is_never_failed(stub, channels):
    stub.answers["stub-1"] = ChargeOutcome.UNKNOWN
    order = assigned_order()
    services.order_charge(order_id=order.pk)
    order.refresh_from_db()
    assert order.status == "processing"
    assert ChargeAttempt.objects.get(order=order).status == "unknown"
    # a poll that learns it was paid settles it, with the charge made once
    stub.status = "paid"
    services.order_poll(order_id=order.pk)
    order.refresh_from_db()
    assert (order.status, order.outcome) == ("paid", "paid")
    assert stub.calls == [f"{order.pk}:stub-1"]


@pytest.mark.django_db
def test_poll_resends_under_the_same_key_when_the_provider_never_got_it(stub, channels):
    stub.answers["stub-1"] = ChargeOutcome.UNKNOWN
    order = assigned_order()
    services.order_charge(order_id=order.pk)
    stub.charges.clear()  # as if the request never reached the provider
    stub.answers["stub-1"] = ChargeOutcome.ACCEPTED
    services.order_poll(order_id=order.pk)
    assert stub.calls == [f"{order.pk}:stub-1", f"{order.pk}:stub-1"]
    assert stub.charges == {f"{order.pk}:stub-1"}


@pytest.mark.django_db
def test_confirm_twice_and_late_failed_keep_the_first_outcome(stub, channels):
    order = assigned_order()
    services.order_charge(order_id=order.pk)
    key = f"{order.pk}:stub-1"
    services.order_confirm(order_id=order.pk, idempotency_key=key, status="paid", source="test")
    services.order_confirm(order_id=order.pk, idempotency_key=key, status="paid", source="test")
    services.order_confirm(
        order_id=order.pk, idempotency_key=key, status="failed", failure_code="x", source="test"
    )
    order.refresh_from_db()
    assert (order.status, order.outcome, order.failure_code) == ("paid", "paid", None)
    assert OrderTransition.objects.filter(order=order, to_status="paid").count() == 1
    assert order.ignored_signals.count() == 2


@pytest.mark.django_db
def test_confirm_before_the_charge_answer_is_recorded_moves_through_processing(stub, channels):
    order = assigned_order()
    ChargeAttempt.objects.create(
        order=order, channel="stub-1", provider="stub", idempotency_key=f"{order.pk}:stub-1"
    )
    services.order_confirm(
        order_id=order.pk, idempotency_key=f"{order.pk}:stub-1", status="paid", source="test"
    )
    assert [p[1] for p in path(order)] == ["assigned", "processing", "paid"]


@pytest.mark.django_db
def test_confirm_for_an_unknown_attempt_changes_nothing(stub, channels):
    order = assigned_order()
    assert (
        services.order_confirm(order_id=order.pk, idempotency_key="nope", status="paid", source="t") is None
    )
    assert Order.objects.get(pk=order.pk).status == "assigned"


def _signed(secret: str, body: str, at: datetime, msg_id: str = "msg_1") -> dict:
    from callbacks.signing import signature_headers

    return signature_headers(secrets=[secret], msg_id=msg_id, body=body, at=at)


@pytest.mark.django_db
def test_provider_webhook_verification(client, settings):
    # given the real sandbox channels (real per-channel secrets) and a processing order
    from django.core.management import call_command

    from gateway.sandbox_server.secrets import channel_webhook_secret

    call_command("seed_sandbox", stdout=open("/dev/null", "w"))
    order = assigned_order("sandbox-a")
    key = f"{order.pk}:sandbox-a"
    ChargeAttempt.objects.create(order=order, channel="sandbox-a", provider="sandbox", idempotency_key=key)
    import json

    body = json.dumps(
        {
            "type": "charge.paid",
            "data": {"id": "ch_1", "order_id": str(order.pk), "idempotency_key": key, "channel": "sandbox-a"},
        }
    )
    secret = channel_webhook_secret("sandbox-a", settings.SANDBOX_SECRET)
    url = "/api/v1/gateway/webhooks/sandbox"
    now = datetime.now(UTC)

    def post(headers):
        return client.post(url, body, content_type="application/json", headers=headers)

    # forged (another secret), stale, future-dated: 401
    assert post(_signed("whsec_" + "A" * 44, body, now)).status_code == 401
    assert post(_signed(secret, body, now - timedelta(minutes=6))).status_code == 401
    assert post(_signed(secret, body, now + timedelta(minutes=6))).status_code == 401
    assert (
        post({"webhook-id": "x", "webhook-timestamp": "1", "webhook-signature": "garbage"}).status_code == 401
    )
    assert (
        client.post("/api/v1/gateway/webhooks/nope", body, content_type="application/json").status_code == 404
    )
    # valid: accepted once; the same webhook-id again is a duplicate no-op
    first = post(_signed(secret, body, now, "msg_ok"))
    again = post(_signed(secret, body, now, "msg_ok"))
    assert (first.status_code, first.json()["duplicate"]) == (200, False)
    assert (again.status_code, again.json()["duplicate"]) == (200, True)
    assert order.provider_webhooks.count() == 1
    assert Order.objects.get(pk=order.pk).status == "assigned"  # the confirm task does the rest


@pytest.mark.django_db
def test_confirm_carries_the_creating_requests_id_into_its_event(stub, channels):
    # given: an order created by API request "req-create", confirmed from a provider webhook,
    # which runs under no request id of the merchant's
    order = assigned_order()
    Order.objects.filter(pk=order.pk).update(request_id="req-create")
    services.order_charge(order_id=order.pk)
    token = request_id_var.set(None)
    try:
        # when
        services.order_confirm(
            order_id=order.pk, idempotency_key=f"{order.pk}:stub-1", status="paid", source="webhook"
        )
    finally:
        request_id_var.reset(token)
    # then: the paid event, which starts the callback task, names the creating request
    paid = OutboxEvent.objects.filter(order_id=order.pk, payload__status="paid").get()
    assert paid.payload["request_id"] == "req-create"


@pytest.mark.django_db
def test_the_accepted_answer_names_the_providers_charge_on_the_order_once(stub, channels):
    # given an order charged on stub-1, whose answer names the provider's charge
    order = assigned_order()
    services.order_charge(order_id=order.pk)
    charged = Order.objects.get(pk=order.pk)
    assert (charged.status, charged.provider_reference) == ("processing", f"ch_{order.pk}:stub-1")
    # when a later word names another reference, the known one stays
    services.order_confirm(
        order_id=order.pk,
        idempotency_key=f"{order.pk}:stub-1",
        status="paid",
        source="test",
        provider_reference="ch_other",
    )
    paid = Order.objects.get(pk=order.pk)
    assert (paid.status, paid.provider_reference) == ("paid", f"ch_{order.pk}:stub-1")


@pytest.mark.django_db
def test_a_reference_learned_after_the_order_moved_on_is_still_recorded(stub, channels):
    # given the provider's webhook settled the order while our charge call was in flight
    order = assigned_order()
    charge_of = stub.charge

    def charge_then_webhook(*, channel, request):
        answer = charge_of(channel=channel, request=request)
        services.order_confirm(
            order_id=order.pk, idempotency_key=request.idempotency_key, status="paid", source="webhook"
        )
        return answer

    stub.charge = charge_then_webhook
    # when the answer is recorded after it (its transition no longer applies)
    services.order_charge(order_id=order.pk)
    # then the order is paid and names the provider's charge
    paid = Order.objects.get(pk=order.pk)
    assert (paid.status, paid.provider_reference) == ("paid", f"ch_{order.pk}:stub-1")


@pytest.mark.django_db
def test_a_known_reference_is_never_overwritten_by_the_charge_answer(stub, channels):
    # given the order already names the provider's charge (learned from an early webhook)
    order = assigned_order()
    Order.objects.filter(pk=order.pk).update(provider_reference="ch_from_webhook")
    # when the charge's answer names one too
    services.order_charge(order_id=order.pk)
    # then the order moved on and kept the first
    moved = Order.objects.get(pk=order.pk)
    assert (moved.status, moved.provider_reference) == ("processing", "ch_from_webhook")


def _charged() -> tuple[Order, str]:
    """An order charged on stub-1 (processing), and its charge's key."""
    order = assigned_order()
    services.order_charge(order_id=order.pk)
    return order, f"{order.pk}:stub-1"


def _confirm(order, key: str, status: str, failure_code: str = ""):
    return services.order_confirm(
        order_id=order.pk,
        idempotency_key=key,
        status=status,
        failure_code=failure_code,
        source="provider webhook",
        channel="stub-1",
        provider="stub",
    )


@pytest.mark.django_db
def test_the_first_stored_word_wins_whichever_confirm_arrives_first(stub, channels):
    # given a charge whose provider said paid, then (late) failed — SPEC 5 row 81 — both stored on arrival
    order, key = _charged()
    stored_webhook(order, key, "paid", 1)
    stored_webhook(order, key, "failed", 2, failure_code="card_declined")
    # when the failed word's hand-off reaches the confirm stage first (a failing-over broker held
    # the paid one back: seen in CI's Sentinel scenario)
    _confirm(order, key, "failed", "card_declined")
    # then the order is paid, as the provider said first, and the log says why
    order.refresh_from_db()
    assert (order.status, order.outcome, order.failure_code) == ("paid", "paid", None)
    assert ChargeAttempt.objects.get(idempotency_key=key).status == "paid"
    moved = OrderTransition.objects.get(order=order, to_status="paid")
    assert "its first word, a later one said failed" in moved.reason
    # and the held-back paid word, when it comes, is a duplicate
    _confirm(order, key, "paid")
    order.refresh_from_db()
    assert order.status == "paid"
    assert OrderTransition.objects.filter(order=order, to_status__in=("paid", "failed")).count() == 1


@pytest.mark.django_db
def test_a_first_failed_word_is_kept_too(stub, channels):
    order, key = _charged()
    stored_webhook(order, key, "failed", 1, failure_code="card_declined")
    stored_webhook(order, key, "paid", 2)
    _confirm(order, key, "paid")
    order.refresh_from_db()
    assert (order.status, order.outcome, order.failure_code) == ("failed", "failed", "card_declined")


@pytest.mark.django_db
def test_a_status_polls_answer_counts_as_it_is(stub, channels):
    # the provider's word now (a poll names no signer), whatever webhook was stored before it
    order, key = _charged()
    stored_webhook(order, key, "paid", 1)
    services.order_confirm(order_id=order.pk, idempotency_key=key, status="failed", source="status poll")
    order.refresh_from_db()
    assert (order.status, order.outcome) == ("failed", "failed")


@pytest.mark.django_db
def test_a_late_word_after_the_charge_settled_is_recorded_as_what_it_said(stub, channels):
    # given the paid word stored and confirmed
    order, key = _charged()
    stored_webhook(order, key, "paid", 1)
    _confirm(order, key, "paid")
    # when the late failed word is stored and confirmed
    stored_webhook(order, key, "failed", 2, failure_code="card_declined")
    _confirm(order, key, "failed", "card_declined")
    # then it is recorded as ignored, saying failed, and the outcome stays
    order.refresh_from_db()
    assert (order.status, order.outcome) == ("paid", "paid")
    assert order.ignored_signals.filter(requested_status="failed").count() == 1


def _paid_word_after_a_decline(reference: str) -> tuple[Order, str]:
    """An order whose charge the provider declined, then a signed paid word about it naming `reference`."""
    order = assigned_order()
    services.order_charge(order_id=order.pk)
    key = f"{order.pk}:stub-1"
    _confirm(order, key, "failed", "card_declined")
    services.order_confirm(
        order_id=order.pk, idempotency_key=key, status="paid", source="provider webhook",
        channel="stub-1", provider="stub", provider_reference=reference,
    )  # fmt: skip
    order.refresh_from_db()
    return order, key


@pytest.mark.django_db
def test_a_paid_word_for_a_declined_charge_changes_nothing_and_is_shown_loudly(stub, channels, caplog):
    # given a declined charge, when a paid word about it comes later naming a charge reference
    order, key = _paid_word_after_a_decline("ch_contradiction")
    # then the outcome stays failed (SPEC 1), the contradicting word leaves no reference behind,
    # and an operator is told loudly: money may have been taken on an order said to have failed
    # (before: an INFO line, and the word's reference written on the failed order)
    assert (order.status, order.outcome) == ("failed", "failed")
    assert order.provider_reference == f"ch_{key}"
    assert ChargeAttempt.objects.get(idempotency_key=key).provider_reference == f"ch_{key}"
    assert order.ignored_signals.filter(requested_status="paid").count() == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == ["confirm.paid_after_failed"]


@pytest.mark.django_db
def test_a_contradicting_word_writes_no_reference_where_none_was_known(stub, channels):
    # given a declined charge whose answer named no charge reference (a declined Stripe charge's
    # error may name none), when a paid word names a charge
    stub.answers["stub-1"] = ChargeResult(ChargeOutcome.ACCEPTED, http_status=201)
    order, key = _paid_word_after_a_decline("ch_someone_elses")
    # then the failed order does not take it as its charge (before: it did, and a refund would
    # have gone to it)
    assert (order.outcome, order.provider_reference) == ("failed", None)
    assert ChargeAttempt.objects.get(idempotency_key=key).provider_reference == ""


@pytest.mark.django_db
def test_a_paid_word_for_a_refused_charge_changes_nothing_and_is_shown_loudly(stub, channels, caplog):
    # given an order both channels refused (nothing charged): failed with channel_unavailable
    stub.answers.update({"stub-1": ChargeOutcome.REJECTED, "stub-2": ChargeOutcome.REJECTED})
    order = assigned_order()
    services.order_charge(order_id=order.pk)
    services.order_charge(order_id=order.pk)
    # when the first channel's provider says, signed, that it took the money after all
    result = services.order_confirm(
        order_id=order.pk,
        idempotency_key=f"{order.pk}:stub-1",
        status="paid",
        source="webhook",
        channel="stub-1",
        provider="stub",
        provider_reference="ch_contradiction",
    )
    # then the order and the refusal stay as they were (before: the attempt was rewritten paid
    # and the order took the reference, with only INFO lines)
    order.refresh_from_db()
    assert result is not None and not result.applied
    assert (order.status, order.outcome, order.failure_code) == ("failed", "failed", "channel_unavailable")
    assert order.provider_reference is None
    attempt = ChargeAttempt.objects.get(idempotency_key=f"{order.pk}:stub-1")
    assert (attempt.status, attempt.provider_reference) == ("rejected", "")
    # and an operator is shown it: on the order, and as an error to alert on
    [signal] = order.ignored_signals.all()
    assert signal.requested_status == "paid" and "refused" in signal.reason
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "confirm.paid_after_refusal"
    ]


@pytest.mark.django_db
def test_a_paid_word_for_a_refused_charge_does_not_break_the_live_one(stub, channels, caplog):
    # given an order refused by stub-1 and now processing on stub-2
    stub.answers["stub-1"] = ChargeOutcome.REJECTED
    order = assigned_order()
    services.order_charge(order_id=order.pk)
    services.order_charge(order_id=order.pk)
    assert Order.objects.get(pk=order.pk).status == "processing"
    # when stub-1's provider says paid for its refused charge (before: the rewrite to paid broke
    # attempt_one_live_per_order and the confirm task crashed with an IntegrityError)
    services.order_confirm(
        order_id=order.pk, idempotency_key=f"{order.pk}:stub-1", status="paid", source="webhook",
        channel="stub-1", provider="stub",
    )  # fmt: skip
    # then nothing moved, and stub-2's own word still settles the order
    assert Order.objects.get(pk=order.pk).status == "processing"
    assert ChargeAttempt.objects.get(idempotency_key=f"{order.pk}:stub-1").status == "rejected"
    services.order_confirm(
        order_id=order.pk, idempotency_key=f"{order.pk}:stub-2", status="paid", source="webhook",
        channel="stub-2", provider="stub",
    )  # fmt: skip
    order.refresh_from_db()
    assert (order.status, order.outcome, order.channel) == ("paid", "paid", "stub-2")
    assert "confirm.paid_after_refusal" in [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.django_db
def test_a_failover_says_what_the_channel_answered(stub, channels):
    # given stub-1 refusing the charge request as invalid (nothing processed)
    stub.answers["stub-1"] = ChargeResult(ChargeOutcome.REJECTED, http_status=400, error="invalid_request")
    order = assigned_order()
    # when
    services.order_charge(order_id=order.pk)
    # then the transition log says why (before: "(channel_unavailable)" whatever the answer was)
    failover = OrderTransition.objects.get(order=order, from_status="assigned", to_status="assigned")
    assert failover.reason == "failover from stub-1 (invalid_request) to stub-2"
