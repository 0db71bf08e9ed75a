"""Encryption at rest for secrets we must be able to read back (webhook signing secrets)."""

import base64
import functools
import hashlib

from cryptography.fernet import Fernet
from django.conf import settings


@functools.cache
def _fernet() -> Fernet:
    key = settings.FIELD_ENCRYPTION_KEY
    if not key:
        digest = hashlib.sha256(("field-encryption:" + settings.SECRET_KEY).encode()).digest()
        key = base64.urlsafe_b64encode(digest).decode()
    return Fernet(key)


def encrypt(value: str) -> str:
    return _fernet().encrypt(value.encode()).decode()


@functools.lru_cache(maxsize=4096)
def decrypt(token: str) -> str:
    return _fernet().decrypt(token.encode()).decode()
