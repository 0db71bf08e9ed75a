"""Reads of channels. Channel rows change rarely and are read on every charge: cache them briefly."""

import re
import threading
import time
from collections import OrderedDict

from cryptography.fernet import InvalidToken
from django.db.models import OuterRef, QuerySet, Subquery

from allocation.models import ChannelDailyVolume, PaymentChannel
from core import crypto

_CACHE_SECONDS = 5.0
# Only channels that exist are cached, so the cache is as large as the channel table; the cap
# (oldest entry out) keeps that true whatever the table grows to.
_CACHE_MAX = 256
_cache: OrderedDict[str, tuple[float, PaymentChannel]] = OrderedDict()
_cache_lock = threading.Lock()
# PaymentChannel.code is a SlugField(max_length=64): anything else cannot name a channel.
_CODE = re.compile(r"[-a-zA-Z0-9_]{1,64}")


def channel_by_code(code: str) -> PaymentChannel | None:
    """The channel with this code, cached briefly; None for a code that names none.

    Codes come from the network (provider webhooks) before any signature is checked: a code that
    cannot be a channel never reaches the database, and one that names no channel is not cached.
    """
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        return None
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(code)
        if hit is not None and hit[0] > now:
            _cache.move_to_end(code)
            return hit[1]
    channel = PaymentChannel.objects.filter(code=code).first()
    with _cache_lock:
        if channel is None:
            _cache.pop(code, None)
            return None
        _cache[code] = (now + _CACHE_SECONDS, channel)
        _cache.move_to_end(code)
        while len(_cache) > _CACHE_MAX:
            _cache.popitem(last=False)
    return channel


_by_provider: dict[str, tuple[float, list[PaymentChannel]]] = {}


def channels_of_provider(provider: str) -> list[PaymentChannel]:
    """The channels of one provider (Stripe's webhooks name none: each one's secret is tried), cached
    briefly like channel_by_code; `provider` is one of our adapters' names, never a peer's text."""
    now = time.monotonic()
    with _cache_lock:
        hit = _by_provider.get(provider)
        if hit is not None and hit[0] > now:
            return hit[1]
    channels = list(PaymentChannel.objects.filter(provider=provider).order_by("code")[:_CACHE_MAX])
    with _cache_lock:
        _by_provider[provider] = (now + _CACHE_SECONDS, channels)
    return channels


def channel_cache_clear() -> None:
    with _cache_lock:
        _cache.clear()
        _by_provider.clear()


def channels_with_volume(*, day) -> QuerySet[PaymentChannel]:
    """Channels with `day_reserved` / `day_orders` from their volume row of `day`, in one query."""
    volume = ChannelDailyVolume.objects.filter(channel=OuterRef("pk"), day=day)
    return PaymentChannel.objects.annotate(
        day_reserved=Subquery(volume.values("reserved")[:1]),
        day_orders=Subquery(volume.values("orders")[:1]),
    )


def channel_recent_volume(*, channel: PaymentChannel, days: int = 14) -> list[ChannelDailyVolume]:
    return list(ChannelDailyVolume.objects.filter(channel=channel).order_by("-day")[:days])


def channel_codes() -> list[str]:
    return list(PaymentChannel.objects.order_by("code").values_list("code", flat=True))


def channel_providers() -> list[str]:
    return list(PaymentChannel.objects.order_by("provider").values_list("provider", flat=True).distinct())


def credential_hint(encrypted: str) -> str:
    """A stored credential as operators see it: its kind and last four characters, never more."""
    if not encrypted:
        return "not set"
    try:
        value = crypto.decrypt(encrypted)
    except (InvalidToken, ValueError):  # a key rotated away: say so, never show the token
        return "set, unreadable with the current FIELD_ENCRYPTION_KEY"
    prefix = value.split("_", 1)[0] + "_" if "_" in value[:8] else ""
    return f"{prefix}…{value[-4:]}" if len(value) >= len(prefix) + 12 else f"{prefix}… (set)"
