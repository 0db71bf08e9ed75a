"""Encryption at rest for secrets we must be able to read back (webhook signing secrets).

FIELD_ENCRYPTION_KEYS is a list of Fernet keys: the first encrypts, every one decrypts
(cryptography's MultiFernet), so a key rotates by putting a new one first, re-encrypting the
stored columns (`manage.py rotate_encryption_key`, which calls `reencrypt_column` for each), then
dropping the old one. Production requires the list (config/settings/production.py);
elsewhere an empty list means a development key derived from SECRET_KEY.
"""

import base64
import functools
import hashlib
from dataclasses import dataclass, field

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.models import Model


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


def is_current(token: str) -> bool:
    """`token` reads with the first key alone: the keys after it are no longer needed for it."""
    try:
        _fernet(_keys()[:1]).decrypt(token.encode())
    except InvalidToken:
        return False
    return True


@dataclass
class Reencrypted:
    """What re-encrypting one column found: rows already under the first key, rows re-encrypted
    (with `check`: rows that would be), and the primary keys of rows no key reads."""

    current: int = 0
    rotated: int = 0
    unreadable: list[str] = field(default_factory=list)


# A row rewritten between our read and our write (an operator rotated that secret meanwhile) is
# read again, at most this many times.
_REREADS = 3


def reencrypt_column(model: type[Model], column: str, *, check: bool = False) -> Reencrypted:
    """Re-encrypt every non-empty `column` of `model` under the first key, one row at a time.

    Each write is conditional on the token read, so a secret set meanwhile is never overwritten
    with its old value; a token no key reads is reported and left as it is. With `check`,
    nothing is written: `rotated` counts the rows that still need an older key.
    """
    result = Reencrypted()
    rows = model.objects.exclude(**{column: ""}).order_by("pk").values_list("pk", column)
    for pk, token in rows.iterator(chunk_size=500):
        for _ in range(_REREADS):
            if is_current(token):
                result.current += 1
                break
            try:
                rotated = rotate(token)
            except InvalidToken:
                result.unreadable.append(str(pk))
                break
            if check or model.objects.filter(pk=pk, **{column: token}).update(**{column: rotated}):
                result.rotated += 1
                break
            token = model.objects.filter(pk=pk).values_list(column, flat=True).first()
            if not token:  # deleted or cleared meanwhile: nothing left to re-encrypt
                break
    return result
