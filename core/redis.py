"""One shared Redis client per process (connection pooled), with short timeouts."""

import functools

import redis
from django.conf import settings


@functools.cache
def get_redis() -> redis.Redis:
    return redis.Redis.from_url(settings.CACHE_URL, socket_connect_timeout=1, socket_timeout=1)


def _redis_broker_client(url: str) -> redis.Redis | None:
    """A client of the broker's Redis for `url` (redis://, rediss://, sentinel://), else None."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    if scheme != "sentinel":
        return None
    from urllib.parse import urlparse

    from redis.sentinel import Sentinel

    parts = [urlparse(part) for part in url.split(";") if part]
    db = int((parts[0].path or "/0").strip("/") or 0)
    sentinel = Sentinel(
        [(part.hostname, part.port or 26379) for part in parts],
        socket_connect_timeout=1,
        socket_timeout=1,
        sentinel_kwargs={"socket_connect_timeout": 1, "socket_timeout": 1},
    )
    return sentinel.master_for(
        settings.CELERY_BROKER_SENTINEL_MASTER, db=db, password=parts[0].password, socket_timeout=1
    )


@functools.cache
def get_broker_redis() -> redis.Redis | None:
    """The broker's Redis, where the queues are (not CACHE_URL's); None for a RabbitMQ broker."""
    return _redis_broker_client(settings.CELERY_BROKER_URL)
