"""The refund sweep (beat): overdue refunds are re-announced from the due time on their row, each
to the stage that moves it on; after its bound the sweep leaves a refund to operators."""

from datetime import timedelta

import pytest
from django.utils import timezone

from orders import events, services
from orders.models import OutboxEvent, Refund
from tests.factories import overdue_refund

pytestmark = pytest.mark.django_db


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
    refund = overdue_refund(status)
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
    refund = overdue_refund("pending")
    Refund.objects.filter(pk=refund.pk).update(check_count=events.MAX_SWEEP_CHECKS)
    services.refunds_sweep(batch=10)
    assert Refund.objects.get(pk=refund.pk).next_check_at is None


def test_a_503_is_waited_for_on_the_row():
    refund = overdue_refund("pending")
    assert services.refund_retry_later(refund_id=refund.pk, seconds=60)
    assert Refund.objects.get(pk=refund.pk).next_check_at > timezone.now() + timedelta(seconds=59)
    assert services.refunds_sweep(batch=10) == 0
