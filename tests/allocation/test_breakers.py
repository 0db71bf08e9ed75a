"""Breakers are transient (issue 10 item 14): an order whose channels are only cooling down waits
for them, a half-open breaker lets one trial through, and a minority of failures opens nothing."""

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from allocation.models import PaymentChannel
from allocation.services import (
    CHANNEL_UNAVAILABLE,
    NO_CHANNEL,
    channel_record_failure,
    channel_record_success,
    order_allocate,
)
from gateway import services
from gateway.providers.base import ChargeOutcome, ChargeResult
from orders.models import Order, OrderTransition
from tests.factories import ChannelFactory, OrderFactory, make_merchant
from tests.stub_provider import assigned_order


@pytest.fixture
def breaker(settings, redis_client):
    settings.CIRCUIT_FAILURE_THRESHOLD = 3
    settings.CIRCUIT_FAILURE_RATIO = 0.5
    settings.CIRCUIT_WINDOW_SECONDS = 3600  # one window for the whole test
    settings.CIRCUIT_COOLDOWN_SECONDS = 30
    settings.CHANNEL_WAIT_SECONDS = 300
    for key in redis_client.scan_iter("circuit:*"):
        redis_client.delete(key)
    yield settings
    for key in redis_client.scan_iter("circuit:*"):
        redis_client.delete(key)


def _open(code: str, *, for_seconds: float = 30) -> None:
    PaymentChannel.objects.filter(code=code).update(
        circuit_open_until=timezone.now() + timedelta(seconds=for_seconds)
    )


def _cool_down_over(code: str) -> None:
    """The cool-down has run out: the moment the breaker turns half-open."""
    PaymentChannel.objects.filter(code=code).update(circuit_open_until=timezone.now() - timedelta(seconds=1))


def _order(**fields) -> Order:
    return OrderFactory(merchant=make_merchant().merchant, **fields)


def _failed(order: Order) -> bool:
    return OrderTransition.objects.filter(order=order, to_status="failed").exists()


@pytest.mark.django_db
def test_an_order_whose_only_channel_is_cooling_down_waits_for_it(breaker):
    # given
    ChannelFactory(code="cooling")
    _open("cooling")
    order = _order()
    # when
    result = order_allocate(order_id=order.pk)
    # then: still pending, due when the breaker turns half-open, not failed
    assert result.applied is False
    order.refresh_from_db()
    reopen = PaymentChannel.objects.get(code="cooling").circuit_open_until
    assert (order.status, order.next_check_at) == ("pending", reopen)
    assert not _failed(order)
    # when: the cool-down is over and the sweep brings the order back
    _cool_down_over("cooling")
    result = order_allocate(order_id=order.pk)
    # then
    assert (result.applied, result.status, result.channel) == (True, "assigned", "cooling")


@pytest.mark.django_db
def test_waiting_ends_with_channel_unavailable_after_the_bound(breaker):
    ChannelFactory(code="cooling")
    _open("cooling")
    order = _order()
    Order.objects.filter(pk=order.pk).update(created_at=timezone.now() - timedelta(seconds=301))

    order_allocate(order_id=order.pk)

    order.refresh_from_db()
    assert (order.status, order.failure_code) == ("failed", CHANNEL_UNAVAILABLE)


@pytest.mark.django_db
def test_an_order_no_channel_could_ever_take_fails_at_once_with_no_channel_available(breaker):
    ChannelFactory(code="usd-only", currencies=["USD"])
    _open("usd-only")  # cooling down, but it could never take a JPY order anyway
    order = _order(currency="JPY")

    order_allocate(order_id=order.pk)

    order.refresh_from_db()
    assert (order.status, order.failure_code) == ("failed", NO_CHANNEL)


@pytest.mark.django_db
def test_a_half_open_breaker_lets_one_trial_through(breaker):
    # given: the only channel's cool-down is over
    ChannelFactory(code="flaky")
    _cool_down_over("flaky")
    first, second = _order(), _order()
    # when
    first_result = order_allocate(order_id=first.pk)
    second_result = order_allocate(order_id=second.pk)
    # then: one trial order goes; the other waits for the trial's answer
    assert (first_result.applied, first_result.channel) == (True, "flaky")
    assert second_result.applied is False
    second.refresh_from_db()
    assert second.status == "pending" and second.next_check_at > timezone.now()
    assert not _failed(second)


@pytest.mark.django_db
def test_an_order_turned_away_by_a_trial_that_closes_the_breaker_meanwhile_is_not_failed(
    breaker, redis_client
):
    # given: the only channel is half-open, and another order's trial is out on it
    ChannelFactory(code="flaky")
    _cool_down_over("flaky")
    redis_client.set("circuit:flaky:trial", "1", ex=60)
    order = _order()
    closed = []

    def trial_succeeds_meanwhile(execute, sql, params, many, context):
        # The trial's success closes the breaker (another worker's commit) just after this
        # order was turned away, before allocation asks which channels are cooling down.
        if "min(c.circuit_open_until)" in sql and not closed:
            closed.append(PaymentChannel.objects.filter(code="flaky").update(circuit_open_until=None))
        return execute(sql, params, many, context)

    # when
    with connection.execute_wrapper(trial_succeeds_meanwhile):
        result = order_allocate(order_id=order.pk)
    # then: the order waits, due at once; not failed with no_channel_available
    assert closed == [1]
    assert result.applied is False
    order.refresh_from_db()
    assert order.status == "pending" and order.next_check_at <= timezone.now()
    assert not _failed(order)
    # when: the sweep brings it back
    result = order_allocate(order_id=order.pk)
    # then: the channel, closed again, takes it
    assert (result.applied, result.status, result.channel) == (True, "assigned", "flaky")


@pytest.mark.django_db
def test_a_half_open_breaker_opens_again_at_the_first_failure_and_closes_on_a_success(breaker):
    flaky = ChannelFactory(code="flaky")
    _cool_down_over("flaky")

    assert channel_record_failure(channel_code="flaky") is True
    flaky.refresh_from_db()
    assert flaky.circuit_open_until > timezone.now()

    _cool_down_over("flaky")
    flaky.refresh_from_db()
    channel_record_success(channel=flaky)
    flaky.refresh_from_db()
    assert flaky.circuit_open_until is None


@pytest.mark.django_db
def test_a_minority_of_failures_does_not_open_the_breaker(breaker):
    # given: a channel that accepts most charges (half the orders of a burst refused once each)
    channel = ChannelFactory(code="busy")
    for _ in range(10):
        channel_record_success(channel=channel)
    # when: more failures than the threshold, but a third of the answers
    opened = [channel_record_failure(channel_code="busy") for _ in range(5)]
    # then
    assert opened == [False] * 5
    channel.refresh_from_db()
    assert channel.circuit_open_until is None
    # and a majority of failures does open it
    assert any(channel_record_failure(channel_code="busy") for _ in range(6))


@pytest.mark.django_db
def test_a_refused_order_waits_for_a_cooling_channel_then_fails_over_to_it(breaker, stub):
    # given: stub-1 refuses; stub-2, the only other channel, is cooling down
    ChannelFactory(code="stub-1", provider="stub", priority=1)
    ChannelFactory(code="stub-2", provider="stub", priority=2)
    stub.answers["stub-1"] = ChargeOutcome.REJECTED
    _open("stub-2")
    order = assigned_order("stub-1")
    # when
    services.order_charge(order_id=order.pk)
    # then: it waits on stub-1's refusal, due when stub-2's breaker turns half-open
    order.refresh_from_db()
    assert (order.status, order.channel) == ("assigned", "stub-1")
    assert order.next_check_at == PaymentChannel.objects.get(code="stub-2").circuit_open_until
    assert not _failed(order)
    # when: the cool-down is over and the sweep re-announces the order to the charge stage
    _cool_down_over("stub-2")
    services.order_charge(order_id=order.pk)  # refused before: fails over to stub-2
    services.order_charge(order_id=order.pk)  # the new assignment's charge
    # then: charged once, at stub-2
    order.refresh_from_db()
    assert (order.status, order.channel) == ("processing", "stub-2")
    assert stub.charges == {f"{order.pk}:stub-2"}
    assert stub.calls.count(f"{order.pk}:stub-1") == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("refusal", "opens"),
    [
        (
            ChargeResult(
                ChargeOutcome.REJECTED, http_status=404, error="resource_missing", request_refused=True
            ),
            False,
        ),
        (ChargeResult(ChargeOutcome.REJECTED, http_status=401, error="authentication_error"), True),
    ],
    ids=["the-requests-fault", "the-channels-fault"],
)
def test_only_refusals_that_are_the_channels_fault_open_its_breaker(breaker, stub, refusal, opens):
    # given stub-1 refuses every charge, as told; stub-2 takes what it refuses
    ChannelFactory(code="stub-1", provider="stub", priority=1)
    ChannelFactory(code="stub-2", provider="stub", priority=2)
    stub.answers["stub-1"] = refusal
    # when more orders than the threshold are refused by it
    orders = [assigned_order("stub-1") for _ in range(breaker.CIRCUIT_FAILURE_THRESHOLD + 2)]
    for order in orders:
        services.order_charge(order_id=order.pk)
    # then each failed over to stub-2 either way, and stub-1's breaker opened only for its own fault
    assert {Order.objects.get(pk=order.pk).channel for order in orders} == {"stub-2"}
    assert (PaymentChannel.objects.get(code="stub-1").circuit_open_until is not None) is opens
