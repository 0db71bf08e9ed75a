"""The order console: list, filters, search, the read-only order page and its two actions."""

from datetime import timedelta

import pytest
from django.contrib import messages
from django.contrib.admin.models import LogEntry
from django.utils import timezone

from callbacks.models import CallbackDelivery
from callbacks.services import callback_deliver
from gateway.models import ChargeAttempt
from gateway.providers.base import StatusResult
from orders.models import Order, OrderStatus

pytestmark = pytest.mark.django_db

LIST = "/admin/orders/order/"


def _page(url: str) -> str:
    return f"/admin/orders/order/{url}"


def _ids_in(response) -> set[str]:
    return {str(order.pk) for order in response.context["cl"].result_list}


def test_list_shows_status_outcome_amount_in_major_units_channel_merchant_and_age(operator, make_order):
    usd = make_order(OrderStatus.PAID, amount=1050, currency="USD", reference="inv-usd")
    jpy = make_order(OrderStatus.PENDING, amount=1050, currency="JPY", reference="inv-jpy")

    response = operator.get(LIST)

    assert response.status_code == 200
    html = response.content.decode()
    assert "10.50 USD" in html
    assert "1,050 JPY" in html  # zero-decimal currency: no cents
    assert ">paid<" in html and ">pending<" in html
    assert "fake-a" in html
    assert usd.merchant.name in html
    assert _ids_in(response) == {str(usd.pk), str(jpy.pk)}


# Session and user, the channel filter's choices, the merchant filter's choices, the page's
# count (EXPLAIN, then the exact count below the threshold), the page of orders with merchants.
LIST_QUERIES = 7


@pytest.mark.parametrize("orders", [3, 30])
def test_list_costs_the_same_number_of_queries_whatever_the_number_of_rows(
    operator, make_order, django_assert_num_queries, orders
):
    for _ in range(orders):
        make_order()

    with django_assert_num_queries(LIST_QUERIES):
        response = operator.get(LIST)

    assert len(response.context["cl"].result_list) == orders


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status__exact=processing", {"processing"}),
        ("status__exact=paid", {"paid"}),
        ("outcome__exact=failed", {"failed"}),
        ("channel=fake-a", {"processing", "paid", "failed"}),
    ],
)
def test_filters_by_status_outcome_and_channel(operator, make_order, query, expected):
    make_order(OrderStatus.PENDING)
    make_order(OrderStatus.PROCESSING)
    make_order(OrderStatus.PAID)
    make_order(OrderStatus.FAILED)

    response = operator.get(f"{LIST}?{query}")

    assert response.status_code == 200
    assert {order.status for order in response.context["cl"].result_list} == expected


def test_filter_by_merchant(operator, make_order, other_api):
    mine = make_order()
    other_api.post(
        "/api/v1/orders",
        {"amount": 500, "currency": "USD", "reference": "theirs"},
        format="json",
        HTTP_IDEMPOTENCY_KEY="theirs",
    )

    response = operator.get(f"{LIST}?merchant__id__exact={mine.merchant_id}")

    assert _ids_in(response) == {str(mine.pk)}


def test_filter_by_created_date(operator, make_order):
    today = make_order()
    old = make_order()
    Order.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=40))
    changelist = operator.get(LIST).context["cl"]
    date_filter = next(f for f in changelist.filter_specs if f.title == "created at")
    past_week = next(c for c in date_filter.choices(changelist) if c["display"] == "Past 7 days")

    response = operator.get(f"{LIST}{past_week['query_string']}")

    assert _ids_in(response) == {str(today.pk)}


def test_search_by_id_reference_and_provider_reference(operator, make_order):
    target = make_order(OrderStatus.PROCESSING, reference="inv-2041")
    make_order(OrderStatus.PROCESSING, reference="inv-other")
    provider_reference = ChargeAttempt.objects.get(order=target).provider_reference

    for term in (str(target.pk), "inv-2041", provider_reference):
        response = operator.get(LIST, {"q": term})
        assert _ids_in(response) == {str(target.pk)}, term
    assert _ids_in(operator.get(LIST, {"q": "no-such-thing"})) == set()


def test_order_page_is_read_only_with_transitions_attempts_and_callbacks_newest_first(
    operator, make_order, settings
):
    settings.CALLBACK_RETRY_SCHEDULE = [60]
    order = make_order(OrderStatus.PAID)
    callback_deliver(order_id=order.pk)  # 127.0.0.1:9 refuses: one failed attempt recorded

    response = operator.get(_page(f"{order.pk}/change/"))

    assert response.status_code == 200
    html = response.content.decode()
    assert "<form" in html and 'name="_save"' not in html  # a view, not an edit form
    transitions = response.context["inline_admin_formsets"][0].formset.queryset
    assert [t.to_status for t in transitions] == ["paid", "processing", "assigned", "pending"]
    assert "charge accepted by fake-a" in html
    assert f"fake-{order.pk}" in html  # the charge attempt's provider reference
    assert "Connection refused" in html or "refused" in html  # the callback attempt's error
    assert "Resend callback" in html and "Re-query provider" not in html  # paid: nothing to ask
    processing = make_order(OrderStatus.PROCESSING)
    html = operator.get(_page(f"{processing.pk}/change/")).content.decode()
    assert "Re-query provider" in html and "Resend callback" not in html


def test_resend_callback_makes_the_exhausted_delivery_due_and_audits_it(
    operator, make_order, settings, admin_user
):
    # given: an order whose only callback attempt failed and exhausted the schedule
    settings.CALLBACK_RETRY_SCHEDULE = []
    order = make_order(OrderStatus.PAID)
    callback_deliver(order_id=order.pk)
    delivery = CallbackDelivery.objects.get(order=order)
    assert delivery.status == CallbackDelivery.Status.EXHAUSTED

    # when
    response = operator.post(LIST, {"action": "resend_callback", "_selected_action": [order.pk]}, follow=True)

    # then
    delivery.refresh_from_db()
    assert delivery.status == CallbackDelivery.Status.PENDING
    assert delivery.next_attempt_at <= timezone.now()
    assert "Callback made due for 1 order(s)" in response.content.decode()
    entry = LogEntry.objects.get(object_id=str(order.pk))
    assert entry.user == admin_user
    assert entry.get_change_message() == "Callback resent by operator."


def test_resend_callback_creates_a_due_delivery_when_there_is_none(operator, make_order):
    paid = make_order(OrderStatus.FAILED)
    pending = make_order(OrderStatus.PENDING)

    operator.post(LIST, {"action": "resend_callback", "_selected_action": [paid.pk, pending.pk]})

    delivery = CallbackDelivery.objects.get(order=paid)
    assert delivery.event_type == "order.failed"
    assert delivery.status == CallbackDelivery.Status.PENDING
    assert delivery.next_attempt_at <= timezone.now()
    assert not CallbackDelivery.objects.filter(order=pending).exists()  # nothing to tell the client yet
    assert LogEntry.objects.filter(object_id=str(pending.pk)).count() == 0


def test_resend_from_the_order_page_returns_to_it(operator, make_order):
    order = make_order(OrderStatus.PAID)

    response = operator.post(
        LIST, {"action": "resend_callback", "_selected_action": [order.pk], "_from_order_page": "1"}
    )

    assert response.status_code == 302
    assert response["Location"] == _page(f"{order.pk}/change/")
    assert CallbackDelivery.objects.filter(order=order, status="pending").exists()


def test_requery_asks_the_provider_and_applies_its_answer(operator, make_order, fake_provider, admin_user):
    order = make_order(OrderStatus.PROCESSING)
    untouched = make_order(OrderStatus.PENDING)
    fake_provider.status = StatusResult("paid")

    response = operator.post(
        LIST, {"action": "requery_provider", "_selected_action": [order.pk, untouched.pk]}, follow=True
    )

    order.refresh_from_db()
    assert order.status == OrderStatus.PAID
    assert order.transitions.order_by("-id").first().reason == "provider says paid via status poll"
    assert fake_provider.status_queries == [f"{order.pk}:fake-a"]
    html = response.content.decode()
    # led by a word, not the reference, which the admin's template would capitalise
    assert f"Order {order.reference}: re-queried, now paid" in html
    assert "nothing to ask the provider" in html
    assert LogEntry.objects.get(object_id=str(order.pk)).user == admin_user
    assert Order.objects.get(pk=untouched.pk).status == OrderStatus.PENDING


def test_requery_when_the_provider_has_no_answer_leaves_the_order_processing(
    operator, make_order, fake_provider
):
    order = make_order(OrderStatus.PROCESSING)

    response = operator.post(
        LIST, {"action": "requery_provider", "_selected_action": [order.pk]}, follow=True
    )

    assert Order.objects.get(pk=order.pk).status == OrderStatus.PROCESSING
    assert "re-queried, the provider says pending: no final answer yet" in response.content.decode()
    assert len(fake_provider.status_queries) == 1


def test_requery_says_when_the_provider_did_not_answer(operator, make_order, fake_provider):
    # given a provider that cannot be reached
    order = make_order(OrderStatus.PROCESSING)
    fake_provider.unreachable = ConnectionError("refused")

    response = operator.post(
        LIST, {"action": "requery_provider", "_selected_action": [order.pk]}, follow=True
    )

    # then the operator reads that it did not answer, as a warning (before: "provider had no
    # final answer yet", as if it had said pending)
    assert Order.objects.get(pk=order.pk).status == OrderStatus.PROCESSING
    assert [(m.level, m.message) for m in response.context["messages"]] == [
        (
            messages.WARNING,
            f"Order {order.reference}: re-queried, the provider did not answer (ConnectionError);"
            " the sweep asks again.",
        )
    ]
    assert "did not answer" in LogEntry.objects.get(object_id=str(order.pk)).change_message


def test_requery_past_the_key_window_says_nothing_was_asked_and_how_to_find_the_charge(
    operator, make_order, fake_provider
):
    # given a charge whose answer never came (no provider id), first sent a day ago, at a provider
    # that keeps idempotency keys 23 h and can only be asked by id
    order = make_order(OrderStatus.PROCESSING)
    attempt = ChargeAttempt.objects.get(order_id=order.pk)
    ChargeAttempt.objects.filter(pk=attempt.pk).update(created_at=timezone.now() - timedelta(hours=24))
    fake_provider.key_window = timedelta(hours=23)
    fake_provider.status = StatusResult("not_found", looked=False)

    response = operator.post(
        LIST, {"action": "requery_provider", "_selected_action": [order.pk]}, follow=True
    )

    # then nothing is sent, and the message says so and names the key to search the provider by
    # (before: "provider had no final answer yet", though nothing was asked)
    assert Order.objects.get(pk=order.pk).status == OrderStatus.PROCESSING
    [(level, message)] = [(m.level, m.message) for m in response.context["messages"]]
    assert level == messages.WARNING
    assert "not asked: no provider id was stored, and a resend 23 h after the first" in message
    assert f"metadata attempt = {attempt.idempotency_key}" in message


def test_requery_resumes_a_pending_order_the_sweep_gave_up_on(operator, make_order, fake_provider):
    # given a pending and an assigned order the sweep gave up on (their workers were down for a
    # day), and a pending one it has not
    gave_up, assigned, waiting = (
        make_order(OrderStatus.PENDING),
        make_order(OrderStatus.ASSIGNED),
        make_order(OrderStatus.PENDING),
    )
    Order.objects.filter(pk__in=[gave_up.pk, assigned.pk]).update(next_check_at=None, check_count=30)
    waiting_due = Order.objects.values_list("next_check_at", flat=True).get(pk=waiting.pk)
    # when an operator re-queries all three
    response = operator.post(
        LIST,
        {"action": "requery_provider", "_selected_action": [gave_up.pk, assigned.pk, waiting.pk]},
        follow=True,
    )
    # then the two the sweep gave up on are due now, checks counted afresh (before: "nothing to ask
    # the provider", and nothing in the console could move them on); the other is left as it was
    for order in (gave_up, assigned):
        due, checks = Order.objects.values_list("next_check_at", "check_count").get(pk=order.pk)
        assert due is not None and due <= timezone.now() and checks == 0
        assert LogEntry.objects.filter(object_id=str(order.pk), change_message__startswith="Resumed").exists()
    assert Order.objects.values_list("next_check_at", flat=True).get(pk=waiting.pk) == waiting_due
    html = response.content.decode()
    assert f"Order {gave_up.reference}: pending, the sweep gave up on it: due again" in html
    assert f"Order {waiting.reference}: pending, nothing to ask the provider" in html
    assert fake_provider.status_queries == []


def test_orders_cannot_be_added_changed_or_deleted(operator, make_order):
    order = make_order()

    assert operator.get(_page("add/")).status_code == 403
    assert operator.post(_page(f"{order.pk}/change/"), {"reference": "x"}).status_code == 403
    assert operator.get(_page(f"{order.pk}/delete/")).status_code == 403
    assert Order.objects.get(pk=order.pk).reference == order.reference


def test_a_user_who_is_not_staff_is_sent_to_the_login(client, django_user_model, make_order):
    order = make_order()
    user = django_user_model.objects.create_user(username="merchant-person", password="x" * 12)
    client.force_login(user)

    for url in (LIST, _page(f"{order.pk}/change/"), "/admin/dashboard/"):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/admin/login/"), url
    response = client.post(LIST, {"action": "resend_callback", "_selected_action": [order.pk]})
    assert response.status_code == 302
    assert not CallbackDelivery.objects.exists()


def test_a_big_result_is_counted_by_the_planner_not_by_count(
    operator, make_order, monkeypatch, django_assert_num_queries
):
    # given: every result counts as big (the threshold is 10,000 rows in production)
    from console import adminkit

    monkeypatch.setattr(adminkit, "EXACT_COUNT_BELOW", 0)
    make_order()

    with django_assert_num_queries(LIST_QUERIES - 1) as queries:
        response = operator.get(LIST)

    sqls = [q["sql"] for q in queries.captured_queries]
    assert any(sql.startswith("EXPLAIN") for sql in sqls)
    assert not any("COUNT(" in sql.upper() for sql in sqls)
    assert response.context["cl"].result_count >= 0


def test_an_ignored_signal_on_the_order_page_is_titled_by_what_it_asked(operator, make_order):
    # given an order with a late word recorded as ignored
    from orders.transitions import order_signal_ignored

    order = make_order(OrderStatus.PAID)
    order_signal_ignored(
        order_id=order.pk, current="paid", to="failed", reason="provider says failed via poll"
    )
    # then the order page names it by what it asked, not "IgnoredSignal object (n)"
    html = operator.get(_page(f"{order.pk}/change/")).content.decode()
    assert "IgnoredSignal object" not in html
    assert "paid -&gt; failed: provider says failed via poll" in html


def test_requery_stops_asking_when_its_time_is_spent_and_says_which_were_not_asked(
    operator, make_order, fake_provider, monkeypatch
):
    # given two processing orders and a provider that takes longer than the action's time budget
    import time

    first, second = make_order(OrderStatus.PROCESSING), make_order(OrderStatus.PROCESSING)
    monkeypatch.setattr("console.adminkit.REQUERY_BUDGET_SECONDS", 0.2)
    slow = fake_provider.fetch_status

    def fetch_status(**kwargs):
        time.sleep(0.3)
        return slow(**kwargs)

    monkeypatch.setattr(fake_provider, "fetch_status", fetch_status)
    # when an operator re-queries both
    response = operator.post(
        LIST, {"action": "requery_provider", "_selected_action": [first.pk, second.pk]}, follow=True
    )
    # then the provider was asked once, and the page names the order not asked (before: each row
    # waited on the provider in turn, 20 of them for minutes inside one request)
    assert len(fake_provider.status_queries) == 1
    html = response.content.decode()
    not_asked = second if f"{first.pk}:fake-a" in fake_provider.status_queries else first
    assert f"not re-queried: {not_asked.reference}. Select fewer." in html
