"""The refund stages against a stub provider adapter: sent once under the refund's own stored key,
to the channel that charged, twice in a row and two copies at once; a 503 waits on the row and goes
to the same channel again; unknown outcomes wait for a poll or a webhook (SPEC 10)."""

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from gateway import services
from gateway.models import RefundAttempt
from gateway.providers.base import ChargeOutcome, RefundResult
from orders.models import IgnoredSignal, Order, Refund
from orders.services import refund_create, refund_fingerprint
from tests.stub_provider import assigned_order, stored_webhook

UNAVAILABLE = RefundResult(ChargeOutcome.REJECTED, http_status=503, error="channel_unavailable", retry=True)


def _paid_order(stub) -> Order:
    order = assigned_order("stub-1")
    services.order_charge(order_id=order.pk)
    services.order_confirm(
        order_id=order.pk, idempotency_key=f"{order.pk}:stub-1", status="paid", source="test"
    )
    return Order.objects.get(pk=order.pk)


def _time_passes(refund: Refund) -> None:
    """The provider's backoff is over and the refund is due (what the sweep waits for)."""
    past = timezone.now() - timedelta(seconds=1)
    Refund.objects.filter(pk=refund.pk).update(next_check_at=past)
    RefundAttempt.objects.filter(refund=refund).update(retry_after=past)


def _refund(order: Order, amount: int = 500) -> Refund:
    result = refund_create(
        merchant=order.merchant,
        order_id=str(order.pk),
        idempotency_key=f"k-{amount}-{Refund.objects.count()}",
        fingerprint=refund_fingerprint(order_id=order.pk, data={"amount": amount}),
        amount=amount,
    )
    return Refund.objects.get(pk=result.body["id"])


@pytest.mark.django_db
def test_refund_twice_in_a_row_is_one_request_under_the_refunds_own_key(stub, channels):
    order = _paid_order(stub)
    refund = _refund(order)
    services.refund_send(refund_id=refund.pk)
    services.refund_send(refund_id=refund.pk)
    assert stub.refund_calls == [("stub-1", f"refund:{refund.pk}")]
    attempt = RefundAttempt.objects.get(refund=refund)
    assert (attempt.channel, attempt.charge_idempotency_key) == ("stub-1", f"{order.pk}:stub-1")
    assert Refund.objects.get(pk=refund.pk).status == "processing"


@pytest.mark.django_db
def test_the_send_is_logged_with_how_long_the_provider_took(stub, channels, caplog):
    refund = _refund(_paid_order(stub))
    with caplog.at_level("INFO", logger="gateway.services"):
        services.refund_send(refund_id=refund.pk)
    (sent,) = [r for r in caplog.records if r.msg == "refund.sent"]
    assert (sent.refund_id, sent.outcome) == (str(refund.pk), "accepted")
    assert isinstance(sent.duration_ms, int) and sent.duration_ms >= 0


@pytest.mark.django_db(transaction=True)
def test_refund_twice_at_once_is_one_request(stub, channels):
    order = _paid_order(stub)
    refund = _refund(order)
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        try:
            services.refund_send(refund_id=refund.pk)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(stub.refund_calls) == 1
    assert Refund.objects.get(pk=refund.pk).status == "processing"


@pytest.mark.django_db
def test_a_503_waits_on_the_row_and_goes_to_the_same_channel_never_another(stub, channels, settings):
    # given the order was charged on stub-1 (stub-2 exists too), and stub-1 answers 503 first
    settings.REFUND_RETRY_SECONDS = 30
    order = _paid_order(stub)
    refund = _refund(order)
    stub.refund_answers = [UNAVAILABLE]
    before = timezone.now()
    # when
    services.refund_send(refund_id=refund.pk)
    # then it waits, pending, due later (a stored due time, not a countdown)
    waiting = Refund.objects.get(pk=refund.pk)
    assert waiting.status == "pending"
    assert waiting.next_check_at >= before + timedelta(seconds=30)
    assert RefundAttempt.objects.get(refund=refund).sends == 1
    # a duplicate delivery meanwhile does not cut the wait short
    services.refund_send(refund_id=refund.pk)
    assert len(stub.refund_calls) == 1
    # and when it is due, the retry goes to the same channel under the same key
    _time_passes(refund)
    services.refund_send(refund_id=refund.pk)
    assert stub.refund_calls == [("stub-1", f"refund:{refund.pk}")] * 2
    assert Refund.objects.get(pk=refund.pk).status == "processing"
    # taken: the console no longer shows a time before which it may not be sent
    assert RefundAttempt.objects.get(refund=refund).retry_after is None


@pytest.mark.django_db
def test_a_refund_refused_for_good_fails_and_gives_its_amount_back(stub, channels):
    order = _paid_order(stub)
    refund = _refund(order, amount=order.amount)
    stub.refund_answers = [
        RefundResult(ChargeOutcome.REJECTED, http_status=400, error="amount_exceeds_charge")
    ]
    services.refund_send(refund_id=refund.pk)
    failed = Refund.objects.get(pk=refund.pk)
    assert (failed.status, failed.failure_code) == ("failed", "refund_refused")
    assert Order.objects.get(pk=order.pk).refund_held == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (UNAVAILABLE, "The provider refused the refund: channel_unavailable."),
        # never reached (before: "The provider refused the refund", which it never heard of)
        (
            RefundResult(ChargeOutcome.REJECTED, error="not sent: ConnectionError", retry=True),
            "The refund could not be sent to the provider (not sent: ConnectionError).",
        ),
    ],
    ids=["503", "never-sent"],
)
def test_a_refund_refused_or_unsent_every_time_fails_after_the_bound_with_nothing_refunded(
    stub, channels, settings, answer, message
):
    settings.REFUND_MAX_SENDS = 3
    order = _paid_order(stub)
    refund = _refund(order)
    stub.refund_answers = [answer] * 3
    for _ in range(3):
        _time_passes(refund)
        services.refund_send(refund_id=refund.pk)
    failed = Refund.objects.get(pk=refund.pk)
    assert (failed.status, failed.failure_code, failed.failure_message) == (
        "failed",
        "channel_unavailable",
        message,
    )
    assert len(stub.refund_calls) == 3


@pytest.mark.django_db
def test_unknown_outcome_waits_in_processing_until_a_poll_says(stub, channels):
    order = _paid_order(stub)
    refund = _refund(order)
    stub.refund_answers = [RefundResult(ChargeOutcome.UNKNOWN, error="after sending: ReadTimeout")]
    services.refund_send(refund_id=refund.pk)
    assert Refund.objects.get(pk=refund.pk).status == "processing"
    services.refund_poll(refund_id=refund.pk)  # the provider still says pending
    assert Refund.objects.get(pk=refund.pk).status == "processing"
    stub.refund_status, stub.refund_reference = "succeeded", "re_from_the_status_answer"
    services.refund_poll(refund_id=refund.pk)
    assert Refund.objects.get(pk=refund.pk).status == "succeeded"
    assert Order.objects.get(pk=order.pk).amount_refunded == 500
    # the provider's id from its status answer is kept: the console finds the refund by it
    assert RefundAttempt.objects.get(refund=refund).provider_reference == "re_from_the_status_answer"
    assert stub.refund_calls == [("stub-1", f"refund:{refund.pk}")]


@pytest.mark.django_db
def test_a_webhook_counts_only_for_its_channel_and_a_late_one_changes_nothing(stub, channels):
    order = _paid_order(stub)
    refund = _refund(order)
    services.refund_send(refund_id=refund.pk)
    key = f"refund:{refund.pk}"
    # signed by another channel: nothing
    assert (
        services.refund_confirm(
            idempotency_key=key, status="succeeded", source="webhook", channel="stub-2", provider="stub"
        )
        is None
    )
    assert Refund.objects.get(pk=refund.pk).status == "processing"
    # its own channel: succeeded; then a duplicate and a late failure change nothing
    services.refund_confirm(
        idempotency_key=key, status="succeeded", source="webhook", channel="stub-1", provider="stub"
    )
    services.refund_confirm(
        idempotency_key=key, status="succeeded", source="webhook", channel="stub-1", provider="stub"
    )
    services.refund_confirm(
        idempotency_key=key, status="failed", source="webhook", channel="stub-1", provider="stub"
    )
    assert Refund.objects.get(pk=refund.pk).status == "succeeded"
    assert Order.objects.get(pk=order.pk).amount_refunded == 500
    assert IgnoredSignal.objects.filter(refund=refund).count() == 2


@pytest.mark.django_db
def test_the_providers_word_may_outrun_our_record_of_the_request(stub, channels):
    # given the refund's request was claimed (key stored) but its answer not yet recorded
    order = _paid_order(stub)
    refund = _refund(order)
    stub.refund_answers = [UNAVAILABLE]
    services.refund_send(refund_id=refund.pk)
    # when the provider's webhook says succeeded
    services.refund_confirm(idempotency_key=f"refund:{refund.pk}", status="succeeded", source="webhook")
    # then pending -> processing -> succeeded, in the log
    steps = list(refund.transitions.order_by("id").values_list("from_status", "to_status"))
    assert steps == [(None, "pending"), ("pending", "processing"), ("processing", "succeeded")]


@pytest.mark.django_db
def test_a_webhook_that_outruns_the_answer_leaves_the_send_recorded(stub, channels, monkeypatch):
    # given the provider's webhook settles the refund while its answer to our request is in flight
    order = _paid_order(stub)
    refund = _refund(order)
    answer_of = stub.refund

    def refund_then_webhook(*, channel, request):
        answer = answer_of(channel=channel, request=request)
        services.refund_confirm(idempotency_key=request.idempotency_key, status="succeeded", source="webhook")
        return answer

    monkeypatch.setattr(stub, "refund", refund_then_webhook)
    # when the answer is recorded after it
    services.refund_send(refund_id=refund.pk)
    # then the webhook's status stands, and the send and its reference are on the record
    attempt = RefundAttempt.objects.get(refund=refund)
    assert (attempt.status, attempt.sends, attempt.provider_reference) == ("succeeded", 1, "re_1")
    assert Refund.objects.get(pk=refund.pk).status == "succeeded"


@pytest.mark.django_db
def test_a_refunds_first_stored_word_wins_whichever_confirm_arrives_first(stub, channels):
    # given a refund whose provider said succeeded, then failed, both stored on arrival
    order = _paid_order(stub)
    refund = _refund(order)
    services.refund_send(refund_id=refund.pk)
    key = f"refund:{refund.pk}"
    stored_webhook(order, key, "succeeded", 1, kind="refund")
    stored_webhook(order, key, "failed", 2, failure_code="refund_declined", kind="refund")
    # when the failed word reaches the confirm stage first
    services.refund_confirm(
        idempotency_key=key, status="failed", source="webhook", channel="stub-1", provider="stub"
    )
    # then the refund succeeded, as the provider said first, and the order counts it refunded
    assert Refund.objects.get(pk=refund.pk).status == "succeeded"
    assert Order.objects.get(pk=order.pk).amount_refunded == 500
    assert RefundAttempt.objects.get(refund=refund).status == "succeeded"
    # and once settled, a late word is recorded as what it said
    services.refund_confirm(
        idempotency_key=key, status="failed", source="webhook", channel="stub-1", provider="stub"
    )
    assert IgnoredSignal.objects.filter(refund=refund, requested_status="failed").count() == 1
    assert Refund.objects.get(pk=refund.pk).status == "succeeded"


@pytest.mark.django_db
def test_a_succeeded_word_for_a_refused_refund_changes_nothing_and_is_shown_loudly(stub, channels, caplog):
    # given a refund the provider refused for good (nothing refunded: failed, its amount free again)
    order = _paid_order(stub)
    refund = _refund(order, amount=order.amount)
    stub.refund_answers = [
        RefundResult(ChargeOutcome.REJECTED, http_status=400, error="amount_exceeds_charge")
    ]
    services.refund_send(refund_id=refund.pk)
    # when another channel's provider claims it (its secret did not sign this refund's channel)
    assert (
        services.refund_confirm(
            idempotency_key=f"refund:{refund.pk}",
            status="succeeded",
            source="provider webhook",
            channel="stub-2",
            provider="stub",
            order_id=str(order.pk),
        )
        is None
    )
    # then nothing is recorded (before this was checked second: a stranger's word raised the alarm)
    assert not IgnoredSignal.objects.filter(refund=refund).exists()
    # when the provider that refused then says, signed, that it refunded after all
    result = services.refund_confirm(
        idempotency_key=f"refund:{refund.pk}", status="succeeded", source="provider webhook",
        channel="stub-1", provider="stub", order_id=str(order.pk),
    )  # fmt: skip
    # then the refund and its refused attempt stay as they were (before: the attempt was rewritten
    # succeeded, with INFO lines only, while another refund could take the same amount)
    assert result is not None and not result.applied
    assert Refund.objects.get(pk=refund.pk).status == "failed"
    assert RefundAttempt.objects.get(refund=refund).status == "rejected"
    assert Order.objects.get(pk=order.pk).amount_refunded == 0
    # and an operator is shown it: on the refund, and as an error to alert on
    [signal] = IgnoredSignal.objects.filter(refund=refund)
    assert signal.requested_status == "succeeded" and "refused" in signal.reason
    assert "refund_confirm.succeeded_after_refusal" in [
        r.getMessage() for r in caplog.records if r.levelname == "ERROR"
    ]


@pytest.mark.django_db
def test_a_succeeded_word_for_a_declined_refund_changes_nothing_and_is_shown_loudly(stub, channels, caplog):
    # given a refund the provider declined (failed: its amount is refundable again)
    order = _paid_order(stub)
    refund = _refund(order)
    services.refund_send(refund_id=refund.pk)
    key = f"refund:{refund.pk}"
    services.refund_confirm(idempotency_key=key, status="failed", source="poll")
    assert Refund.objects.get(pk=refund.pk).status == "failed"
    # when its provider then says it succeeded after all
    services.refund_confirm(
        idempotency_key=key, status="succeeded", source="provider webhook", channel="stub-1", provider="stub"
    )
    # then the refund stays failed (SPEC 10), recorded as ignored, and an operator is told
    # loudly: the same amount may be refunded again (before: an INFO line only)
    assert Refund.objects.get(pk=refund.pk).status == "failed"
    assert IgnoredSignal.objects.filter(refund=refund, requested_status="succeeded").count() == 1
    assert "refund_confirm.succeeded_after_failed" in [
        r.getMessage() for r in caplog.records if r.levelname == "ERROR"
    ]


@pytest.mark.django_db
def test_a_refund_webhook_naming_another_order_settles_nothing(stub, channels):
    # given a refund in flight, and another order of the same channel
    order, other = _paid_order(stub), _paid_order(stub)
    refund = _refund(order)
    services.refund_send(refund_id=refund.pk)
    # when a webhook signed by the channel names the refund's key but the other order (before:
    # it settled the refund all the same)
    result = services.refund_confirm(
        idempotency_key=f"refund:{refund.pk}", status="succeeded", source="provider webhook",
        channel="stub-1", provider="stub", order_id=str(other.pk),
    )  # fmt: skip
    # then nothing moved; the refund's own order settles it
    assert result is None
    assert Refund.objects.get(pk=refund.pk).status == "processing"
    services.refund_confirm(
        idempotency_key=f"refund:{refund.pk}", status="succeeded", source="provider webhook",
        channel="stub-1", provider="stub", order_id=str(order.pk),
    )  # fmt: skip
    assert Refund.objects.get(pk=refund.pk).status == "succeeded"


@pytest.mark.parametrize(
    ("word_names", "answer_lost", "handed", "alarms"),
    [
        ("re_someone_elses", False, 0, ["webhook.not_this_attempt"]),
        ("re_1", False, 1, []),
        # a timeout names no refund: no word can be told ours, and the provider is asked now
        ("re_1", True, 0, []),
    ],
    ids=["another refund", "our refund", "answer lost"],
)
@pytest.mark.django_db(transaction=True)
def test_a_refund_word_that_comes_while_our_request_is_in_flight_waits_for_its_answer(
    stub, channels, redis_client, caplog, word_names, answer_lost, handed, alarms
):
    # given a refund whose request stays inside the provider (which will answer with re_1)
    order = _paid_order(stub)
    refund = _refund(order)
    if answer_lost:
        stub.refund_answers = [RefundResult(ChargeOutcome.UNKNOWN, error="ReadTimeout")]
    redis_client.delete("gateway")
    entered, release = threading.Event(), threading.Event()
    answer = stub.refund

    def held_inside(**kwargs):
        entered.set()
        release.wait(30)
        return answer(**kwargs)

    stub.refund = held_inside
    sender = threading.Thread(target=lambda: (services.refund_send(refund_id=refund.pk), connection.close()))
    sender.start()
    try:
        assert entered.wait(30)
        # when a signed "succeeded" comes meanwhile, naming a refund
        key = f"refund:{refund.pk}"
        receipt = stored_webhook(order, key, "succeeded", 1, kind="refund", provider_reference=word_names)
        # then it is held: nothing moved, nothing handed on (before: handed on, and it settled
        # the refund whichever refund it named)
        assert receipt == services.Receipt.HELD
        assert not _refund_confirms(redis_client, key)
    finally:
        release.set()
        sender.join(30)
    # and once our answer names re_1, it goes to the refund's confirm stage only if it is about it
    assert len(_refund_confirms(redis_client, key)) == handed
    assert [r.getMessage() for r in caplog.records if r.levelno >= 40] == alarms
    fresh = Refund.objects.get(pk=refund.pk)
    assert fresh.status == "processing"
    if answer_lost:
        assert fresh.next_check_at <= timezone.now()  # the sweep polls it now


def _refund_confirms(redis_client, key: str) -> list[dict]:
    """The refund confirm stage's messages about `key` in the gateway queue."""
    import base64
    import json

    messages = []
    for raw in redis_client.lrange("gateway", 0, -1):
        message = json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
        if isinstance(message, dict) and message.get("idempotency_key") == key:
            messages.append(message)
    return messages
