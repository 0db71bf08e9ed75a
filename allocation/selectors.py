"""Reads of channels. Channel rows change rarely and are read on every charge: cache them briefly."""

import time

from allocation.models import PaymentChannel

_CACHE_SECONDS = 5.0
_cache: dict[str, tuple[float, PaymentChannel | None]] = {}


def channel_by_code(code: str) -> PaymentChannel | None:
    now = time.monotonic()
    hit = _cache.get(code)
    if hit is not None and hit[0] > now:
        return hit[1]
    channel = PaymentChannel.objects.filter(code=code).first()
    _cache[code] = (now + _CACHE_SECONDS, channel)
    return channel


def channel_cache_clear() -> None:
    _cache.clear()
