"""Retiring a FIELD_ENCRYPTION_KEY (README "Rotating FIELD_ENCRYPTION_KEY"): with a new key put first,
`manage.py rotate_encryption_key` re-encrypts every stored secret under it, after which the old key
can go and every merchant and channel secret still reads."""

import io
import json
import threading
import time

import psycopg2
import pytest
from cryptography.fernet import Fernet
from django.apps import apps
from django.core.management import CommandError, call_command
from django.db import connection

from allocation.models import PaymentChannel
from allocation.selectors import credential_hint
from allocation.services import channel_credentials_set
from core import crypto
from orders.models import Merchant
from orders.services import merchant_rotate_webhook_secret, merchant_signing_secrets
from tests.factories import ChannelFactory, make_merchant

pytestmark = pytest.mark.django_db
OLD, NEW = Fernet.generate_key().decode(), Fernet.generate_key().decode()
API_KEY = "sk_live_51QxS0aLkdIwHu7ixRealLookingKey0000abcd"
ENDPOINT_SECRET = "whsec_9f8e7d6c5b4a39281706f5e4d3c2b1a0wxyz"


def rotate(*args) -> dict:
    out = io.StringIO()
    call_command("rotate_encryption_key", *args, stdout=out)
    return json.loads(out.getvalue())


def rotate_failing(*args) -> tuple[dict, str]:
    out = io.StringIO()
    with pytest.raises(CommandError) as raised:
        call_command("rotate_encryption_key", *args, stdout=out)
    return json.loads(out.getvalue()), str(raised.value)


def stored_tokens() -> list[str]:
    return [
        *Merchant.objects.values_list("webhook_secret_encrypted", "previous_webhook_secret_encrypted"),
        *PaymentChannel.objects.values_list("api_key_encrypted", "webhook_secret_encrypted"),
    ]


@pytest.fixture
def under_old_key(settings):
    """Two merchants (one mid-rotation, so with a previous secret) and a Stripe channel with both
    credentials, all written under OLD; then NEW is put first, as the README's step 1 says."""
    settings.FIELD_ENCRYPTION_KEYS = [OLD]
    rotating = make_merchant(name="rotating").merchant
    first_secret = merchant_signing_secrets(merchant=rotating)[0]
    second_secret = merchant_rotate_webhook_secret(merchant=rotating)
    plain = make_merchant(name="plain").merchant
    plain_secret = merchant_signing_secrets(merchant=plain)[0]
    channel = ChannelFactory(provider="stripe")
    channel_credentials_set(channel=channel, api_key=API_KEY, webhook_secret=ENDPOINT_SECRET)
    settings.FIELD_ENCRYPTION_KEYS = [NEW, OLD]
    return {
        "rotating": (rotating.pk, [second_secret, first_secret]),
        "plain": (plain.pk, [plain_secret]),
        "channel": channel.pk,
    }


def test_after_rotation_the_old_key_can_go_and_every_secret_still_reads(settings, under_old_key):
    # when every stored secret is re-encrypted under the new key
    report = rotate()
    # then each column says what it did: 2 current secrets, 1 previous, the channel's key and secret
    assert report["rotated"] == 5 and report["current"] == 0 and report["unreadable"] == 0
    assert report["columns"]["orders.merchant.previous_webhook_secret_encrypted"] == {
        "current": 0,
        "rotated": 1,
        "unreadable": [],
    }
    # and with the old key dropped, merchants still sign with the same secrets, the channel's
    # credentials still read (before: the command did not exist, and nothing read any more)
    settings.FIELD_ENCRYPTION_KEYS = [NEW]
    for pk, secrets in (under_old_key["rotating"], under_old_key["plain"]):
        assert merchant_signing_secrets(merchant=Merchant.objects.get(pk=pk)) == secrets
    channel = PaymentChannel.objects.get(pk=under_old_key["channel"])
    assert crypto.decrypt(channel.api_key_encrypted) == API_KEY
    assert crypto.decrypt(channel.webhook_secret_encrypted) == ENDPOINT_SECRET
    assert credential_hint(channel.api_key_encrypted) == "sk_…abcd"


def test_check_writes_nothing_and_fails_until_every_secret_is_under_the_first_key(under_old_key):
    before = stored_tokens()
    report, error = rotate_failing("--check")
    assert report["check"] is True and report["not_current"] == 5 and "still need an older key" in error
    assert stored_tokens() == before
    rotate()
    report = rotate("--check")
    assert report["not_current"] == 0 and report["current"] == 5


def test_a_second_run_rewrites_nothing(under_old_key):
    rotate()
    after_first = stored_tokens()
    report = rotate()
    assert report["rotated"] == 0 and report["current"] == 5
    assert stored_tokens() == after_first


def test_a_secret_no_key_reads_is_reported_and_left_alone_while_the_rest_rotate(settings, under_old_key):
    # given a channel whose secret was written under a key that is no longer listed
    settings.FIELD_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    lost = ChannelFactory(provider="sandbox", webhook_secret_encrypted=crypto.encrypt("whsec_lost"))
    settings.FIELD_ENCRYPTION_KEYS = [NEW, OLD]
    token = lost.webhook_secret_encrypted
    # when the rotation runs, it names that row and fails, having rotated everything else
    report, error = rotate_failing()
    assert report["columns"]["allocation.paymentchannel.webhook_secret_encrypted"]["unreadable"] == [
        str(lost.pk)
    ]
    assert report["unreadable"] == 1 and report["rotated"] == 5 and "unreadable" in error
    assert PaymentChannel.objects.get(pk=lost.pk).webhook_secret_encrypted == token


def test_every_encrypted_column_is_rotated():
    # A column added later with an `_encrypted` name is rotated too, or this fails.
    ours = ("orders", "allocation", "gateway", "callbacks", "console")
    encrypted = {
        f"{model._meta.label_lower}.{field.name}"
        for model in apps.get_models()
        if model._meta.app_label in ours
        for field in model._meta.concrete_fields
        if field.name.endswith("_encrypted")
    }
    assert encrypted and set(rotate()["columns"]) == encrypted


@pytest.mark.django_db(transaction=True)
def test_a_secret_set_while_the_rotation_runs_is_not_overwritten_with_its_old_value(settings):
    # given a merchant's secret under the old key, and an operator's rotation of it not yet
    # committed (its row locked)
    settings.FIELD_ENCRYPTION_KEYS = [OLD]
    merchant = make_merchant(name="racing").merchant
    settings.FIELD_ENCRYPTION_KEYS = [NEW, OLD]
    db = connection.settings_dict
    operator = psycopg2.connect(
        dbname=db["NAME"], user=db["USER"], password=db["PASSWORD"], host=db["HOST"], port=db["PORT"]
    )
    with operator.cursor() as cursor:
        cursor.execute(
            "UPDATE orders_merchant SET webhook_secret_encrypted = %s WHERE id = %s",
            [crypto.encrypt("whsec_set_meanwhile"), str(merchant.pk)],
        )
    reports: list[dict] = []

    def rotation() -> None:
        try:
            reports.append(rotate())
        finally:
            connection.close()

    # when the rotation, having read the old token, waits for that row, and the operator commits
    thread = threading.Thread(target=rotation)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not waiting_on_a_merchant_row() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert waiting_on_a_merchant_row(), "the rotation never reached the locked row"
    finally:
        operator.commit()
        operator.close()
        thread.join(timeout=30)
    # then the operator's secret stands (before: the rotation wrote back the old one, re-encrypted)
    assert reports and reports[0]["unreadable"] == 0
    settings.FIELD_ENCRYPTION_KEYS = [NEW]
    stored = Merchant.objects.get(pk=merchant.pk).webhook_secret_encrypted
    assert crypto.decrypt(stored) == "whsec_set_meanwhile"


def waiting_on_a_merchant_row() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE 'UPDATE \"orders_merchant\"%%'"
        )
        return cursor.fetchone()[0] > 0
