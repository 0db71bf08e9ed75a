"""Per-API-key rate limit: a fixed one-second window counted in Redis.

Written here rather than using DRF's SimpleRateThrottle because that one stores the whole
request history per key in the cache and rewrites it on every request (O(rate) work), and
does a non-atomic read-then-write. One INCR per request is atomic and constant cost.
"""

import logging
import time

import redis
from django.conf import settings
from rest_framework.throttling import BaseThrottle

from orders.models import Merchant
from orders.redis_client import get_redis

logger = logging.getLogger(__name__)


class MerchantKeyRateThrottle(BaseThrottle):
    def allow_request(self, request, view) -> bool:
        merchant = request.user
        if not isinstance(merchant, Merchant):
            return True
        limit = settings.API_RATE_LIMIT_PER_SECOND
        now = time.time()
        window = int(now)
        key = f"ratelimit:{merchant.api_key_prefix}:{window}"
        try:
            pipe = get_redis().pipeline()
            pipe.incr(key)
            pipe.expire(key, 2)
            count = pipe.execute()[0]
        except redis.RedisError as exc:
            # The limiter protects us; it must not take the API down with Redis.
            logger.warning("ratelimit.unavailable", extra={"error": repr(exc)})
            return True
        self._wait = window + 1 - now
        return count <= limit

    def wait(self) -> float:
        return max(self._wait, 0.001)
