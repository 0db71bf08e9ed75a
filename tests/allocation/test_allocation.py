"""Channel allocation (SPEC 4): eligibility, priority, weight, atomic daily caps, circuit breaker."""

import threading
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from allocation.models import ChannelDailyVolume, PaymentChannel
from allocation.services import NO_CHANNEL, channel_record_failure, order_allocate
from orders.models import OrderStatus, OrderTransition, OutboxEvent, Outcome
from tests.factories import ChannelFactory, OrderFactory, make_merchant


@pytest.fixture
def merchant(db):
    return make_merchant().merchant


def _order(merchant, **fields):
    return OrderFactory(merchant=merchant, **fields)


def _allocated(order):
    order.refresh_from_db()
    return order.status, order.channel


def _reserved(channel: PaymentChannel) -> int:
    volume = ChannelDailyVolume.objects.filter(channel=channel, day=timezone.now().date()).first()
    return volume.reserved if volume else 0


@pytest.mark.django_db
def test_lowest_priority_number_wins(merchant):
    # given
    ChannelFactory(code="second", priority=2, weight=100)
    ChannelFactory(code="first", priority=1, weight=1)
    ChannelFactory(code="third", priority=3, weight=100)
    order = _order(merchant)
    # when
    result = order_allocate(order_id=order.pk)
    # then
    assert (result.applied, result.status, result.channel) == (True, OrderStatus.ASSIGNED, "first")
    assert _allocated(order) == (OrderStatus.ASSIGNED, "first")
    row = OrderTransition.objects.get(order=order)
    assert (row.from_status, row.to_status, row.channel) == ("pending", "assigned", "first")
    assert OutboxEvent.objects.get(order_id=order.pk).topic == "payment-channel-allocated"


@pytest.mark.django_db
def test_weighted_random_within_a_priority(merchant):
    # given
    ChannelFactory(code="light", weight=1)
    ChannelFactory(code="heavy", weight=3)
    orders = [_order(merchant, amount=100) for _ in range(400)]
    # when
    counts = Counter(order_allocate(order_id=order.pk).channel for order in orders)
    # then: expected 75 % on the heavy one
    assert counts["light"] + counts["heavy"] == 400
    assert 0.60 * 400 <= counts["heavy"] <= 0.90 * 400, counts


@pytest.mark.django_db
@pytest.mark.parametrize(
    "ineligible",
    [
        {"enabled": False},
        {"currencies": ["EUR", "GBP"]},
        {"min_amount": 2000},
        {"max_amount": 1000},
        {"circuit_open_until_in": timedelta(seconds=60)},
    ],
    ids=["disabled", "wrong-currency", "below-min", "above-max", "circuit-open"],
)
def test_ineligible_channel_is_skipped(merchant, ineligible):
    # given: the preferred channel is ineligible, a lower-priority one is fine
    fields = dict(ineligible)
    if "circuit_open_until_in" in fields:
        fields["circuit_open_until"] = timezone.now() + fields.pop("circuit_open_until_in")
    ChannelFactory(code="preferred", priority=1, **fields)
    ChannelFactory(code="fallback", priority=2)
    order = _order(merchant, amount=1500, currency="USD")
    # when
    result = order_allocate(order_id=order.pk)
    # then
    assert result.channel == "fallback"
    assert _allocated(order) == (OrderStatus.ASSIGNED, "fallback")


@pytest.mark.django_db
def test_amount_on_the_min_and_max_bounds_fits(merchant):
    ChannelFactory(code="bounded", min_amount=1500, max_amount=1500)

    result = order_allocate(order_id=_order(merchant, amount=1500).pk)

    assert result.channel == "bounded"


@pytest.mark.django_db
def test_circuit_whose_cooldown_is_over_is_eligible_again(merchant):
    ChannelFactory(code="recovered", circuit_open_until=timezone.now() - timedelta(seconds=1))

    result = order_allocate(order_id=_order(merchant).pk)

    assert result.channel == "recovered"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "channels",
    [
        [],
        [{"enabled": False}],
        [{"currencies": ["JPY"]}],
        [{"max_amount": 10}],
        [{"daily_cap": 1000}],
    ],
    ids=["none", "disabled", "currency", "amount", "cap"],
)
def test_nothing_fits_fails_the_order_with_no_channel_available(merchant, channels):
    # given
    for i, fields in enumerate(channels):
        ChannelFactory(code=f"ch-{i}", **fields)
    order = _order(merchant, amount=1050)
    # when
    result = order_allocate(order_id=order.pk)
    # then
    assert (result.applied, result.status) == (True, OrderStatus.FAILED)
    order.refresh_from_db()
    assert order.status == OrderStatus.FAILED
    assert order.outcome == Outcome.FAILED
    assert order.failure_code == NO_CHANNEL == "no_channel_available"
    assert order.failure_message
    assert order.channel is None
    assert not ChannelDailyVolume.objects.filter(reserved__gt=0).exists()


@pytest.mark.django_db
def test_daily_cap_is_respected_then_the_next_channel_takes_over(merchant):
    # given: a capped preferred channel with room for two orders
    capped = ChannelFactory(code="capped", priority=1, daily_cap=2500)
    ChannelFactory(code="overflow", priority=2)
    orders = [_order(merchant, amount=1000) for _ in range(4)]
    # when
    channels = [order_allocate(order_id=order.pk).channel for order in orders]
    # then
    assert channels == ["capped", "capped", "overflow", "overflow"]
    volume = ChannelDailyVolume.objects.get(channel=capped)
    assert (volume.reserved, volume.orders) == (2000, 2)


@pytest.mark.django_db
def test_an_order_exactly_filling_the_cap_fits(merchant):
    capped = ChannelFactory(code="capped", daily_cap=2000)

    first = order_allocate(order_id=_order(merchant, amount=1000).pk)
    second = order_allocate(order_id=_order(merchant, amount=1000).pk)
    third = order_allocate(order_id=_order(merchant, amount=1).pk)

    assert (first.channel, second.channel) == ("capped", "capped")
    assert third.status == OrderStatus.FAILED
    assert _reserved(capped) == 2000


@pytest.mark.django_db
def test_allocating_twice_gives_one_transition_and_one_reservation(merchant):
    # given
    channel = ChannelFactory(code="only", daily_cap=100_000)
    order = _order(merchant, amount=1000)
    # when
    first = order_allocate(order_id=order.pk)
    second = order_allocate(order_id=order.pk)
    # then
    assert first.applied is True
    assert second.applied is False
    assert second.status == OrderStatus.ASSIGNED
    assert OrderTransition.objects.filter(order=order).count() == 1
    assert OutboxEvent.objects.filter(order_id=order.pk).count() == 1
    assert _reserved(channel) == 1000


@pytest.mark.django_db
def test_allocating_a_missing_order_is_a_no_op():
    assert order_allocate(order_id=uuid.uuid4()) is None


@pytest.mark.django_db(transaction=True)
def test_concurrent_allocations_never_exceed_a_cap():
    # given: room for 10 orders of 1_000 on the capped channel, 30 orders, 8 workers
    merchant = make_merchant().merchant
    capped = ChannelFactory(code="capped", priority=1, daily_cap=10_000)
    ChannelFactory(code="overflow", priority=2)
    orders = [_order(merchant, amount=1000) for _ in range(30)]
    pending = list(orders)
    lock = threading.Lock()
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=10)
            while True:
                with lock:
                    if not pending:
                        return
                    order = pending.pop()
                order_allocate(order_id=order.pk)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    # when
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # then
    assert errors == []
    placed = Counter(_allocated(order) for order in orders)
    assert placed == {(OrderStatus.ASSIGNED, "capped"): 10, (OrderStatus.ASSIGNED, "overflow"): 20}
    volume = ChannelDailyVolume.objects.get(channel=capped)
    assert volume.reserved == 10_000 <= capped.daily_cap
    assert volume.orders == 10


@pytest.mark.django_db(transaction=True)
def test_two_workers_allocating_one_order_at_once_reserve_once():
    # given
    merchant = make_merchant().merchant
    channels = [ChannelFactory(code=f"ch-{i}") for i in range(4)]
    order = _order(merchant, amount=1000)
    barrier = threading.Barrier(2)
    results = []

    def worker() -> None:
        try:
            barrier.wait(timeout=10)
            results.append(order_allocate(order_id=order.pk))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    # when
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # then
    assert len(results) == 2
    assert sum(result.applied for result in results) == 1
    assert OrderTransition.objects.filter(order=order).count() == 1
    status, channel = _allocated(order)
    assert status == OrderStatus.ASSIGNED
    assert sum(_reserved(c) for c in channels) == 1000
    assert _reserved(next(c for c in channels if c.code == channel)) == 1000


@pytest.fixture
def no_circuit_counts(redis_client):
    for key in redis_client.scan_iter("circuit:*"):
        redis_client.delete(key)
    yield
    for key in redis_client.scan_iter("circuit:*"):
        redis_client.delete(key)


@pytest.mark.django_db
def test_circuit_opens_after_the_threshold_and_the_channel_is_skipped(merchant, settings, no_circuit_counts):
    # given
    settings.CIRCUIT_FAILURE_THRESHOLD = 3
    settings.CIRCUIT_WINDOW_SECONDS = 3600  # one window for the whole test
    settings.CIRCUIT_COOLDOWN_SECONDS = 30
    flaky = ChannelFactory(code="flaky", priority=1)
    ChannelFactory(code="steady", priority=2)
    # when: failures below the threshold
    below = [channel_record_failure(channel_code="flaky") for _ in range(2)]
    # then: still closed, still chosen
    assert below == [False, False]
    flaky.refresh_from_db()
    assert flaky.circuit_open_until is None
    assert order_allocate(order_id=_order(merchant).pk).channel == "flaky"
    # when: the threshold is reached
    opened = channel_record_failure(channel_code="flaky")
    # then: open for the cool-down, and skipped
    assert opened is True
    flaky.refresh_from_db()
    remaining = flaky.circuit_open_until - timezone.now()
    assert timedelta(seconds=25) < remaining <= timedelta(seconds=30)
    assert order_allocate(order_id=_order(merchant).pk).channel == "steady"


@pytest.mark.django_db
def test_failures_of_one_channel_do_not_open_another(settings, no_circuit_counts):
    settings.CIRCUIT_FAILURE_THRESHOLD = 2
    settings.CIRCUIT_WINDOW_SECONDS = 3600
    ChannelFactory(code="bad")
    good = ChannelFactory(code="good")

    channel_record_failure(channel_code="bad")
    channel_record_failure(channel_code="bad")

    good.refresh_from_db()
    assert good.circuit_open_until is None
    assert PaymentChannel.objects.get(code="bad").circuit_open_until is not None
