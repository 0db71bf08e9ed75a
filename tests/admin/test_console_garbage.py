"""The operators' console under garbage: every list page and object page, with query strings and
ids no form produces, and every form it draws posted back with values no browser sends. A staff
member's browser (or a pasted link, or a forged post) can send them; the answer is a page, a
redirect or a 4xx, never a 500."""

import re

import pytest
from django.contrib import admin
from django.contrib.auth.models import User
from django.test import Client
from django.urls import NoReverseMatch, reverse

from allocation.models import PaymentChannel
from tests.admin.factories import ChargeAttemptFactory
from tests.factories import ChannelFactory, OrderFactory, overdue_refund

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
    # ids as they arrive in the path, undecoded ("%C2%B2" is "²", "%D9%A1" an Arabic-Indic one:
    # both are digits to str.isdigit()), on the object pages and the console's own views
    raws = (
        "%00",
        "%ff",
        "x%00y",
        "%2e%2e",
        "1%0a2",
        "%C2%B2",
        "1%C2%B2",
        "%D9%A1",
        "nope",
        "a/b/c",
        "%3Cs%3E",
    )
    for raw in raws:
        for view in ("change", "history", "delete", "credentials", "refund"):
            response = console.get(f"{changelist}{raw}/{view}/")
            if response.status_code >= 500:
                problems.append(f"GET raw {raw}/{view}/ -> {response.status_code}")
        for view in ("credentials", "refund"):  # the console's own views, which act on a POST
            response = console.post(f"{changelist}{raw}/{view}/", {"amount": "1"})
            if response.status_code >= 500:
                problems.append(f"POST raw {raw}/{view}/ -> {response.status_code}")
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


# values for every field of a posted form at once
FORM_VALUES = [
    "\x00",
    "a\x00b",
    "x" * 100_000,
    "\u00b2",  # a digit to str.isdigit(), not to int()
    "\u0661\u0662",  # 12 to int(), in Arabic-Indic digits
    "9" * 40,
    "-1",
    "1e400",
    "NaN",
    "",
    "{",
    "javascript:alert(1)",
    "http://[::1",
]


def _form_fields(response) -> set[str]:
    """The names of the fields of the form(s) a console page draws, inlines' included."""
    names: set[str] = set()
    for key in ("adminform", "form"):
        form = (response.context or {}).get(key)
        if form is not None:
            names |= set(getattr(form, "form", form).fields)
    for inline in (response.context or {}).get("inline_admin_formsets") or []:
        formset = inline.formset
        names |= {formset.management_form.add_prefix(name) for name in formset.management_form.fields}
        names |= {form.add_prefix(name) for form in formset.forms for name in form.fields}
    return names


def test_every_console_form_posted_back_with_garbage_never_gives_a_500(console):
    # given a row of every model the console shows, and a user the forms may change
    ChannelFactory(code="sandbox-a", provider="sandbox", currencies=["USD"])
    order = overdue_refund("succeeded").order
    ChargeAttemptFactory(order=order)
    other = User.objects.create_user("other", password="pw-123456789")
    ops = User.objects.get(username="ops")
    urls = ["/admin/password_change/", reverse("admin:allocation_paymentchannel_credentials", args=[1])]
    for model in admin.site._registry:
        route = f"admin:{model._meta.app_label}_{model._meta.model_name}"
        urls.append(reverse(f"{route}_add"))
        row = other if model is User else model.objects.first()
        if row is not None:
            urls.append(reverse(f"{route}_change", args=[row.pk]))
    problems, drawn = [], 0
    for url in urls:
        console.force_login(ops)  # a password change logs the operator out
        page = console.get(url)
        if page.status_code != 200:  # a form the console does not offer (read-only models)
            continue
        drawn += 1
        names = _form_fields(page) | {"_save", "_continue"}
        # when the form comes back empty, then with garbage in every field
        for value in (None, *FORM_VALUES):
            data = {} if value is None else dict.fromkeys(names, value)
            response = console.post(url, data)
            if response.status_code >= 500:
                problems.append(f"POST {url} {value!r:.20} -> {response.status_code}")
    # and the order page's refund form, with a key the page drew
    console.force_login(ops)
    change = console.get(reverse("admin:orders_order_change", args=[order.pk])).content.decode()
    key = re.search(r'name="refund_key" value="([0-9a-f]{32})"', change).group(1)
    refund = reverse("admin:orders_order_refund", args=[order.pk])
    for value in FORM_VALUES:
        for data in ({"amount": value}, {"amount": "1", "reason": value}):
            response = console.post(refund, {"refund_key": key, **data})
            if response.status_code >= 500:
                problems.append(f"POST refund {data!r:.40} -> {response.status_code}")
    # then every form drawn answered a page, a redirect or a 4xx
    assert drawn >= 10, f"only {drawn} console forms were drawn: the test reaches less than it says"
    assert problems == []
