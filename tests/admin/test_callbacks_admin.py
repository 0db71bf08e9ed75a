"""Callback deliveries in the console: filter by status (exhausted too), resend in bulk, attempts inline."""

import pytest
from django.contrib.admin.models import LogEntry
from django.utils import timezone

from callbacks.models import CallbackDelivery
from callbacks.services import callback_deliver
from orders.models import OrderStatus

pytestmark = pytest.mark.django_db

LIST = "/admin/callbacks/callbackdelivery/"


@pytest.fixture
def exhausted(make_order, settings):
    """Two orders whose callback failed once and exhausted the (empty) retry schedule."""
    settings.CALLBACK_RETRY_SCHEDULE = []
    orders = [make_order(OrderStatus.PAID), make_order(OrderStatus.FAILED)]
    for order in orders:
        callback_deliver(order_id=order.pk)
    return list(CallbackDelivery.objects.filter(order__in=orders).order_by("id"))


def test_filter_by_status_shows_exhausted_deliveries(operator, exhausted, make_order):
    make_order(OrderStatus.PAID)
    pending = CallbackDelivery.objects.create(
        order=make_order(OrderStatus.PAID),
        event_type="order.paid",
        webhook_id="msg_pending",
        next_attempt_at=timezone.now(),
    )

    everything = operator.get(LIST).context["cl"].result_list
    only_exhausted = operator.get(LIST, {"status__exact": "exhausted"}).context["cl"].result_list
    only_pending = operator.get(LIST, {"status__exact": "pending"}).context["cl"].result_list
    by_event = operator.get(LIST, {"event_type": "order.failed"}).context["cl"].result_list

    assert {d.pk for d in everything} == {exhausted[0].pk, exhausted[1].pk, pending.pk}
    assert {d.pk for d in only_exhausted} == {exhausted[0].pk, exhausted[1].pk}
    assert [d.pk for d in only_pending] == [pending.pk]
    assert [d.event_type for d in by_event] == ["order.failed"]


def test_search_by_webhook_id_and_order_id(operator, exhausted):
    first, second = exhausted

    assert [d.pk for d in operator.get(LIST, {"q": first.webhook_id}).context["cl"].result_list] == [first.pk]
    assert [d.pk for d in operator.get(LIST, {"q": str(second.order_id)}).context["cl"].result_list] == [
        second.pk
    ]


def test_bulk_resend_makes_every_selected_delivery_due_with_the_same_webhook_id(
    operator, exhausted, admin_user
):
    response = operator.post(
        LIST, {"action": "resend", "_selected_action": [d.pk for d in exhausted]}, follow=True
    )

    assert "2 delivery(ies) made due" in response.content.decode()
    for before in exhausted:
        after = CallbackDelivery.objects.get(pk=before.pk)
        assert after.status == CallbackDelivery.Status.PENDING
        assert after.next_attempt_at <= timezone.now()
        assert after.webhook_id == before.webhook_id
        assert LogEntry.objects.get(object_id=str(before.pk)).user == admin_user


def test_resend_then_the_next_attempt_really_happens(operator, exhausted, settings):
    delivery = exhausted[0]
    operator.post(LIST, {"action": "resend", "_selected_action": [delivery.pk]})

    callback_deliver(order_id=delivery.order_id)

    delivery.refresh_from_db()
    assert delivery.attempts == 2
    assert delivery.attempt_log.count() == 2
    assert delivery.status == CallbackDelivery.Status.EXHAUSTED  # 127.0.0.1:9 still refuses


def test_delivery_page_lists_its_attempts_newest_first(operator, exhausted):
    delivery = exhausted[0]
    operator.post(LIST, {"action": "resend", "_selected_action": [delivery.pk]})
    callback_deliver(order_id=delivery.order_id)

    response = operator.get(f"{LIST}{delivery.pk}/change/")

    assert response.status_code == 200
    attempts = list(response.context["inline_admin_formsets"][0].formset.queryset)
    assert len(attempts) == 2
    assert attempts[0].attempted_at >= attempts[1].attempted_at
    assert "Connection refused" in response.content.decode()
    assert 'name="_save"' not in response.content.decode()
