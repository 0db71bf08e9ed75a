"""The refund sweep (beat): overdue refunds are re-announced from the due time on their row, each
to the stage that moves it on; after its bound the sweep leaves a refund to operators."""

from datetime import timedelta

import pytest
from django.utils import timezone

from orders import events, services
from orders.models import Order, OutboxEvent, Refund
from orders.transitions import refund_transition
from tests.factories import OrderFactory, make_paid

pytestmark = pytest.mark.django_db


def _refund(status: str = "pending") -> Refund:
    order = OrderFactory(amount=1000)
    make_paid(order.pk)
    result = services.refund_create(
        merchant=Order.objects.get(pk=order.pk).merchant,
        order_id=str(order.pk),
        idempotency_key="k",
        fingerprint="f",
        amount=100,
    )
    refund_id = result.body["id"]
    if status != "pending":
        refund_transition(refund_id=refund_id, to="processing", seen_status="pending", reason="test")
    if status in ("succeeded", "failed"):
        refund_transition(refund_id=refund_id, to=status, seen_status="processing", reason="test")
    Refund.objects.filter(pk=refund_id).update(next_check_at=timezone.now() - timedelta(seconds=1))
    return Refund.objects.get(pk=refund_id)


@pytest.mark.parametrize(
    ("status", "topic", "subscriber"),
    [
        ("pending", events.REFUND_CREATED, events.REFUND),
        ("processing", events.REFUND_UPDATED, events.REFUND_POLL),
        ("succeeded", events.REFUND_UPDATED, events.REFUND_CALLBACK),
        ("failed", events.REFUND_UPDATED, events.REFUND_CALLBACK),
    ],
)
def test_an_overdue_refund_is_re_announced_to_the_stage_that_moves_it(status, topic, subscriber):
    refund = _refund(status)
    before = OutboxEvent.objects.count()
    assert services.refunds_sweep(batch=10) == 1
    event = OutboxEvent.objects.order_by("-id").first()
    assert OutboxEvent.objects.count() == before + 1
    assert (event.topic, event.payload["refund_id"], event.payload["redelivery"]) == (
        topic,
        str(refund.pk),
        True,
    )
    assert events.subscribers_for(event.topic, event.payload) == [subscriber]
    swept = Refund.objects.get(pk=refund.pk)
    assert swept.check_count == 1 and swept.next_check_at > timezone.now()
    # not due again at once
    assert services.refunds_sweep(batch=10) == 0


def test_the_sweep_gives_up_after_its_bound():
    refund = _refund("pending")
    Refund.objects.filter(pk=refund.pk).update(check_count=services.MAX_SWEEP_CHECKS)
    services.refunds_sweep(batch=10)
    assert Refund.objects.get(pk=refund.pk).next_check_at is None


def test_a_503_is_waited_for_on_the_row():
    refund = _refund("pending")
    assert services.refund_retry_later(refund_id=refund.pk, seconds=60)
    assert Refund.objects.get(pk=refund.pk).next_check_at > timezone.now() + timedelta(seconds=59)
    assert services.refunds_sweep(batch=10) == 0
