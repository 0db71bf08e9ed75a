"""Channels in the console: volume against cap, circuit, last hour's success; enable/disable."""

from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.utils import timezone

from allocation.models import PaymentChannel
from allocation.services import channel_reserve, order_allocate
from core import crypto
from gateway.models import ChargeAttempt
from gateway.providers.sandbox import sandbox_channel_secret
from tests.admin.factories import ChargeAttemptFactory
from tests.factories import ChannelFactory

pytestmark = pytest.mark.django_db

LIST = "/admin/allocation/paymentchannel/"


def _attempts(channel: str, **by_status: int) -> None:
    """Charge attempts on `channel` in the last hour, by status (one order each)."""
    for status, n in by_status.items():
        ChargeAttemptFactory.create_batch(n, channel=channel, status=status)


def _row(html: str, code: str) -> str:
    start = html.index(f">{code}</a>")
    return html[start : html.index("</tr>", start)]


def test_list_shows_volume_against_cap_circuit_and_success_rate(operator):
    # given
    busy = ChannelFactory(code="busy", daily_cap=100_000)
    tripped = ChannelFactory(code="tripped", circuit_open_until=timezone.now() + timedelta(minutes=5))
    channel_reserve(channel=busy, amount=75_000)
    _attempts("busy", paid=3, failed=1, accepted=5)  # accepted: no outcome yet, not counted
    _attempts("busy", rejected=1)
    ChargeAttempt.objects.filter(channel="busy", status="rejected").update(
        created_at=timezone.now() - timedelta(hours=2)
    )  # outside the window

    # when
    response = operator.get(LIST)

    # then
    html = response.content.decode()
    busy_row = _row(html, "busy")
    assert "75,000 / 100,000" in busy_row and "(75.0%)" in busy_row
    assert "closed" in busy_row
    assert "75.0%" in busy_row and "(3 of 4)" in busy_row
    tripped_row = _row(html, "tripped")
    assert "open</span> until" in tripped_row
    assert "0 / no cap" in tripped_row
    assert response.context["cl"].result_list[0].day_orders == 1  # busy: one reservation
    assert tripped.code in html


def test_success_rate_is_one_aggregate_query_whatever_the_number_of_channels(
    operator, django_assert_num_queries
):
    for i in range(2):
        ChannelFactory(code=f"few-{i}")
    with django_assert_num_queries(6):
        operator.get(LIST)
    for i in range(20):
        ChannelFactory(code=f"many-{i}")
        _attempts(f"many-{i}", paid=1)

    with django_assert_num_queries(6):
        response = operator.get(LIST)

    assert len(response.context["cl"].result_list) == 22


def test_disable_and_enable_through_the_service_with_an_audit_trail(operator, admin_user, make_order):
    channel = PaymentChannel.objects.get(code="fake-a")

    operator.post(LIST, {"action": "disable", "_selected_action": [channel.pk]})

    channel.refresh_from_db()
    assert channel.enabled is False
    order = make_order()
    order_allocate(order_id=order.pk)
    order.refresh_from_db()
    assert (order.status, order.failure_code) == ("failed", "no_channel_available")

    operator.post(LIST, {"action": "enable", "_selected_action": [channel.pk]})

    channel.refresh_from_db()
    assert channel.enabled is True
    messages = [
        e.get_change_message() for e in LogEntry.objects.filter(object_id=str(channel.pk)).order_by("id")
    ]
    assert messages == ["Disabled.", "Enabled."]
    assert LogEntry.objects.filter(object_id=str(channel.pk)).first().user == admin_user


def test_close_circuit(operator, redis_client):
    channel = ChannelFactory(code="tripped", circuit_open_until=timezone.now() + timedelta(minutes=5))

    operator.post(LIST, {"action": "close_circuit", "_selected_action": [channel.pk]})

    channel.refresh_from_db()
    assert channel.circuit_open_until is None
    assert "closed" in _row(operator.get(LIST).content.decode(), "tripped")


def test_search_and_the_read_only_channel_page(operator):
    ChannelFactory(code="on-one")
    off = ChannelFactory(code="off-one", enabled=False, webhook_secret_encrypted="gAAAA-secret-ciphertext")

    assert [c.code for c in operator.get(LIST, {"q": "on-one"}).context["cl"].result_list] == ["on-one"]
    assert [c.code for c in operator.get(LIST, {"q": "off"}).context["cl"].result_list] == ["off-one"]

    page = operator.get(f"{LIST}{off.pk}/change/")

    assert page.status_code == 200
    html = page.content.decode()
    assert "gAAAA-secret-ciphertext" not in html and "webhook_secret_encrypted" not in html
    assert "Last 14 days" in html and "no volume yet" in html
    assert operator.post(f"{LIST}{off.pk}/change/", {"enabled": "on"}).status_code == 403


ADD = f"{LIST}add/"
STRIPE_CHANNEL = {
    "code": "stripe-live",
    "provider": "stripe",
    "currencies": "usd, EUR",
    "min_amount": "50",
    "max_amount": "",
    "fee_bps": "290",
    "fee_fixed": "30",
    "priority": "1",
    "weight": "1",
    "daily_cap": "",
    "enabled": "on",
    "api_base": "",
}


def test_an_operator_adds_a_channel_then_sets_its_credentials(operator):
    # when a channel is added from the console (README: a live Stripe channel)
    response = operator.post(ADD, STRIPE_CHANNEL)
    # then it exists as given, currencies in upper case, and the addition is in its history
    assert response.status_code == 302, response.content.decode()[-2000:]
    channel = PaymentChannel.objects.get(code="stripe-live")
    assert (channel.provider, channel.currencies, channel.min_amount, channel.max_amount) == (
        "stripe",
        ["USD", "EUR"],
        50,
        None,
    )
    assert (channel.fee_bps, channel.fee_fixed, channel.enabled, channel.api_base) == (290, 30, True, "")
    assert LogEntry.objects.filter(object_id=str(channel.pk), action_flag=1).exists()
    # and its credentials page takes its key and secret
    page = operator.get(f"{LIST}{channel.pk}/credentials/")
    assert page.status_code == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("currencies", "ZZZ"),
        ("currencies", "USD,usd"),
        ("currencies", ""),
        ("provider", "nope"),
        ("code", "not a slug"),
        ("min_amount", "0"),
        ("max_amount", "10"),  # below min_amount 50
        ("api_base", "not a url"),
        # allocation would take weight 0 as 1, and a cap of 0 refuses every order (shown "no cap")
        ("weight", "0"),
        ("daily_cap", "0"),
    ],
)
def test_a_channel_the_form_cannot_take_is_refused_and_nothing_is_made(operator, field, value):
    response = operator.post(ADD, {**STRIPE_CHANNEL, field: value})

    assert response.status_code == 200  # the form again, with its error
    assert response.context["adminform"].form.errors.get(field), response.context["adminform"].form.errors
    assert not PaymentChannel.objects.filter(code=STRIPE_CHANNEL["code"]).exists()


def test_only_an_operator_with_the_add_permission_adds_a_channel(staff):
    viewer = staff("allocation.view_paymentchannel", "allocation.manage_paymentchannel")
    assert viewer.get(ADD).status_code == 403
    assert viewer.post(ADD, STRIPE_CHANNEL).status_code == 403
    assert not PaymentChannel.objects.filter(code="stripe-live").exists()
    adder = staff("allocation.view_paymentchannel", "allocation.add_paymentchannel")
    assert adder.post(ADD, STRIPE_CHANNEL).status_code == 302
    assert PaymentChannel.objects.filter(code="stripe-live").exists()


def test_a_sandbox_channel_added_in_the_console_gets_the_sandboxs_webhook_secret(operator, settings):
    # when a sandbox channel is added (before: no webhook secret, so every sandbox webhook for it
    # was refused 401 and its orders settled only by status polls, with nothing said)
    response = operator.post(
        ADD, {**STRIPE_CHANNEL, "code": "sandbox-extra", "provider": "sandbox"}, follow=True
    )
    # then it has the secret the sandbox signs its webhooks with, as seed_sandbox gives its own
    channel = PaymentChannel.objects.get(code="sandbox-extra")
    secret = sandbox_channel_secret("sandbox-extra", settings.SANDBOX_SECRET)
    assert crypto.decrypt(channel.webhook_secret_encrypted) == secret
    assert not [m for m in response.context["messages"] if m.level_tag == "warning"]


def test_a_stripe_channel_added_without_a_webhook_secret_is_said_to_need_one(operator):
    response = operator.post(ADD, STRIPE_CHANNEL, follow=True)

    [warning] = [str(m) for m in response.context["messages"] if m.level_tag == "warning"]
    assert "stripe-live has no webhook secret" in warning and "credentials page" in warning


def test_a_half_open_circuit_is_not_shown_closed(operator):
    # given a channel whose cool-down ended and that no charge has closed since
    ChannelFactory(code="trial", circuit_open_until=timezone.now() - timedelta(seconds=5))
    ChannelFactory(code="capped-at-zero", daily_cap=0)
    # then the console says so (before: green "closed"), and a cap of 0 is no "no cap"
    html = operator.get(LIST).content.decode()
    assert "half-open</span> since" in _row(html, "trial") and "closed" not in _row(html, "trial")
    assert "0 / 0 (takes no orders)" in _row(html, "capped-at-zero")
