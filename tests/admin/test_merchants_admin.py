"""Merchants in the console: keys and secrets rotate through actions, shown once, never stored in clear."""

import pytest
from django.contrib.admin.models import LogEntry

from orders import crypto
from orders.models import Merchant
from orders.services import merchant_authenticate, merchant_signing_secrets

pytestmark = pytest.mark.django_db

LIST = "/admin/orders/merchant/"


def _messages(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def test_list_and_search(operator, merchant_creds, other_api):
    merchant = merchant_creds.merchant

    response = operator.get(LIST)
    assert response.status_code == 200
    assert merchant.name in response.content.decode()

    found = operator.get(LIST, {"q": merchant.name}).context["cl"].result_list
    assert [m.pk for m in found] == [merchant.pk]
    found = operator.get(LIST, {"q": str(other_api.creds.merchant.pk)}).context["cl"].result_list
    assert [m.pk for m in found] == [other_api.creds.merchant.pk]
    assert operator.get(LIST, {"is_active__exact": "1"}).status_code == 200


def test_merchant_page_never_shows_the_key_hash_or_the_encrypted_secrets(operator, merchant_creds):
    merchant = merchant_creds.merchant
    merchant_rotate = operator.post(
        LIST, {"action": "rotate_webhook_secret", "_selected_action": [merchant.pk]}
    )
    assert merchant_rotate.status_code == 302
    merchant.refresh_from_db()

    html = operator.get(f"{LIST}{merchant.pk}/change/").content.decode()

    for hidden in (
        merchant.api_key_hash,
        merchant.webhook_secret_encrypted,
        merchant.previous_webhook_secret_encrypted,
        merchant_creds.api_key,
        merchant_creds.webhook_secret,
    ):
        assert hidden not in html
    assert "api_key_hash" not in html and "webhook_secret_encrypted" not in html
    assert merchant.api_key_prefix in html  # the public part that names the key


def test_rotate_api_key_shows_the_new_key_once_and_the_old_one_stops_working(
    operator, merchant_creds, admin_user
):
    merchant = merchant_creds.merchant

    response = operator.post(
        LIST, {"action": "rotate_api_key", "_selected_action": [merchant.pk]}, follow=True
    )

    shown = [m for m in _messages(response) if "New API key" in m]
    assert len(shown) == 1
    new_key = shown[0].split("<code")[1].split(">", 1)[1].split("</code>")[0]
    assert new_key.startswith("sk_")
    assert merchant_authenticate(api_key=new_key) == merchant
    assert merchant_authenticate(api_key=merchant_creds.api_key) is None
    assert new_key not in Merchant.objects.filter(pk=merchant.pk).values_list("api_key_hash", flat=True)[0]
    # shown once: the next page no longer carries it
    assert new_key not in operator.get(LIST).content.decode()
    entry = LogEntry.objects.get(object_id=str(merchant.pk))
    assert (entry.user, entry.get_change_message()) == (admin_user, "API key rotated.")


def test_rotate_webhook_secret_shows_it_once_and_keeps_the_old_one_signing(operator, merchant_creds):
    merchant = merchant_creds.merchant

    response = operator.post(
        LIST, {"action": "rotate_webhook_secret", "_selected_action": [merchant.pk]}, follow=True
    )

    shown = [m for m in _messages(response) if "New webhook secret" in m]
    assert len(shown) == 1
    merchant.refresh_from_db()
    new_secret = crypto.decrypt(merchant.webhook_secret_encrypted)
    assert new_secret in shown[0]
    assert merchant_signing_secrets(merchant=merchant) == [new_secret, merchant_creds.webhook_secret]
    assert LogEntry.objects.get(object_id=str(merchant.pk)).get_change_message() == "Webhook secret rotated."


def test_adding_a_merchant_goes_through_the_service_and_shows_key_and_secret_once(operator):
    response = operator.post(
        f"{LIST}add/", {"name": "Acme", "callback_url": "https://acme.example/hooks"}, follow=True
    )

    assert response.status_code == 200
    merchant = Merchant.objects.get(name="Acme")
    messages = " ".join(_messages(response))
    key = messages.split("API key of")[1].split("<code")[1].split(">", 1)[1].split("</code>")[0]
    assert merchant_authenticate(api_key=key) == merchant
    assert "whsec_" in messages
    assert merchant.webhook_secret_encrypted and "whsec_" not in merchant.webhook_secret_encrypted


def test_editing_a_merchant_changes_only_name_url_and_active(operator, merchant_creds):
    merchant = merchant_creds.merchant
    before = Merchant.objects.get(pk=merchant.pk)

    response = operator.post(
        f"{LIST}{merchant.pk}/change/",
        {
            "name": "Renamed",
            "callback_url": "https://renamed.example/hook",
            "api_key_hash": "0" * 64,  # not a form field: ignored
        },
    )

    assert response.status_code == 302
    after = Merchant.objects.get(pk=merchant.pk)
    assert (after.name, after.callback_url, after.is_active) == (
        "Renamed",
        "https://renamed.example/hook",
        False,
    )
    assert after.api_key_hash == before.api_key_hash
    assert after.webhook_secret_encrypted == before.webhook_secret_encrypted


def test_an_unsafe_callback_url_is_refused(operator, merchant_creds, settings):
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = False
    merchant = merchant_creds.merchant

    response = operator.post(
        f"{LIST}{merchant.pk}/change/", {"name": "x", "callback_url": "http://user:pw@127.0.0.1/hook"}
    )

    assert response.status_code == 200
    assert "credentials in the URL are not accepted" in response.content.decode()
    assert Merchant.objects.get(pk=merchant.pk).callback_url == merchant.callback_url


def test_merchants_cannot_be_deleted(operator, merchant_creds):
    assert operator.get(f"{LIST}{merchant_creds.merchant.pk}/delete/").status_code == 403
