"""A channel's API key and endpoint secret are set and rotated in the console, stored encrypted,
never shown back in full; the order page shows the payer's token masked (SPEC 11)."""

import pytest
from django.contrib.admin.models import LogEntry

from allocation.models import PaymentChannel
from core import crypto
from tests.factories import ChannelFactory, OrderFactory

pytestmark = pytest.mark.django_db
KEY = "sk_live_51QxS0aLkdIwHu7ixRealLookingKey0000abcd"
SECRET = "whsec_9f8e7d6c5b4a39281706f5e4d3c2b1a0wxyz"


def _url(channel: PaymentChannel) -> str:
    return f"/admin/allocation/paymentchannel/{channel.pk}/credentials/"


def test_an_operator_sets_both_and_sees_only_their_last_four(staff):
    channel = ChannelFactory(code="stripe-live", provider="stripe")
    client = staff("allocation.view_paymentchannel", "allocation.manage_paymentchannel")
    form = client.get(_url(channel))
    assert form.status_code == 200 and "not set" in form.content.decode()
    assert "no-store" in form["Cache-Control"] or "no-cache" in form["Cache-Control"]
    # when
    response = client.post(_url(channel), {"api_key": KEY, "webhook_secret": SECRET}, follow=True)
    # then
    page = response.content.decode()
    assert "sk_…abcd" in page and "whsec_…wxyz" in page
    assert KEY not in page and SECRET not in page
    stored = PaymentChannel.objects.get(pk=channel.pk)
    assert crypto.decrypt(stored.api_key_encrypted) == KEY
    assert crypto.decrypt(stored.webhook_secret_encrypted) == SECRET
    assert LogEntry.objects.filter(object_id=str(channel.pk)).exists()
    # the form never renders a stored value back
    again = client.get(_url(channel)).content.decode()
    assert KEY not in again and SECRET not in again and "sk_…abcd" in again


def test_rotating_the_secret_alone_keeps_the_key(staff):
    channel = ChannelFactory(code="stripe-live", provider="stripe", api_key_encrypted=crypto.encrypt(KEY))
    client = staff("allocation.view_paymentchannel", "allocation.manage_paymentchannel")
    client.post(_url(channel), {"api_key": "", "webhook_secret": SECRET})
    stored = PaymentChannel.objects.get(pk=channel.pk)
    assert (crypto.decrypt(stored.api_key_encrypted), crypto.decrypt(stored.webhook_secret_encrypted)) == (
        KEY,
        SECRET,
    )


def test_a_value_that_cannot_be_a_stripe_key_is_refused_and_not_echoed(staff):
    channel = ChannelFactory(code="stripe-live", provider="stripe")
    client = staff("allocation.view_paymentchannel", "allocation.manage_paymentchannel")
    response = client.post(_url(channel), {"api_key": "pk_live_publishable_key_1234"})
    assert response.status_code == 200
    assert "starts with sk_ or rk_" in response.content.decode()
    assert "pk_live_publishable_key_1234" not in response.content.decode()
    assert PaymentChannel.objects.get(pk=channel.pk).api_key_encrypted == ""


def test_a_view_only_operator_sees_the_hints_but_cannot_set(staff):
    channel = ChannelFactory(code="stripe-live", provider="stripe", api_key_encrypted=crypto.encrypt(KEY))
    client = staff("allocation.view_paymentchannel")
    page = client.get(f"/admin/allocation/paymentchannel/{channel.pk}/change/").content.decode()
    assert "sk_…abcd" in page and KEY not in page
    assert client.get(_url(channel)).status_code == 403
    assert client.post(_url(channel), {"api_key": "sk_live_other000000000000000000"}).status_code == 403
    assert crypto.decrypt(PaymentChannel.objects.get(pk=channel.pk).api_key_encrypted) == KEY


def test_the_order_page_shows_the_payment_method_masked(operator):
    order = OrderFactory(
        payment_method="pm_card_chargeCustomerFail", provider_reference="pi_3QxS5cLkdIwHu7ix"
    )
    page = operator.get(f"/admin/orders/order/{order.pk}/change/").content.decode()
    assert "pm_…Fail" in page and "pm_card_chargeCustomerFail" not in page
    assert "pi_3QxS5cLkdIwHu7ix" in page
