"""The console's refunds (SPEC 10): the order page's refund form (orders.change_order needed),
refunds inline and in their own list, the dashboard's counts and /metrics."""

import re
from datetime import timedelta

import pytest
from django.contrib import messages
from django.contrib.admin.models import LogEntry
from django.utils import timezone

from gateway.providers.base import StatusResult
from orders.events import MAX_SWEEP_CHECKS
from orders.models import Order, OrderStatus, Refund, RefundStatus
from orders.transitions import refund_transition

pytestmark = pytest.mark.django_db


def _page(client, order: Order):
    return client.get(f"/admin/orders/order/{order.pk}/change/")


def _refund(client, order: Order, *, amount: str = "", reason: str = "", key: str | None = None):
    if key is None:
        key = re.search(
            r'name="refund_key" value="([0-9a-f]{32})"', _page(client, order).content.decode()
        ).group(1)
    return client.post(
        f"/admin/orders/order/{order.pk}/refund/", {"amount": amount, "reason": reason, "refund_key": key}
    )


def test_an_operator_refunds_from_the_orders_page_once_per_form(operator, make_order):
    # given a paid order of 1050
    order = make_order(OrderStatus.PAID)
    page = _page(operator, order).content.decode()
    key = re.search(r'name="refund_key" value="([0-9a-f]{32})"', page).group(1)
    # when the form is sent, and sent again (double click, reload)
    first = _refund(operator, order, amount="300", reason="damaged", key=key)
    again = _refund(operator, order, amount="300", reason="damaged", key=key)
    # then one refund, audited, shown inline and in the refunds list
    assert first.status_code == again.status_code == 302
    refund = Refund.objects.get(order=order)
    assert (refund.amount, refund.reason, refund.status) == (300, "damaged", "pending")
    assert LogEntry.objects.filter(object_id=str(order.pk), change_message__contains="Refund").count() == 1
    page = _page(operator, order).content.decode()
    assert "Refunds (oldest first)" in page and "damaged" in page
    listing = operator.get("/admin/orders/refund/", {"status__exact": "pending"}).content.decode()
    assert str(refund.pk) in listing
    assert operator.get(f"/admin/orders/refund/{refund.pk}/change/").status_code == 200
    # and a blank amount refunds everything left
    _refund(operator, order)
    assert sorted(Refund.objects.filter(order=order).values_list("amount", flat=True)) == [300, 750]


def test_the_refund_form_refuses_what_the_api_refuses(operator, make_order):
    paid = make_order(OrderStatus.PAID)
    # digits only in ASCII: "²" passes str.isdigit() and fails int(); "١٢" is 12 to int()
    for amount in ("1051", "0", "-5", "1.5", "abc", "\u00b2", "\u00b9\u00b2", "\u0661\u0662", " 1 2"):
        assert _refund(operator, paid, amount=amount).status_code == 302, amount
    _refund(operator, paid, amount="1", reason="x" * 501)
    _refund(operator, make_order(OrderStatus.PROCESSING), amount="1", key="0" * 32)
    assert Refund.objects.count() == 0


def test_a_view_only_operator_cannot_refund_and_sees_no_form(staff, make_order):
    order = make_order(OrderStatus.PAID)
    viewer = staff("orders.view_order")
    assert 'name="refund_key"' not in _page(viewer, order).content.decode()
    response = _refund(viewer, order, amount="100", key="a" * 32)
    assert response.status_code == 403
    assert Refund.objects.count() == 0
    changer = staff("orders.view_order", "orders.change_order")
    assert 'name="refund_key"' in _page(changer, order).content.decode()
    assert _refund(changer, order, amount="100").status_code == 302
    assert Refund.objects.get(order=order).amount == 100


def test_dashboard_and_metrics_count_refunds(operator, make_order, client):
    order = make_order(OrderStatus.PAID)
    _refund(operator, order, amount="100")
    dashboard = operator.get("/admin/dashboard/").content.decode()
    assert "Refunds" in dashboard
    metrics = client.get("/metrics").content.decode()
    assert 'refunds{status="pending"} 1.0' in metrics
    assert "refunded_amount" in metrics


def test_the_orders_page_shows_the_amount_refunded_in_the_amounts_own_terms(operator, make_order):
    # given a paid order of 10.50 USD of which 2.50 were refunded
    order = make_order(OrderStatus.PAID)
    _refund(operator, order, amount="250")
    refund = Refund.objects.get(order=order)
    refund_transition(refund_id=refund.pk, to="processing", seen_status="pending", reason="test")
    refund_transition(refund_id=refund.pk, to="succeeded", seen_status="processing", reason="test")
    # when
    page = _page(operator, order).content.decode()
    # then it reads as the amount beside it does, not in minor units
    assert re.search(r"Amount refunded:</label>\s*<div[^>]*>2\.50 USD</div>", page), page


REFUNDS = "/admin/orders/refund/"


def _requery(client, *refunds: Refund):
    return client.post(
        REFUNDS, {"action": "requery_provider", "_selected_action": [r.pk for r in refunds]}, follow=True
    )


def test_a_refund_the_sweep_gave_up_on_is_listed_counted_and_alertable(operator, make_refund, client):
    # given a processing refund the sweep gave up on (the provider never settled it), a pending one
    # whose next check is long overdue, and one the provider has not settled in many checks
    gave_up, overdue, unanswered = (make_refund(RefundStatus.PROCESSING) for _ in range(3))
    pending = make_refund(RefundStatus.PENDING)
    now = timezone.now()
    Refund.objects.filter(pk=gave_up.pk).update(next_check_at=None, check_count=20)
    Refund.objects.filter(pk=pending.pk).update(next_check_at=now - timedelta(minutes=10))
    Refund.objects.filter(pk=unanswered.pk).update(next_check_at=now + timedelta(minutes=30), check_count=6)
    # when an operator opens the dashboard, and /metrics is scraped
    response = operator.get("/admin/dashboard/")
    metrics = client.get("/metrics").content.decode()
    # then each is listed with why, counted in the heading and in a gauge (before: only the count of
    # processing refunds said anything, and nothing said which refund or that nothing would happen)
    listed = {(s.refund.pk, s.why.split(":")[0]) for s in response.context["stuck_refunds"]}
    assert listed == {
        (gave_up.pk, "the sweep gave up"),
        (pending.pk, "its next check is overdue"),
        (unanswered.pk, "the provider has not settled it in 6 status checks"),
    }
    html = response.content.decode()
    assert "Refunds that need a person (3)" in html and f"/admin/orders/refund/{gave_up.pk}/change/" in html
    assert str(overdue.pk) not in html  # processing and due in the future: being moved along
    for why in ("gave_up", "overdue", "unanswered"):
        assert f'refunds_needing_a_person{{why="{why}"}} 1.0' in metrics


def test_requery_asks_the_provider_about_a_processing_refund_and_applies_its_answer(
    operator, make_refund, fake_provider
):
    # given a processing refund the sweep gave up on, which the provider has since refunded
    refund = make_refund(RefundStatus.PROCESSING)
    Refund.objects.filter(pk=refund.pk).update(next_check_at=None)
    fake_provider.refund_status = StatusResult("succeeded")
    # when an operator re-queries it from the refunds list
    response = _requery(operator, refund)
    # then the provider was asked about the refund's own key, the refund succeeded, and it is audited
    assert fake_provider.refund_status_queries == [f"refund:{refund.pk}"]
    assert Refund.objects.get(pk=refund.pk).status == RefundStatus.SUCCEEDED
    assert "re-queried, now succeeded" in response.content.decode()
    assert LogEntry.objects.filter(object_id=str(refund.pk), change_message__contains="re-queried").exists()


def test_requery_of_a_processing_refund_tells_pending_from_unreachable(operator, make_refund, fake_provider):
    # given two processing refunds: the provider says pending about the first, then cannot be reached
    said_pending, unanswered = make_refund(RefundStatus.PROCESSING), make_refund(RefundStatus.PROCESSING)
    first = _requery(operator, said_pending)
    fake_provider.unreachable = TimeoutError("read timed out")
    second = _requery(operator, unanswered)
    # then each message says which (before: both "provider had no final answer yet")
    assert [(m.level, m.message) for m in first.context["messages"]] == [
        (
            messages.INFO,
            f"Refund {said_pending.pk}: re-queried, the provider says pending: no final answer yet.",
        )
    ]
    assert [(m.level, m.message) for m in second.context["messages"]] == [
        (
            messages.WARNING,
            f"Refund {unanswered.pk}: re-queried, the provider did not answer (TimeoutError);"
            " the sweep asks again.",
        )
    ]
    assert {Refund.objects.get(pk=r.pk).status for r in (said_pending, unanswered)} == {
        RefundStatus.PROCESSING
    }


def test_requery_of_a_pending_refund_makes_the_sweep_send_it_again(operator, make_refund, fake_provider):
    # given a pending refund the sweep gave up on (never sent: say the gateway's workers were down)
    refund = make_refund(RefundStatus.PENDING)
    Refund.objects.filter(pk=refund.pk).update(next_check_at=None, check_count=30)
    # when an operator re-queries it
    _requery(operator, refund)
    # then it is due now with its checks counted afresh, and the provider was not asked anything
    due, checks = Refund.objects.values_list("next_check_at", "check_count").get(pk=refund.pk)
    assert due is not None and due <= timezone.now() and checks == 0
    assert fake_provider.refund_status_queries == []


def test_requery_leaves_a_settled_refund_alone(operator, make_refund, fake_provider):
    refund = make_refund(RefundStatus.PROCESSING)
    refund_transition(
        refund_id=refund.pk, to=RefundStatus.FAILED, seen_status=RefundStatus.PROCESSING, reason="t"
    )

    response = _requery(operator, refund)

    assert "failed, nothing to ask the provider" in response.content.decode()
    assert fake_provider.refund_status_queries == []


def test_the_refunds_page_shows_its_request_to_the_provider_and_is_found_by_the_providers_id(
    operator, make_refund
):
    # given a refund sent to the provider, which knows it by its own id
    refund = make_refund(RefundStatus.PROCESSING)
    provider_id = f"fake-refund-{refund.pk}"
    # when an operator opens its page, and searches the list for the provider's id
    page = operator.get(f"{REFUNDS}{refund.pk}/change/").content.decode()
    found = operator.get(REFUNDS, {"q": provider_id}).context["cl"].result_list
    # then the request is there: status, sends, the provider's id and answer (before: only the
    # refund's own fields, nothing of what the provider was asked or said), and the search finds it
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    assert f"fake-console Accepted 1 {provider_id} 201" in text  # provider, status, sends, id, HTTP
    assert [r.pk for r in found] == [refund.pk]


def test_a_settled_refund_the_sweep_gave_up_on_before_its_callback_is_listed_and_resumed(
    operator, make_refund, fake_provider
):
    # given two succeeded refunds: the sweep gave up on one before its callback had a delivery (the
    # callbacks workers were down for a day); the other's callback is scheduled (next check cleared)
    lost, scheduled = (make_refund(RefundStatus.PROCESSING) for _ in range(2))
    for refund in (lost, scheduled):
        refund_transition(
            refund_id=refund.pk, to=RefundStatus.SUCCEEDED, seen_status=RefundStatus.PROCESSING, reason="t"
        )
    Refund.objects.filter(pk=lost.pk).update(next_check_at=None, check_count=MAX_SWEEP_CHECKS)
    Refund.objects.filter(pk=scheduled.pk).update(next_check_at=None, check_count=2)
    # when an operator opens the dashboard, then re-queries both
    stuck = operator.get("/admin/dashboard/").context["stuck_refunds"]
    response = _requery(operator, lost, scheduled)
    # then only the lost one was listed (before: nothing showed that its callback would never go),
    # and it is due again for the sweep to hand to the callback stage; the other is left alone
    assert [(s.refund.pk, s.why.startswith("the sweep gave up")) for s in stuck] == [(lost.pk, True)]
    due, checks = Refund.objects.values_list("next_check_at", "check_count").get(pk=lost.pk)
    assert due is not None and due <= timezone.now() and checks == 0
    assert Refund.objects.values_list("next_check_at", "check_count").get(pk=scheduled.pk) == (None, 2)
    html = response.content.decode()
    assert "succeeded, the sweep gave up before its callback was scheduled: due again" in html
    assert f"Refund {scheduled.pk}: succeeded, nothing to ask the provider" in html
    assert fake_provider.refund_status_queries == []


def test_requery_of_a_pending_refund_the_provider_asked_to_wait_says_until_when(
    operator, make_refund, fake_provider, settings
):
    from gateway.models import RefundAttempt
    from gateway.providers.base import ChargeOutcome, RefundResult
    from gateway.services import refund_send

    # given a pending refund the provider answered "try again later" (a 503)
    settings.REFUND_RETRY_SECONDS = 300
    refund = make_refund(RefundStatus.PENDING)
    fake_provider.refund_answer = RefundResult(
        ChargeOutcome.REJECTED, http_status=503, error="channel_unavailable", retry=True
    )
    refund_send(refund_id=refund.pk)
    later = RefundAttempt.objects.get(refund=refund).retry_after
    assert Refund.objects.get(pk=refund.pk).status == RefundStatus.PENDING and later > timezone.now()
    # when an operator re-queries it
    html = _requery(operator, refund).content.decode()
    # then the message says when it will go, not "at the next sweep" (it would not)
    assert f"pending, the provider asked to wait: sent again after {later:%Y-%m-%d %H:%M:%S}" in html


def test_the_refunds_page_shows_the_signals_it_ignored(operator, make_refund):
    from gateway.services import refund_confirm

    # given a refund settled succeeded by the provider's word, then a contradicting "failed" word
    refund = make_refund(RefundStatus.PROCESSING)
    for status in ("succeeded", "failed"):
        refund_confirm(idempotency_key=f"refund:{refund.pk}", status=status, source="provider webhook")
    # when an operator opens the refund's page
    page = operator.get(f"{REFUNDS}{refund.pk}/change/").content.decode()
    # then the ignored word is there (before: only on the order's page)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    assert "ignored late or duplicate signals" in text.lower()
    assert "succeeded failed" in text  # status at the signal, then what it asked for
