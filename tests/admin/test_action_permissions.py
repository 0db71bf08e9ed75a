"""Every console action needs a permission of its own: viewing a page is never enough to act on it.

A view-only operator who POSTs an action (forged form, old tab, the order page's button) gets a
403 and nothing changes: no service call, no provider call, no audit entry. The same POST from an
operator holding the action's permission does the work. Superusers keep everything (the other
tests in tests/admin run as one).
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.utils import timezone

from allocation.models import PaymentChannel
from callbacks.models import CallbackDelivery
from callbacks.services import callback_deliver
from orders.models import Merchant, Order, OrderStatus, Refund, RefundStatus
from tests.factories import ChannelFactory

pytestmark = pytest.mark.django_db


@dataclass(frozen=True)
class Case:
    url: str
    view: str  # the model's view permission: enough to see the page, never to act
    grant: str  # the action's own permission
    setup: Callable  # (pytest request) -> (selected pk, a function returning the state the action changes)
    action: str = ""  # the action's name, when the case's key is not (one name on two pages)

    def name(self, key: str) -> str:
        return self.action or key


def _merchant(field: str):
    def setup(request):
        merchant = request.getfixturevalue("merchant_creds").merchant
        return merchant.pk, lambda: Merchant.objects.values_list(field, flat=True).get(pk=merchant.pk)

    return setup


def _channel(**attrs):
    def setup(request):
        channel = ChannelFactory(code="perm-test", **attrs)
        state = PaymentChannel.objects.filter(pk=channel.pk).values_list("enabled", "circuit_open_until")
        return channel.pk, lambda: state.get()

    return setup


def _exhausted_delivery(request) -> CallbackDelivery:
    request.getfixturevalue("settings").CALLBACK_RETRY_SCHEDULE = []
    order = request.getfixturevalue("make_order")(OrderStatus.PAID)
    callback_deliver(order_id=order.pk)
    delivery = CallbackDelivery.objects.get(order=order)
    assert delivery.status == CallbackDelivery.Status.EXHAUSTED
    return delivery


def _delivery_state(delivery: CallbackDelivery):
    return lambda: CallbackDelivery.objects.values_list("status", "next_attempt_at").get(pk=delivery.pk)


def _resend_delivery(request):
    delivery = _exhausted_delivery(request)
    return delivery.pk, _delivery_state(delivery)


def _resend_for_order(request):
    delivery = _exhausted_delivery(request)
    return delivery.order_id, _delivery_state(delivery)


def _requery(request):
    provider = request.getfixturevalue("fake_provider")
    order = request.getfixturevalue("make_order")(OrderStatus.PROCESSING)
    return order.pk, lambda: (list(provider.status_queries), Order.objects.get(pk=order.pk).status)


def _requery_refund(request):
    provider = request.getfixturevalue("fake_provider")
    refund = request.getfixturevalue("make_refund")(RefundStatus.PROCESSING)
    return refund.pk, lambda: (list(provider.refund_status_queries), Refund.objects.get(pk=refund.pk).status)


MERCHANTS, CHANNELS = "/admin/orders/merchant/", "/admin/allocation/paymentchannel/"
DELIVERIES, ORDERS = "/admin/callbacks/callbackdelivery/", "/admin/orders/order/"
REFUNDS = "/admin/orders/refund/"
OPEN_CIRCUIT = {"circuit_open_until": timezone.now() + timedelta(days=1)}

CASES = {
    "rotate_api_key": Case(
        MERCHANTS, "orders.view_merchant", "orders.rotate_merchant_key", _merchant("api_key_hash")
    ),
    "rotate_webhook_secret": Case(
        MERCHANTS, "orders.view_merchant", "orders.rotate_merchant_key", _merchant("webhook_secret_encrypted")
    ),
    "enable": Case(
        CHANNELS,
        "allocation.view_paymentchannel",
        "allocation.manage_paymentchannel",
        _channel(enabled=False),
    ),
    "disable": Case(
        CHANNELS, "allocation.view_paymentchannel", "allocation.manage_paymentchannel", _channel()
    ),
    "close_circuit": Case(
        CHANNELS,
        "allocation.view_paymentchannel",
        "allocation.manage_paymentchannel",
        _channel(**OPEN_CIRCUIT),
    ),
    "resend": Case(
        DELIVERIES, "callbacks.view_callbackdelivery", "callbacks.resend_callback", _resend_delivery
    ),
    "resend_callback": Case(ORDERS, "orders.view_order", "callbacks.resend_callback", _resend_for_order),
    "requery_provider": Case(ORDERS, "orders.view_order", "orders.requery_provider", _requery),
    "requery_refund": Case(
        REFUNDS, "orders.view_refund", "orders.requery_provider", _requery_refund, action="requery_provider"
    ),
}


def _post_action(client, case: Case, action: str, pk, **extra):
    # "index" as the changelist's own form sends it; the order page's buttons send none (below).
    return client.post(case.url, {"action": action, "_selected_action": [pk], "index": "0", **extra})


@pytest.mark.parametrize("action", CASES)
def test_a_view_only_operator_is_refused_and_nothing_changes(action, staff, request):
    # given
    case = CASES[action]
    pk, state = case.setup(request)
    before = state()
    viewer = staff(case.view)
    assert viewer.get(case.url).status_code == 200  # the page itself stays open to them

    # when
    response = _post_action(viewer, case, case.name(action), pk)

    # then
    assert response.status_code == 403
    assert state() == before
    assert not LogEntry.objects.filter(user=viewer.user).exists()


@pytest.mark.parametrize("action", CASES)
def test_the_actions_permission_lets_an_operator_act(action, staff, request):
    # given
    case = CASES[action]
    pk, state = case.setup(request)
    before = state()
    operator = staff(case.view, case.grant)

    # when
    response = _post_action(operator, case, case.name(action), pk)

    # then
    assert response.status_code in (200, 302)
    assert state() != before
    assert LogEntry.objects.filter(user=operator.user, object_id=str(pk)).exists()


def _offered(client, url: str) -> list[str]:
    form = client.get(url).context["action_form"]  # None when the user may run no action at all
    return [name for name, _ in form.fields["action"].choices] if form else []


@pytest.mark.parametrize("action", CASES)
def test_the_drop_down_offers_only_the_actions_one_may_run(action, staff):
    case = CASES[action]

    assert case.name(action) not in _offered(staff(case.view), case.url)
    assert case.name(action) in _offered(staff(case.view, case.grant), case.url)


@pytest.mark.parametrize("action", ["resend_callback", "requery_provider"])
def test_the_order_pages_buttons_are_refused_without_the_permission(action, staff, request):
    # given: the button's own form, as the order page renders it (no "index")
    case = CASES[action]
    pk, state = case.setup(request)
    before = state()
    viewer = staff(case.view)

    # when
    response = viewer.post(case.url, {"action": action, "_selected_action": [pk], "_from_order_page": "1"})

    # then
    assert response.status_code == 403
    assert state() == before


def test_the_order_page_shows_only_the_buttons_one_may_press(staff, make_order, fake_provider):
    paid, processing = make_order(OrderStatus.PAID), make_order(OrderStatus.PROCESSING)
    viewer = staff("orders.view_order")
    resender = staff("orders.view_order", "callbacks.resend_callback")
    requerier = staff("orders.view_order", "orders.requery_provider")

    def page(client, order) -> str:
        response = client.get(f"{ORDERS}{order.pk}/change/")
        assert response.status_code == 200
        return response.content.decode()

    assert "Resend callback</button>" not in page(viewer, paid)
    assert "Re-query provider</button>" not in page(viewer, processing)
    assert "Resend callback</button>" in page(resender, paid)
    assert "Re-query provider</button>" not in page(resender, processing)
    assert "Re-query provider</button>" in page(requerier, processing)
    assert "Resend callback</button>" not in page(requerier, paid)


def test_one_actions_permission_does_not_open_another(staff, request):
    # resend_callback on deliveries does not rotate merchant keys, nor manage channels
    merchant_pk, merchant_state = CASES["rotate_api_key"].setup(request)
    channel_pk, channel_state = CASES["disable"].setup(request)
    before = (merchant_state(), channel_state())
    resender = staff("orders.view_merchant", "allocation.view_paymentchannel", "callbacks.resend_callback")

    assert _post_action(resender, CASES["rotate_api_key"], "rotate_api_key", merchant_pk).status_code == 403
    assert _post_action(resender, CASES["disable"], "disable", channel_pk).status_code == 403
    assert (merchant_state(), channel_state()) == before


def test_a_view_only_operator_cannot_add_a_merchant(staff):
    viewer = staff("orders.view_merchant")

    response = viewer.post(f"{MERCHANTS}add/", {"name": "Sneaky", "callback_url": ""})

    assert response.status_code == 403
    assert not Merchant.objects.filter(name="Sneaky").exists()


def test_every_console_action_declares_a_permission_of_its_own():
    """An action added later without `permissions=` (or with the model's view) fails here."""
    checked = 0
    for model_admin in admin.site._registry.values():
        for name in model_admin.actions or ():
            func = getattr(model_admin, name)
            needs = getattr(func, "allowed_permissions", ())
            label = f"{type(model_admin).__name__}.{name}"
            assert needs, f"{label} declares no permissions"
            assert not set(needs) & {"view", "change", "add"}, f"{label} must need its own permission"
            for perm in needs:
                assert callable(getattr(model_admin, f"has_{perm}_permission", None)), label
            checked += 1
    assert checked == len(CASES)
