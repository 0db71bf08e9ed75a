"""Merchants in the console: keys and secrets rotate through actions, shown once, never stored in clear.

"Shown once" means on the page that answers the operator's own POST: never in a message, whose
cookie is signed but readable by anyone who sees it, nor in the session table.
"""

import re

import pytest
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.messages.storage.cookie import CookieStorage
from django.contrib.sessions.backends.db import SessionStore
from django.http import HttpRequest

from core import crypto
from orders.models import Merchant
from orders.services import merchant_authenticate, merchant_signing_secrets

pytestmark = pytest.mark.django_db

LIST = "/admin/orders/merchant/"

# The value inside the copy-me <code> element: the page's, or (before the fix) a message's.
SHOWN = re.compile(r"<code[^>]*user-select:all[^>]*>([^<]+)</code>")


def _post_and_follow(client, url: str, data: dict) -> list:
    """The POST and every redirect after it, each response kept (each may set cookies)."""
    responses = [client.post(url, data)]
    while responses[-1].status_code in (301, 302):
        responses.append(client.get(responses[-1]["Location"]))
    return responses


def _shown(responses) -> list[str]:
    return [value for r in responses for value in SHOWN.findall(r.content.decode())]


def _assert_kept_server_side(client, responses, *secrets: str) -> None:
    """No cookie set along the way, decoded or not, and no session row carries any of `secrets`."""
    for response in responses:
        for name, morsel in response.cookies.items():
            carried = [morsel.value, morsel.OutputString()]
            if name == CookieStorage.cookie_name and morsel.value:
                decoded = CookieStorage(HttpRequest())._decode(morsel.value) or []
                carried += [str(m) for m in decoded]
            for secret in secrets:
                assert not any(secret in text for text in carried), f"{secret[:6]}… in cookie {name}"
    session_key = client.cookies[settings.SESSION_COOKIE_NAME].value
    session = str(SessionStore(session_key=session_key).load())
    for secret in secrets:
        assert secret not in session


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
    assert merchant_rotate.status_code == 200
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

    responses = _post_and_follow(
        operator, LIST, {"action": "rotate_api_key", "_selected_action": [merchant.pk]}
    )

    shown = _shown(responses)
    assert len(shown) == 1
    new_key = shown[0]
    assert new_key.startswith("sk_")
    _assert_kept_server_side(operator, responses, new_key)
    assert "no-store" in responses[-1]["Cache-Control"]
    assert merchant_authenticate(api_key=new_key) == merchant
    assert merchant_authenticate(api_key=merchant_creds.api_key) is None
    assert new_key not in Merchant.objects.filter(pk=merchant.pk).values_list("api_key_hash", flat=True)[0]
    # shown once: the next page no longer carries it
    assert new_key not in operator.get(LIST).content.decode()
    entry = LogEntry.objects.get(object_id=str(merchant.pk))
    assert (entry.user, entry.get_change_message()) == (admin_user, "API key rotated.")


def test_rotate_webhook_secret_shows_it_once_and_keeps_the_old_one_signing(operator, merchant_creds):
    merchant = merchant_creds.merchant

    responses = _post_and_follow(
        operator, LIST, {"action": "rotate_webhook_secret", "_selected_action": [merchant.pk]}
    )

    merchant.refresh_from_db()
    new_secret = crypto.decrypt(merchant.webhook_secret_encrypted)
    assert _shown(responses) == [new_secret]
    _assert_kept_server_side(operator, responses, new_secret)
    assert new_secret not in operator.get(LIST).content.decode()
    assert merchant_signing_secrets(merchant=merchant) == [new_secret, merchant_creds.webhook_secret]
    assert LogEntry.objects.get(object_id=str(merchant.pk)).get_change_message() == "Webhook secret rotated."


def test_adding_a_merchant_goes_through_the_service_and_shows_key_and_secret_once(operator):
    responses = _post_and_follow(
        operator, f"{LIST}add/", {"name": "Acme", "callback_url": "https://acme.example/hooks"}
    )

    assert responses[-1].status_code == 200
    merchant = Merchant.objects.get(name="Acme")
    key, secret = _shown(responses)
    assert merchant_authenticate(api_key=key) == merchant
    assert secret.startswith("whsec_") and crypto.decrypt(merchant.webhook_secret_encrypted) == secret
    assert "whsec_" not in merchant.webhook_secret_encrypted
    _assert_kept_server_side(operator, responses, key, secret)
    assert LogEntry.objects.get(object_id=str(merchant.pk)).is_addition()


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


def test_an_operator_with_the_rotate_permission_sees_the_new_key_and_nothing_travels_in_cookies(
    staff, merchant_creds
):
    # given: not a superuser, just the view and the action's own permission
    rotator = staff("orders.view_merchant", "orders.rotate_merchant_key")
    merchant = merchant_creds.merchant

    # when
    responses = _post_and_follow(
        rotator, LIST, {"action": "rotate_api_key", "_selected_action": [merchant.pk], "index": "0"}
    )

    # then
    (new_key,) = _shown(responses)
    assert merchant_authenticate(api_key=new_key) == merchant
    _assert_kept_server_side(rotator, responses, new_key)
