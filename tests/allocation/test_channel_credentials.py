"""Channel credentials (SPEC 11): stored encrypted, checked, never shown or logged in full."""

import logging

import pytest

from allocation.models import PaymentChannel
from allocation.selectors import credential_hint
from allocation.services import InvalidCredential, channel_credentials_set
from core import crypto
from tests.factories import ChannelFactory

pytestmark = pytest.mark.django_db
KEY = "sk_live_51QxS0aLkdIwHu7ixRealLookingKey0000abcd"
SECRET = "whsec_9f8e7d6c5b4a39281706f5e4d3c2b1a0wxyz"


def test_credentials_are_stored_encrypted_and_shown_by_their_last_four(caplog):
    caplog.set_level(logging.INFO)
    channel = ChannelFactory(provider="stripe")
    changed = channel_credentials_set(channel=channel, api_key=KEY, webhook_secret=SECRET)
    assert changed == ["api_key", "webhook_secret"]
    stored = PaymentChannel.objects.get(pk=channel.pk)
    assert KEY not in stored.api_key_encrypted and SECRET not in stored.webhook_secret_encrypted
    assert (crypto.decrypt(stored.api_key_encrypted), crypto.decrypt(stored.webhook_secret_encrypted)) == (
        KEY,
        SECRET,
    )
    assert credential_hint(stored.api_key_encrypted) == "sk_…abcd"
    assert credential_hint(stored.webhook_secret_encrypted) == "whsec_…wxyz"
    assert not any(KEY in str(vars(r)) or SECRET in str(vars(r)) for r in caplog.records)


def test_rotating_one_credential_keeps_the_other():
    channel = ChannelFactory(provider="stripe")
    channel_credentials_set(channel=channel, api_key=KEY, webhook_secret=SECRET)
    channel_credentials_set(channel=channel, api_key="rk_live_rotated000000000000009999")
    stored = PaymentChannel.objects.get(pk=channel.pk)
    assert crypto.decrypt(stored.api_key_encrypted).endswith("9999")
    assert crypto.decrypt(stored.webhook_secret_encrypted) == SECRET


@pytest.mark.parametrize(
    ("kind", "value"),
    [("api_key", "pk_live_publishable"), ("api_key", ""), ("api_key", "sk_a b"), ("webhook_secret", "s3cr3t-value"),
     ("webhook_secret", "whsec_\x00")],
)  # fmt: skip
def test_a_credential_that_cannot_be_stripes_is_refused_without_echoing_it(kind, value):
    channel = ChannelFactory(provider="stripe")
    with pytest.raises(InvalidCredential) as raised:
        channel_credentials_set(channel=channel, **{kind: value})
    assert not value or value not in str(raised.value)
    assert PaymentChannel.objects.get(pk=channel.pk).api_key_encrypted == ""


def test_an_unset_credential_says_so():
    assert credential_hint("") == "not set"
    assert credential_hint("not a fernet token") == "set, unreadable with the current FIELD_ENCRYPTION_KEY"
