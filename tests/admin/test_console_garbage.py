"""The operators' console under garbage: every list page and object page, with query strings and
ids no form produces. A staff member's browser (or a pasted link) can send them; the answer is a
page, a redirect or a 4xx, never a 500."""

import pytest
from django.contrib import admin
from django.contrib.auth.models import User
from django.test import Client
from django.urls import NoReverseMatch, reverse

from allocation.models import PaymentChannel
from tests.factories import OrderFactory

# raw query strings, undecoded as they arrive
QUERIES = [
    "q=%00",
    "q=" + "x" * 5000,
    "q=%ff%fe",
    "q=%ed%a0%80",
    "o=999",
    "o=-1.abc",
    "o=" + "1." * 500,
    "p=-1",
    "p=abc",
    "p=99999999999999999999",
    "all=",
    "e=1",
    "_changelist_filters=%00",
    "status__exact=%00",
    "status__exact=" + "s" * 3000,
    "created_at__gte=garbage",
    "created_at__gte=9999-99-99",
    "created_at__lt=0001-01-01",
    "id__in=1,2,garbage",
    "id=garbage",
    "pk__gt=%ff",
    "merchant__id__exact=garbage",
    "channel__exact=%00",
    "outcome__isnull=maybe",
    "amount__gte=1e400",
    "amount__lt=" + "9" * 100,
    "__proto__=1",
    "a" * 10000,
    "=" * 100,
    "%zz=%zz&&&===",
]
IDS = ["garbage", "0", "-1", "%00", "9" * 40, "01a22f60-0000-0000-0000-000000000000", "%ff", "a" * 300]


@pytest.fixture
def console(db):
    User.objects.create_superuser("ops", password="pw-123456789")
    OrderFactory()
    client = Client(raise_request_exception=False)
    client.login(username="ops", password="pw-123456789")
    return client


def _admin_urls() -> list[tuple[str, str]]:
    """(name, changelist url template) of every model the console shows."""
    return [
        (
            f"{model._meta.app_label}.{model._meta.model_name}",
            f"admin:{model._meta.app_label}_{model._meta.model_name}",
        )
        for model in admin.site._registry
    ]


@pytest.mark.parametrize(("name", "route"), _admin_urls())
def test_garbage_query_strings_and_ids_never_give_a_500(console, name, route):
    problems = []
    changelist = reverse(f"{route}_changelist")
    for query in QUERIES:
        response = console.get(f"{changelist}?{query}")
        if response.status_code >= 500:
            problems.append(f"GET ?{query[:60]} -> {response.status_code}")
    for object_id in IDS:
        for view in ("change", "history", "delete"):
            try:
                url = reverse(f"{route}_{view}", args=[object_id])
            except NoReverseMatch:  # a view this model does not have
                continue
            response = console.get(url)
            if response.status_code >= 500:
                problems.append(f"GET {view} {object_id[:40]} -> {response.status_code}")
    # ids as they arrive in the path, undecoded
    for raw in ("%00", "%ff", "x%00y", "%2e%2e", "1%0a2"):
        response = console.get(f"{changelist}{raw}/change/")
        if response.status_code >= 500:
            problems.append(f"GET raw {raw} -> {response.status_code}")
    # an action on ids no checkbox carries
    page = console.get(changelist)
    assert page.status_code == 200, f"{name}: the operator does not see the list ({page.status_code})"
    form = page.context.get("action_form")  # None on lists without actions: a forged POST still tries
    choices = form.fields["action"].choices if form else []
    actions = {"delete_selected", *(choice for choice, _ in choices if choice)}
    for action in sorted(actions):
        for selected in (["%00"], ["\x00"], ["garbage"], ["9" * 40]):
            data = {"action": action, "_selected_action": selected, "index": "0"}
            response = console.post(changelist, data)
            if response.status_code >= 500:
                problems.append(f"POST action {action} {selected} -> {response.status_code}")
    assert problems == [], f"{name}: {problems}"


def test_a_nul_in_a_list_filter_and_an_action_on_a_forged_id_are_a_400(console):
    # given a list filter carrying a NUL character, then
    response = console.get(reverse("admin:orders_order_changelist") + "?status__exact=%00")
    # then the console answers 400, saying why
    assert response.status_code == 400
    assert "NUL" in response.json()["error"]["message"]
    # and an action on an id that is not a channel's is refused, and changes no channel
    channel = PaymentChannel.objects.create(code="garbage-ch", provider="sandbox", currencies=["USD"])
    response = console.post(
        reverse("admin:allocation_paymentchannel_changelist"),
        {"action": "disable", "_selected_action": [str(channel.pk), "garbage"], "index": "0"},
    )
    assert response.status_code == 400
    channel.refresh_from_db()
    assert channel.enabled


# the console's other pages, as raw paths and query strings
PAGES = [
    "/admin/?%00=%00",
    "/admin/dashboard/?q=%00&window=%ff&status=" + "s" * 3000,
    "/admin/orders/?%00",
    "/admin/nonexistent/",
    "/admin/orders/nonexistent/",
    "/admin/r/garbage/garbage/",
    "/admin/r/1/%00/",
    "/admin/r/99999999999999999999/1/",
    "/admin/autocomplete/?app_label=orders&model_name=order&field_name=merchant&term=%00",
    "/admin/autocomplete/?app_label=%00&model_name=%00&field_name=%00",
    "/admin/autocomplete/?term=" + "t" * 5000,
    "/admin/jsi18n/?language=%00",
    "/admin/login/?next=%00",
    "/admin/login/?next=//evil.example/",
    "/admin/password_change/?%00",
    "/admin/logout/",
]


def test_the_consoles_other_pages_never_give_a_500_on_garbage(console):
    problems = [
        f"GET {path[:80]} -> {response.status_code}"
        for path in PAGES
        if (response := console.get(path)).status_code >= 500
    ]
    assert problems == []
