"""The transition table of SPEC 1, applied by orders.transitions.order_transition."""

import itertools
import uuid

import pytest
from django.db import Error, transaction
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders import events
from orders.models import IgnoredSignal, Order, OrderStatus, OrderTransition, OutboxEvent, Outcome
from orders.transitions import ALLOWED, RANK, IllegalTransition, order_insert, order_transition
from tests.factories import OrderFactory, make_merchant

pytestmark = pytest.mark.django_db

S = OrderStatus
STATUSES = [S.PENDING, S.ASSIGNED, S.PROCESSING, S.PAID, S.FAILED, S.COMPLETED]

# Written out from SPEC 1 rather than derived from the code under test.
SPEC_ALLOWED = {
    (S.PENDING, S.ASSIGNED),
    (S.PENDING, S.FAILED),
    (S.ASSIGNED, S.ASSIGNED),
    (S.ASSIGNED, S.PROCESSING),
    (S.ASSIGNED, S.FAILED),
    (S.PROCESSING, S.PAID),
    (S.PROCESSING, S.FAILED),
    (S.PAID, S.COMPLETED),
    (S.FAILED, S.COMPLETED),
}
# Skipping a stage forwards: a caller bug, refused loudly.
SPEC_ILLEGAL = {
    (S.PENDING, S.PROCESSING),
    (S.PENDING, S.PAID),
    (S.PENDING, S.COMPLETED),
    (S.ASSIGNED, S.PAID),
    (S.ASSIGNED, S.COMPLETED),
    (S.PROCESSING, S.COMPLETED),
}
# Everything else: the order is already at or past the target (paid and failed are one rank: the
# outcome never changes). Recorded and ignored.
SPEC_LATE = {(a, b) for a in STATUSES for b in STATUSES} - SPEC_ALLOWED - SPEC_ILLEGAL
OUTCOME_OF = {S.PAID: Outcome.PAID, S.FAILED: Outcome.FAILED, S.COMPLETED: Outcome.PAID}


def _order(status: str, *, merchant=None, outcome: str | None = None, channel: str | None = "ch-a") -> Order:
    if outcome is None:
        outcome = OUTCOME_OF.get(status)
    fields = {"status": status, "outcome": outcome}
    if status != S.PENDING:
        fields["channel"] = channel
    if merchant is not None:
        fields["merchant"] = merchant
    return OrderFactory(**fields)


def _new_order(*, merchant=None) -> Order:
    """A pending order inserted the way the API does: with its first transition and event."""
    order = OrderFactory.build(status=S.PENDING, merchant=merchant or make_merchant().merchant)
    order_insert(order=order)
    return order


def _move(order: Order, to: str, **kwargs):
    """Call order_transition the way the pipeline does: naming the state the decision was made for."""
    kwargs.setdefault("seen_status", order.status)
    kwargs.setdefault("seen_channel", order.channel)
    if to == S.ASSIGNED:
        kwargs.setdefault("channel", "ch-b")
    return order_transition(order_id=order.pk, to=to, reason=f"test signal to {to}", **kwargs)


def _snapshot(order: Order) -> tuple:
    order.refresh_from_db()
    return (order.status, order.outcome, order.channel, order.failure_code, order.updated_at)


def test_the_table_is_the_spec():
    # Exactly the spec's moves, plus the birth of an order (order_insert); nothing else.
    assert ALLOWED == SPEC_ALLOWED | {(None, S.PENDING)}
    # The three classes below are written by hand: a pair in two of them would be tested twice,
    # with contradictory expectations, and a pair in none of them not at all.
    assert not SPEC_ALLOWED & SPEC_ILLEGAL


@pytest.mark.parametrize("current,to", sorted(SPEC_ILLEGAL))
def test_illegal_transition_raises_and_changes_nothing(current, to):
    # given
    order = _order(current)
    before = _snapshot(order)
    # when
    with pytest.raises(IllegalTransition):
        _move(order, to)
    # then
    assert _snapshot(order) == before
    assert not OrderTransition.objects.filter(order=order).exists()
    assert not OutboxEvent.objects.filter(order_id=order.pk).exists()
    assert not IgnoredSignal.objects.filter(order=order).exists()


@pytest.mark.parametrize("current,to", sorted(SPEC_LATE))
def test_late_or_duplicate_signal_is_recorded_and_ignored(current, to):
    # given
    order = _order(current)
    before = _snapshot(order)
    # when
    result = _move(order, to)
    # then
    assert result.applied is False
    assert result.status == current
    assert _snapshot(order) == before
    assert not OrderTransition.objects.filter(order=order).exists()
    assert not OutboxEvent.objects.filter(order_id=order.pk).exists()
    ignored = IgnoredSignal.objects.get(order=order)
    assert (ignored.status_at_signal, ignored.requested_status) == (current, to)
    assert ignored.reason == f"test signal to {to}"


def test_late_signal_passed_a_stale_seen_status_is_ignored():
    # given: the caller read "processing", but the order has been paid since
    order = _order(S.PAID)
    # when: a late "failed" webhook arrives with the caller's stale view
    result = order_transition(order_id=order.pk, to=S.FAILED, seen_status=S.PROCESSING, reason="late webhook")
    # then
    assert result.applied is False
    order.refresh_from_db()
    assert (order.status, order.outcome) == (S.PAID, Outcome.PAID)
    assert IgnoredSignal.objects.filter(order=order, requested_status=S.FAILED).count() == 1


@pytest.mark.parametrize("current,to", sorted(SPEC_ALLOWED - {(S.ASSIGNED, S.ASSIGNED)}))
def test_allowed_transition_writes_one_row_and_one_event(current, to):
    # given
    order = _order(current)
    # when
    result = _move(order, to, failure_code="some_code" if to == S.FAILED else None)
    # then
    assert result.applied is True
    assert result.status == to
    order.refresh_from_db()
    assert order.status == to
    row = OrderTransition.objects.get(order=order)
    assert (row.from_status, row.to_status) == (current, to)
    assert row.reason == f"test signal to {to}"
    assert row.channel == order.channel
    event = OutboxEvent.objects.get(order_id=order.pk)
    expected_topic = events.CHANNEL_ALLOCATED if to == S.ASSIGNED else events.ORDER_UPDATED
    assert event.topic == expected_topic
    assert event.payload["status"] == to
    assert event.payload["order_id"] == str(order.pk)
    assert event.payload["channel"] == order.channel
    assert not IgnoredSignal.objects.filter(order=order).exists()


def test_assigning_sets_the_channel():
    order = _order(S.PENDING)

    result = _move(order, S.ASSIGNED, channel="sandbox-a")

    order.refresh_from_db()
    assert (result.applied, result.channel) == (True, "sandbox-a")
    assert (order.status, order.channel) == (S.ASSIGNED, "sandbox-a")
    assert OrderTransition.objects.get(order=order).channel == "sandbox-a"


@pytest.mark.parametrize("to,outcome", [(S.PAID, Outcome.PAID), (S.FAILED, Outcome.FAILED)])
def test_outcome_is_set_on_paid_and_failed(to, outcome):
    order = _order(S.PROCESSING)
    assert order.outcome is None

    _move(order, to)

    order.refresh_from_db()
    assert order.outcome == outcome


def test_failing_records_the_failure_code_and_message():
    order = _order(S.PENDING)

    _move(order, S.FAILED, failure_code="no_channel_available", failure_message="nothing fits")

    order.refresh_from_db()
    assert (order.status, order.outcome) == (S.FAILED, Outcome.FAILED)
    assert (order.failure_code, order.failure_message) == ("no_channel_available", "nothing fits")


@pytest.mark.parametrize("outcome", [Outcome.PAID, Outcome.FAILED])
def test_completed_keeps_the_outcome(outcome):
    # given
    order = _order(outcome, outcome=outcome)
    # when
    _move(order, S.COMPLETED)
    # then
    order.refresh_from_db()
    assert order.status == S.COMPLETED
    assert order.outcome == outcome
    assert order.completed_at is not None
    assert order.next_check_at is None


def test_non_terminal_transitions_schedule_the_next_check():
    order = _order(S.PENDING)

    _move(order, S.ASSIGNED)

    order.refresh_from_db()
    assert order.next_check_at is not None
    assert order.next_check_at > order.updated_at


def test_failover_moves_to_the_new_channel_when_the_seen_channel_is_current():
    # given
    order = _order(S.ASSIGNED, channel="ch-a")
    # when
    result = order_transition(
        order_id=order.pk,
        to=S.ASSIGNED,
        seen_status=S.ASSIGNED,
        seen_channel="ch-a",
        channel="ch-b",
        reason="failover",
    )
    # then
    assert (result.applied, result.channel) == (True, "ch-b")
    order.refresh_from_db()
    assert (order.status, order.channel) == (S.ASSIGNED, "ch-b")
    row = OrderTransition.objects.get(order=order)
    assert (row.from_status, row.to_status, row.channel) == (S.ASSIGNED, S.ASSIGNED, "ch-b")
    assert OutboxEvent.objects.get(order_id=order.pk).topic == events.CHANNEL_ALLOCATED


def test_failover_from_a_channel_that_is_no_longer_current_is_ignored():
    # given: the order already failed over from ch-x to ch-a
    order = _order(S.ASSIGNED, channel="ch-a")
    # when
    result = order_transition(
        order_id=order.pk,
        to=S.ASSIGNED,
        seen_status=S.ASSIGNED,
        seen_channel="ch-x",
        channel="ch-b",
        reason="failover",
    )
    # then
    assert result.applied is False
    order.refresh_from_db()
    assert (order.status, order.channel) == (S.ASSIGNED, "ch-a")
    assert not OrderTransition.objects.filter(order=order).exists()
    assert not OutboxEvent.objects.filter(order_id=order.pk).exists()
    assert IgnoredSignal.objects.filter(order=order).count() == 1


def test_failover_to_the_same_channel_is_a_duplicate():
    order = _order(S.ASSIGNED, channel="ch-a")

    result = _move(order, S.ASSIGNED, channel="ch-a")

    assert result.applied is False
    assert not OrderTransition.objects.filter(order=order).exists()
    assert IgnoredSignal.objects.filter(order=order).count() == 1


def test_two_racing_failovers_from_one_channel_move_the_order_once():
    # given: two workers both saw the order on ch-a
    order = _order(S.ASSIGNED, channel="ch-a")
    # when
    first = _move(order, S.ASSIGNED, seen_status=S.ASSIGNED, seen_channel="ch-a", channel="ch-b")
    second = _move(order, S.ASSIGNED, seen_status=S.ASSIGNED, seen_channel="ch-a", channel="ch-c")
    # then
    assert (first.applied, second.applied) == (True, False)
    order.refresh_from_db()
    assert order.channel == "ch-b"
    assert OrderTransition.objects.filter(order=order).count() == 1


def test_a_decision_about_an_assigned_order_must_name_its_channel():
    order = _order(S.ASSIGNED, channel="ch-a")

    with pytest.raises(ValueError):
        order_transition(order_id=order.pk, to=S.ASSIGNED, reason="no channel", seen_status=S.PENDING)
    with pytest.raises(ValueError):
        order_transition(order_id=order.pk, to=S.FAILED, reason="which channel?", seen_status=S.ASSIGNED)
    with pytest.raises(TypeError):
        order_transition(order_id=order.pk, to=S.FAILED, reason="no seen status")  # type: ignore[call-arg]
    order.refresh_from_db()
    assert (order.status, order.channel) == (S.ASSIGNED, "ch-a")


@pytest.mark.parametrize(
    "now_status,now_channel,seen_status,seen_channel,to",
    [
        # a charge copy decided "failed" while the order sat on ch-a; a racing copy failed over
        # to ch-b and was accepted there (issue 10 item 1, charge variant)
        (S.PROCESSING, "ch-b", S.ASSIGNED, "ch-a", S.FAILED),
        # the same copy, but the racing failover has only reached ch-b's assignment
        (S.ASSIGNED, "ch-b", S.ASSIGNED, "ch-a", S.FAILED),
        # an allocate copy found no room and decided "failed" for the pending order that a racing
        # copy had just assigned (allocation variant)
        (S.ASSIGNED, "ch-a", S.PENDING, None, S.FAILED),
        # a "paid" decided for the charge on ch-a cannot settle an order now processing on ch-b
        (S.PROCESSING, "ch-b", S.PROCESSING, "ch-a", S.PAID),
    ],
    ids=[
        "failed-after-failover-accepted",
        "failed-after-failover",
        "no-room-after-assigned",
        "paid-other-channel",
    ],
)
def test_a_decision_is_not_applied_to_an_order_that_moved_on(
    now_status, now_channel, seen_status, seen_channel, to
):
    # given: the order is no longer in the state the caller decided for
    order = _order(now_status, channel=now_channel)
    before = _snapshot(order)
    # when
    result = order_transition(
        order_id=order.pk,
        to=to,
        seen_status=seen_status,
        seen_channel=seen_channel,
        reason="decided for an older state",
        failure_code="channel_unavailable" if to == S.FAILED else None,
    )
    # then: nothing changed; the caller is told where the order is now
    assert (result.applied, result.status, result.channel) == (False, now_status, now_channel)
    assert _snapshot(order) == before
    assert not OrderTransition.objects.filter(order=order).exists()
    assert not OutboxEvent.objects.filter(order_id=order.pk).exists()
    ignored = IgnoredSignal.objects.get(order=order)
    assert (ignored.status_at_signal, ignored.requested_status) == (now_status, to)


def test_unknown_order_raises_does_not_exist():
    with pytest.raises(Order.DoesNotExist):
        order_transition(order_id=uuid.uuid4(), to=S.FAILED, seen_status=S.PROCESSING, reason="nobody")


def test_insert_writes_the_order_its_first_transition_and_event_in_one_statement(
    django_assert_num_queries,
):
    order = OrderFactory.build(status=S.PENDING, merchant=make_merchant().merchant)

    with django_assert_num_queries(1):
        order_insert(order=order)

    assert Order.objects.get(pk=order.pk).reference == order.reference
    row = OrderTransition.objects.get(order=order)
    assert (row.from_status, row.to_status) == (None, S.PENDING)
    assert OutboxEvent.objects.get(order_id=order.pk).topic == events.ORDER_CREATED


# --- the log is append-only at the database --------------------------------------------------


def test_transition_log_refuses_update_at_the_database():
    # given
    order = _new_order()
    # when / then
    with pytest.raises(Error, match="append-only"), transaction.atomic():
        OrderTransition.objects.filter(order=order).update(reason="rewritten")
    assert OrderTransition.objects.get(order=order).reason == "order created"


def test_transition_log_refuses_delete_at_the_database():
    # given
    order = _new_order()
    # when / then
    with pytest.raises(Error, match="append-only"), transaction.atomic():
        OrderTransition.objects.filter(order=order).delete()
    assert OrderTransition.objects.filter(order=order).count() == 1


def test_transition_log_refuses_a_model_save_of_an_existing_row():
    order = _new_order()
    row = OrderTransition.objects.get(order=order)
    row.to_status = S.PAID

    with pytest.raises(Error), transaction.atomic():
        row.save()

    row.refresh_from_db()
    assert row.to_status == S.PENDING


# --- property: random signal sequences ---------------------------------------------------------

signals = st.lists(
    st.tuples(st.sampled_from(STATUSES), st.sampled_from(["ch-a", "ch-b", "ch-c"])),
    min_size=1,
    max_size=25,
)


@pytest.fixture
def merchant(db):
    return make_merchant().merchant


@hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sequence=signals)
def test_random_signal_sequences_never_go_backwards(merchant, sequence):
    # given: a fresh order per example
    order = _new_order(merchant=merchant)
    # when / then: after every signal the order is never lower and its outcome never changes
    for to, channel in sequence:
        before_status, before_outcome = Order.objects.values_list("status", "outcome").get(pk=order.pk)
        order.refresh_from_db()
        try:
            _move(order, to, **({"channel": channel} if to == S.ASSIGNED else {}))
        except IllegalTransition:
            pass
        status, outcome = Order.objects.values_list("status", "outcome").get(pk=order.pk)
        assert RANK[status] >= RANK[before_status]
        if before_outcome is not None:
            assert outcome == before_outcome
        if status in (S.PAID, S.FAILED, S.COMPLETED):
            assert outcome is not None
    # and the log is a chain from creation to the current status
    rows = list(OrderTransition.objects.filter(order=order).order_by("id"))
    assert rows[0].from_status is None
    assert rows[0].to_status == S.PENDING
    for previous, row in itertools.pairwise(rows):
        assert row.from_status == previous.to_status
    order.refresh_from_db()
    assert rows[-1].to_status == order.status
    assert rows[-1].channel == order.channel
    # and exactly one event per applied transition
    assert OutboxEvent.objects.filter(order_id=order.pk).count() == len(rows)
