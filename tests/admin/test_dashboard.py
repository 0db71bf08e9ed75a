"""The dashboard: what an operator sees at /admin/dashboard/, and who may see it."""

from datetime import timedelta

import pytest
from django.utils import timezone

from callbacks.services import callback_deliver
from core.redis import get_broker_redis
from orders.models import Order, OrderStatus
from orders.selectors import orders_latency, orders_per_minute
from tests.admin.factories import ChargeAttemptFactory
from tests.factories import OrderFactory

pytestmark = pytest.mark.django_db

URL = "/admin/dashboard/"


def _completed(*, seconds: float, minutes_ago: int = 5) -> Order:
    done = timezone.now() - timedelta(minutes=minutes_ago)
    order = OrderFactory(status=OrderStatus.COMPLETED, outcome="paid", completed_at=done, next_check_at=None)
    Order.objects.filter(pk=order.pk).update(created_at=done - timedelta(seconds=seconds))
    return order


def test_the_admin_index_links_to_the_dashboard(operator):
    assert 'href="/admin/dashboard/"' in operator.get("/admin/").content.decode()


def test_dashboard_shows_every_section(operator, make_order, settings):
    # given: open orders in each stage, completed ones, an exhausted callback, a stuck order
    settings.CALLBACK_RETRY_SCHEDULE = []
    make_order(OrderStatus.PENDING)
    make_order(OrderStatus.PROCESSING)
    exhausted = make_order(OrderStatus.PAID)
    callback_deliver(order_id=exhausted.pk)
    stuck = make_order(OrderStatus.PROCESSING)
    Order.objects.filter(pk=stuck.pk).update(next_check_at=None)  # the sweep gave up on it
    completed = [_completed(seconds=seconds) for seconds in (1, 2, 3, 4, 10)]
    for order, status in zip(completed, ("paid", "paid", "paid", "failed"), strict=False):
        ChargeAttemptFactory(order=order, channel="fake-a", status=status)

    # when
    response = operator.get(URL)

    # then
    assert response.status_code == 200
    html = response.content.decode()
    context = response.context
    assert dict((str(badge).split(">")[1].split("<")[0], n) for badge, n in context["statuses"]) == {
        "pending": 1,
        "assigned": 0,
        "processing": 2,
        "paid": 1,
        "failed": 0,
    }
    assert context["completed_last_hour"] == 5
    assert context["latency"].count == 5 and context["latency"].p50 == pytest.approx(3.0, abs=0.01)
    assert context["latency_text"]["p50"] == "3.00 s"
    assert '<svg class="chart"' in html and "Orders created and completed per minute" in html
    assert 'src="http' not in html and 'href="http' not in html  # nothing from elsewhere
    assert context["callbacks"].exhausted == 1
    assert context["callbacks"].attempts == 1 and context["callback_ratio"] == "0.0%"
    assert str(stuck.pk) in html and "the sweep gave up" in html
    assert exhausted.reference and str(exhausted.pk) in html  # in the exhausted callbacks list
    channel_row = html[html.index(">fake-a</a>") :]
    # 4 paid (3 here, 1 from the paid order), 1 failed; the processing ones have no outcome yet
    assert (
        "80.0%" in channel_row[:2000] and "(4 of 5)" in channel_row[:2000] and "closed" in channel_row[:2000]
    )


def test_an_overdue_order_is_listed_as_stuck(operator, make_order):
    late = make_order(OrderStatus.PENDING)
    Order.objects.filter(pk=late.pk).update(next_check_at=timezone.now() - timedelta(minutes=10))

    stuck = operator.get(URL).context["stuck"]

    assert [(s.order.pk, "overdue" in s.why) for s in stuck] == [(late.pk, True)]


def test_an_order_the_provider_has_not_settled_in_many_checks_is_listed(operator, make_order, settings):
    # given two processing orders still polled: one checked a few times, one many times
    settings.POLL_MAX_COUNT = 20
    early, long_unanswered = make_order(OrderStatus.PROCESSING), make_order(OrderStatus.PROCESSING)
    soon = timezone.now() + timedelta(minutes=30)
    Order.objects.filter(pk=early.pk).update(check_count=4, next_check_at=soon)
    Order.objects.filter(pk=long_unanswered.pk).update(check_count=5, next_check_at=soon)
    # when an operator opens the dashboard
    stuck = operator.get(URL).context["stuck"]
    # then the long-unanswered one is listed, saying the provider is still asked (before: only a
    # count of processing orders, for the ~16 h until the sweep gave up on it)
    assert [(s.order.pk, "5 status checks" in s.why) for s in stuck] == [(long_unanswered.pk, True)]


def test_the_heading_counts_every_order_that_needs_a_person_beyond_those_listed(
    operator, make_order, settings, monkeypatch
):
    # given three processing orders the provider has not settled in many checks, and a list of 2
    settings.POLL_MAX_COUNT = 20
    monkeypatch.setattr("console.dashboard.STUCK_SHOWN", 2)
    soon = timezone.now() + timedelta(minutes=30)
    for _ in range(3):
        order = make_order(OrderStatus.PROCESSING)
        Order.objects.filter(pk=order.pk).update(check_count=6, next_check_at=soon)
    # when an operator opens the dashboard
    response = operator.get(URL)
    # then the heading says three, the oldest two are listed, and it says so (before: "(2)")
    html = response.content.decode()
    assert len(response.context["stuck"]) == 2
    assert "Orders that need a person (3)" in html
    assert "provider not settling: 3" in html and "the oldest 2 of each are listed" in html


# Session, user, then one query per number or list on the page (see console/dashboard.py).
DASHBOARD_QUERIES = 28  # + refunds by status, refunded amount, unanswered charges, 3 counts, refunds: 3 + 3


def test_dashboard_query_count_does_not_grow_with_orders(operator, django_assert_num_queries):
    with django_assert_num_queries(DASHBOARD_QUERIES):
        operator.get(URL)
    for seconds in range(30):
        _completed(seconds=seconds, minutes_ago=seconds % 50)

    with django_assert_num_queries(DASHBOARD_QUERIES):
        response = operator.get(URL)

    assert response.status_code == 200


def test_per_minute_series_covers_the_hour_with_zeros():
    # a bounded read: one row per minute, each with created and completed counts
    now = timezone.now()
    series = orders_per_minute(since=now - timedelta(hours=1), until=now)

    assert 60 <= len(series) <= 61
    assert all(created == completed == 0 for _, created, completed in series)
    assert orders_latency(since=now - timedelta(hours=1)).count == 0


def test_anonymous_and_non_staff_users_are_sent_to_the_login(client, django_user_model):
    assert client.get(URL)["Location"].startswith("/admin/login/")
    client.force_login(django_user_model.objects.create_user(username="not-staff", password="x" * 12))
    response = client.get(URL)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_staff_who_may_not_view_orders_do_not_see_the_dashboard(staff):
    # before: any staff user saw order ids, references and merchants' callback errors on it
    assert staff().get(URL).status_code == 403
    assert staff("orders.view_order").get(URL).status_code == 200


def test_dashboard_answers_when_a_rabbitmq_broker_cannot_be_reached(operator, settings):
    """The queue depths are then unknown (kombu's own error, not Redis's), and the page still answers."""
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:1//"  # nothing listens there
    get_broker_redis.cache_clear()
    try:
        response = operator.get(URL)
    finally:
        get_broker_redis.cache_clear()
    assert response.status_code == 200
    assert response.context["queues"] is None
