"""Races between copies of a stage (issue 10 items 1 and 12): a decision applies only to the state
it was made for, and a refusal gives its reservation back exactly once.

Deterministic: copies are threads on their own connections to the real database, ordered by
events inside the stub provider (the one thing unit tests may stub) and by PostgreSQL's own
locks; every step's data is committed.
"""

import threading
import time
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, connections, transaction
from django.utils import timezone

from allocation.models import ChannelDailyVolume, PaymentChannel
from allocation.services import order_allocate
from gateway import services
from gateway.models import ChargeAttempt, ProviderWebhook
from gateway.providers import base
from gateway.providers.base import ChargeOutcome, ChargeResult
from orders.models import Order, OrderTransition
from tests.factories import ChannelFactory, OrderFactory, make_merchant
from tests.security.test_provider_webhooks import confirm_messages
from tests.stub_provider import StubProvider, assigned_order, path, stored_webhook

AMOUNT = 1050


class GatedStub(StubProvider):
    """The stub provider, whose first call to `gate_channel` waits inside the call until released."""

    def __init__(self, gate_channel: str) -> None:
        super().__init__()
        self.gate_channel = gate_channel
        self.entered = threading.Event()
        self.release = threading.Event()
        self._gated = False

    def charge(self, *, channel, request):
        with self.lock:
            gate = channel.code == self.gate_channel and not self._gated
            self._gated = self._gated or gate
        if gate:
            self.entered.set()
            assert self.release.wait(30), "the test never released the gated call"
        return super().charge(channel=channel, request=request)


@pytest.fixture
def gated():
    provider = GatedStub("stub-1")
    base.register(provider)
    yield provider
    provider.release.set()
    base._adapters.pop("stub", None)


def _in_thread(target, *args, **kwargs) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run():
        try:
            outcome.append(target(*args, **kwargs))
        except BaseException as exc:  # surfaced by the test's assertions
            outcome.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _expire_lease(order: Order, channel: str) -> None:
    """What a sender stalled past its lease (a long GC pause, a stopped VM) looks like to others."""
    expired = ChargeAttempt.objects.filter(order=order, channel=channel).update(
        lease_until=timezone.now() - timedelta(seconds=1)
    )
    assert expired == 1


def _reserved(code: str, day=None) -> int:
    volume = ChannelDailyVolume.objects.filter(channel__code=code, day=day or timezone.now().date()).first()
    return volume.reserved if volume else 0


def _reserve(order: Order, code: str, day=None) -> None:
    """The reservation allocation made for `order` on `code` (and the day it is recorded under)."""
    day = day or timezone.now().date()
    channel = PaymentChannel.objects.get(code=code)
    volume, _ = ChannelDailyVolume.objects.get_or_create(channel=channel, day=day)
    ChannelDailyVolume.objects.filter(pk=volume.pk).update(reserved=volume.reserved + order.amount)
    Order.objects.filter(pk=order.pk).update(reserved_on=day)


@pytest.mark.django_db(transaction=True)
def test_a_stalled_charge_copy_does_not_fail_an_order_that_failed_over_and_was_charged(gated):
    """Issue 10 item 1, charge variant: copy Y is stuck in stub-1's call; copies Z fail over to
    stub-2, which charges; Y's refusal then arrives and must change nothing. stub-2's cap holds
    one order, so Y finds no channel left and decides "failed" — for a state that is gone."""
    # given
    ChannelFactory(code="stub-1", provider="stub", priority=1)
    ChannelFactory(code="stub-2", provider="stub", priority=2, daily_cap=AMOUNT)
    gated.answers["stub-1"] = ChargeOutcome.REJECTED
    order = assigned_order("stub-1")
    _reserve(order, "stub-1")
    # when: Y enters stub-1's call and stalls there past its lease
    y, y_result = _in_thread(services.order_charge, order_id=order.pk)
    assert gated.entered.wait(30)
    _expire_lease(order, "stub-1")
    # and two other copies are refused by stub-1, fail over and charge at stub-2
    services.order_charge(order_id=order.pk)
    services.order_charge(order_id=order.pk)
    assert Order.objects.get(pk=order.pk).status == "processing"
    # and Y's refusal comes back
    gated.release.set()
    y.join(30)
    # then: the order is processing at stub-2, charged there once, and never failed
    assert not isinstance(y_result[0], BaseException), y_result
    assert y_result[0].applied is False
    order.refresh_from_db()
    assert (order.status, order.channel, order.outcome) == ("processing", "stub-2", None)
    assert gated.charges == {f"{order.pk}:stub-2"}
    assert ("assigned", "failed", "stub-1") not in path(order)
    assert not OrderTransition.objects.filter(order=order, to_status="failed").exists()
    # and the provider's paid webhook then settles it as paid
    services.order_confirm(
        order_id=order.pk, idempotency_key=f"{order.pk}:stub-2", status="paid", source="test"
    )
    assert Order.objects.get(pk=order.pk).status == "paid"


@pytest.mark.django_db(transaction=True)
def test_a_duplicated_refusal_gives_the_reservation_back_once(gated):
    """Issue 10 item 12: two copies both hear stub-1's refusal of one attempt."""
    # given: two orders with reservations on stub-1, one of them about to be refused
    ChannelFactory(code="stub-1", provider="stub", priority=1)
    ChannelFactory(code="stub-2", provider="stub", priority=2)
    gated.answers["stub-1"] = ChargeOutcome.REJECTED
    other = assigned_order("stub-1")
    _reserve(other, "stub-1")
    order = assigned_order("stub-1")
    _reserve(order, "stub-1")
    assert _reserved("stub-1") == 2 * AMOUNT
    # when: Y stalls in the call, Z hears the refusal and records it, then Y hears it too
    y, y_result = _in_thread(services.order_charge, order_id=order.pk)
    assert gated.entered.wait(30)
    _expire_lease(order, "stub-1")
    services.order_charge(order_id=order.pk)
    gated.release.set()
    y.join(30)
    # then: only the refused order's reservation went back, once
    assert not isinstance(y_result[0], BaseException), y_result
    assert _reserved("stub-1") == AMOUNT
    assert ChargeAttempt.objects.get(order=order, channel="stub-1").status == "rejected"


@pytest.mark.django_db
def test_a_refusal_after_midnight_gives_back_the_reservation_of_its_own_day(stub, channels):
    # given: the order's reservation was made yesterday; today's volume belongs to other orders
    stub.answers["stub-1"] = ChargeOutcome.REJECTED
    today = timezone.now().date()
    yesterday = today - timedelta(days=1)
    order = assigned_order("stub-1")
    _reserve(order, "stub-1", day=yesterday)
    _reserve(OrderFactory(), "stub-1", day=today)
    Order.objects.filter(pk=order.pk).update(reserved_on=yesterday)
    # when
    services.order_charge(order_id=order.pk)
    # then
    assert _reserved("stub-1", yesterday) == 0
    assert _reserved("stub-1", today) == AMOUNT


@pytest.mark.django_db(transaction=True)
def test_a_second_copy_does_not_send_while_the_first_holds_the_lease(gated):
    # given
    ChannelFactory(code="stub-1", provider="stub", priority=1)
    order = assigned_order("stub-1")
    y, y_result = _in_thread(services.order_charge, order_id=order.pk)
    assert gated.entered.wait(30)
    # when: a duplicate delivery runs while Y is still inside the provider call
    second = services.order_charge(order_id=order.pk)
    gated.release.set()
    y.join(30)
    # then: one request reached the provider; Y's answer moved the order
    assert second.applied is False
    assert gated.calls == [f"{order.pk}:stub-1"]
    assert y_result[0].applied is True
    assert Order.objects.get(pk=order.pk).status == "processing"


@pytest.mark.django_db
def test_the_database_refuses_a_second_live_attempt_for_an_order(channels):
    order = assigned_order("stub-1")
    ChargeAttempt.objects.create(
        order=order, channel="stub-1", provider="stub", idempotency_key="k1", status="accepted"
    )
    with pytest.raises(IntegrityError), transaction.atomic():
        ChargeAttempt.objects.create(
            order=order, channel="stub-2", provider="stub", idempotency_key="k2", status="sending"
        )
    # a refused attempt is not live: the order may be charged on another channel after it
    ChargeAttempt.objects.filter(idempotency_key="k1").update(status="rejected")
    ChargeAttempt.objects.create(
        order=order, channel="stub-2", provider="stub", idempotency_key="k2", status="sending"
    )


def _wait_for_lock_waiters(count: int) -> None:
    """Until `count` other backends wait for the volume table (bounded: fails rather than hangs)."""
    with connections["default"].cursor() as cursor:
        for _ in range(600):
            # pg_locks is read live (pg_stat_activity would be one snapshot per transaction).
            cursor.execute(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'allocation_channeldailyvolume'::regclass"
            )
            if cursor.fetchone()[0] >= count:
                return
            time.sleep(0.05)
    raise AssertionError(f"{count} allocations never reached the capped channel's reservation")


@pytest.mark.django_db(transaction=True)
def test_an_allocation_that_finds_no_room_does_not_fail_the_order_a_racing_copy_assigned():
    """Issue 10 item 1, allocation variant: the only channel's cap fits one order; two copies of
    allocate read the order pending; one reserves and assigns; the other finds no room."""
    # given
    ChannelFactory(code="tight", daily_cap=AMOUNT)
    order = OrderFactory(merchant=make_merchant().merchant, amount=AMOUNT)
    # when: both copies read the pending order and queue on the volume table; then go
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("LOCK TABLE allocation_channeldailyvolume IN EXCLUSIVE MODE")
        copies = [_in_thread(order_allocate, order_id=order.pk) for _ in range(2)]
        _wait_for_lock_waiters(2)
    for thread, _ in copies:
        thread.join(30)
    # then: one copy assigned it; the other's "failed" was for a pending order that is gone
    results = [outcome[0] for _, outcome in copies]
    assert not any(isinstance(result, BaseException) for result in results), results
    assert sorted(result.applied for result in results) == [False, True]
    order.refresh_from_db()
    assert (order.status, order.channel, order.outcome) == ("assigned", "tight", None)
    assert list(OrderTransition.objects.filter(order=order).values_list("from_status", "to_status")) == [
        ("pending", "assigned")
    ]
    assert _reserved("tight") == AMOUNT


@pytest.mark.django_db(transaction=True)
def test_a_timeout_answered_after_the_webhook_settled_the_charge_is_no_alarm(gated, caplog):
    """SPEC row 62: the charge request times out, but the charge is made and its webhook arrives
    while the request is still waiting. The attempt then holds the provider's word before the
    timeout comes back; that is the expected order of things, not a conflict of copies."""
    # given a charge whose call stays inside the provider, which will answer "unknown" (a timeout)
    ChannelFactory(code="stub-1", provider="stub", priority=1)
    gated.answers["stub-1"] = ChargeOutcome.UNKNOWN
    order = assigned_order("stub-1")
    _reserve(order, "stub-1")
    y, y_result = _in_thread(services.order_charge, order_id=order.pk)
    assert gated.entered.wait(30)
    # when the provider's paid webhook is confirmed meanwhile, and the timeout then comes back
    services.order_confirm(
        order_id=order.pk, idempotency_key=f"{order.pk}:stub-1", status="paid", source="webhook"
    )
    with caplog.at_level("INFO", logger="gateway.services"):
        gated.release.set()
        y.join(30)
    # then the order is paid, the attempt keeps the provider's word, and no error is logged
    assert not isinstance(y_result[0], BaseException), y_result
    assert Order.objects.get(pk=order.pk).outcome == "paid"
    assert ChargeAttempt.objects.get(order=order).status == ChargeAttempt.Status.PAID
    events = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert ("INFO", "charge.answer_after_settlement") in events, events
    assert not [record for record in caplog.records if record.levelno >= 40], events


@pytest.mark.parametrize(
    ("webhook_said", "answer_said", "alarms"),
    [
        ("paid", "failed", ["charge.answer_names_another_charge"]),
        ("failed", "paid", ["charge.answer_names_another_charge", "confirm.paid_after_failed"]),
    ],
)
@pytest.mark.django_db(transaction=True)
def test_a_charge_answer_naming_another_charge_than_the_word_that_settled_it_is_an_alarm(
    gated, caplog, webhook_said, answer_said, alarms
):
    """A provider's signed word tagged with our order and attempt, about a charge that is not
    ours (another system on the same Stripe account), outruns our own charge's answer and settles
    the order. The answer, which names our own charge, then disagrees: shown loudly (before: an
    INFO line), since the merchant may have been told "failed" with the money taken."""
    # given a charge whose call stays inside the provider, which will answer with its own charge
    ChannelFactory(code="stub-1", provider="stub", priority=1)
    gated.answers["stub-1"] = ChargeResult(
        ChargeOutcome.ACCEPTED, provider_reference="ch_ours", http_status=201, status=answer_said
    )
    order = assigned_order("stub-1")
    _reserve(order, "stub-1")
    y, y_result = _in_thread(services.order_charge, order_id=order.pk)
    assert gated.entered.wait(30)
    # when a word about someone else's charge settles it meanwhile, and our answer then comes back
    services.order_confirm(
        order_id=order.pk, idempotency_key=f"{order.pk}:stub-1", status=webhook_said, source="webhook",
        provider_reference="ch_someone_elses",
    )  # fmt: skip
    gated.release.set()
    y.join(30)
    # then the first word stands (SPEC 1), and an operator is told
    assert not isinstance(y_result[0], BaseException), y_result
    assert Order.objects.get(pk=order.pk).outcome == webhook_said
    assert [r.getMessage() for r in caplog.records if r.levelno >= 40] == alarms


def _confirms(redis_client, order) -> list[dict]:
    """The confirm stage's messages for `order` in the gateway queue (not its stage events)."""
    return [m for m in confirm_messages(redis_client, order) if "idempotency_key" in m]


@pytest.mark.parametrize(
    ("answer", "word_names", "then"),
    [
        (ChargeOutcome.ACCEPTED, "ch_someone_elses", (0, "processing", None, ["webhook.not_this_attempt"])),
        (ChargeOutcome.ACCEPTED, "ours", (1, "paid", "paid", [])),
        (ChargeOutcome.ACCEPTED, "", (1, "paid", "paid", [])),
        # a timeout names no charge: no word can be told ours, so none counts, and the provider is
        # asked about our own key at once (a status poll)
        (
            ChargeResult(ChargeOutcome.UNKNOWN, error="ReadTimeout"),
            "ch_elsewhere",
            (0, "processing", None, []),
        ),
        (ChargeOutcome.REJECTED, "", (1, "failed", "failed", ["confirm.paid_after_refusal"])),
    ],
    ids=["another charge", "our charge", "no charge named", "answer lost", "refused"],
)
@pytest.mark.django_db(transaction=True)
def test_a_word_that_comes_while_our_request_is_in_flight_waits_for_its_answer(
    gated, caplog, redis_client, answer, word_names, then
):
    """A signed "paid" stored while our charge request is still waiting for its answer is held,
    and handed to the confirm stage once the answer says which charge is ours: a word about
    another charge (another system's PaymentIntent tagged with our metadata) is then shown and
    handed to nobody (before: it settled the order first, and our own answer could only raise an
    alarm)."""
    # given a charge whose call stays inside the provider
    redis_client.delete("gateway")
    ChannelFactory(code="stub-1", provider="stub", priority=1)
    gated.answers["stub-1"] = answer
    order = assigned_order("stub-1")
    _reserve(order, "stub-1")
    key = f"{order.pk}:stub-1"
    y, y_result = _in_thread(services.order_charge, order_id=order.pk)
    assert gated.entered.wait(30)
    # when the provider's signed "paid" is stored meanwhile
    reference = f"ch_{key}" if word_names == "ours" else word_names
    receipt = stored_webhook(order, key, "paid", 1, provider_reference=reference)
    # then it is held: nothing moved, nothing handed on
    assert receipt == services.Receipt.HELD
    assert Order.objects.get(pk=order.pk).status == "assigned"
    assert _confirms(redis_client, order) == []
    # and once our answer comes back, it is handed to the confirm stage only if it may be about
    # our charge; the confirm stage (run here as its task runs it) then settles as for any word
    gated.release.set()
    y.join(30)
    assert not isinstance(y_result[0], BaseException), y_result
    handed, status, outcome, alarms = then
    messages = _confirms(redis_client, order)
    assert len(messages) == handed
    for message in messages:
        services.order_confirm(
            order_id=message["order_id"], idempotency_key=message["idempotency_key"],
            status=message["status"], failure_code=message["failure_code"], source="provider webhook",
            channel=message["channel"], provider=message["provider"],
            provider_reference=message["provider_reference"],
        )  # fmt: skip
    fresh = Order.objects.get(pk=order.pk)
    assert (fresh.status, fresh.outcome) == (status, outcome)
    assert [r.getMessage() for r in caplog.records if r.levelno >= 40] == alarms
    if word_names == "ch_someone_elses":
        assert fresh.provider_reference == f"ch_{key}"
        assert "not about this charge" in fresh.ignored_signals.get().reason
    if word_names == "ch_elsewhere":
        assert fresh.provider_reference is None
        assert fresh.next_check_at <= timezone.now()  # the sweep polls it now


def test_a_word_about_an_attempt_that_does_not_exist_is_not_stored(db, caplog):
    # A provider can know of a charge only after our request, which its stored attempt precedes.
    order = assigned_order("stub-1")
    event = base.WebhookEvent(
        webhook_id="msg_early", event_type="charge.paid", status="paid", order_id=str(order.pk),
        idempotency_key=f"{order.pk}:stub-1", channel="stub-1", failure_code="",
        provider_reference="ch_early", payload={}, amount=1,
    )  # fmt: skip
    assert services.webhook_receive(provider="stub", event=event) == services.Receipt.IGNORED
    assert not ProviderWebhook.objects.exists()
    assert "webhook.unknown_attempt" in [r.getMessage() for r in caplog.records]


@pytest.mark.django_db
def test_a_declined_payment_gives_its_reservation_back_once_and_a_paid_one_keeps_it(stub, channels):
    # given two orders charged on stub-1, each with its reservation
    declined, paid = assigned_order("stub-1"), assigned_order("stub-1")
    for order in (declined, paid):
        _reserve(order, "stub-1")
        services.order_charge(order_id=order.pk)
    assert _reserved("stub-1") == 2 * AMOUNT
    # when the provider declines one (twice: a webhook and a poll) and settles the other as paid
    for source in ("webhook", "poll"):
        services.order_confirm(
            order_id=declined.pk, idempotency_key=f"{declined.pk}:stub-1", status="failed",
            failure_code="card_declined", source=source,
        )  # fmt: skip
    services.order_confirm(
        order_id=paid.pk, idempotency_key=f"{paid.pk}:stub-1", status="paid", source="webhook"
    )
    # then the declined one moved no money and no longer takes room under the cap, given back
    # once (before: it kept its share for the day); the paid one keeps its share
    assert Order.objects.get(pk=declined.pk).outcome == "failed"
    assert _reserved("stub-1") == AMOUNT
