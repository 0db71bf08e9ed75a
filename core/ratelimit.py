"""A fixed one-second window counted in Redis: the API's per-key limit and the middleware's limit
on failed authentication both count with it.

Written here rather than using DRF's SimpleRateThrottle because that one stores the whole
request history per key in the cache and rewrites it on every request (O(rate) work), and
does a non-atomic read-then-write. One INCR per request is atomic and constant cost.
"""

import logging
import time

import redis

from core.redis import get_redis

logger = logging.getLogger(__name__)


def window_count(name: str, *, increment: bool = True) -> tuple[int, float] | None:
    """Requests counted under `name` in the current one-second window (this one included when
    `increment`), and the seconds left in the window; None when Redis cannot be reached."""
    now = time.time()
    window = int(now)
    key = f"ratelimit:{name}:{window}"
    try:
        if increment:
            pipe = get_redis().pipeline()
            pipe.incr(key)
            pipe.expire(key, 2)
            count = pipe.execute()[0]
        else:
            count = int(get_redis().get(key) or 0)
    except redis.RedisError as exc:
        # The limiter protects us; it must not take the API down with Redis.
        logger.warning("ratelimit.unavailable", extra={"error": repr(exc)})
        return None
    return count, window + 1 - now
