"""Encryption at rest for secrets we must be able to read back (webhook signing secrets).

FIELD_ENCRYPTION_KEYS is a list of Fernet keys: the first encrypts, every one decrypts
(cryptography's MultiFernet), so a key rotates by putting a new one first, re-encrypting with
`rotate()`, then dropping the old one. Production requires the list (config/settings/production.py);
elsewhere an empty list means a development key derived from SECRET_KEY.
"""

import base64
import functools
import hashlib

from cryptography.fernet import Fernet, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def _dev_key() -> str:
    digest = hashlib.sha256(("field-encryption:" + settings.SECRET_KEY).encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()


def _keys() -> tuple[str, ...]:
    keys = tuple(settings.FIELD_ENCRYPTION_KEYS)
    if keys:
        return keys
    if getattr(settings, "FIELD_ENCRYPTION_KEY_REQUIRED", False):
        raise ImproperlyConfigured("FIELD_ENCRYPTION_KEY is required")
    return (_dev_key(),)


@functools.lru_cache(maxsize=8)
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except ValueError as exc:  # not 32 url-safe base64-encoded bytes; never echo the key
        raise ImproperlyConfigured("FIELD_ENCRYPTION_KEY holds a key that is not a Fernet key") from exc


def encrypt(value: str) -> str:
    return _fernet(_keys()).encrypt(value.encode()).decode()


def decrypt(token: str) -> str:
    return _decrypt(token, _keys())


@functools.lru_cache(maxsize=4096)
def _decrypt(token: str, keys: tuple[str, ...]) -> str:
    # Cached per key set, so a key removed from the list stops decrypting at once.
    return _fernet(keys).decrypt(token.encode()).decode()


def rotate(token: str) -> str:
    """`token` re-encrypted under the first key (readable by any of the keys before)."""
    return _fernet(_keys()).rotate(token.encode()).decode()
