"""Reads of channels. Channel rows change rarely and are read on every charge: cache them briefly."""

import time

from django.db.models import OuterRef, QuerySet, Subquery

from allocation.models import ChannelDailyVolume, PaymentChannel

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
