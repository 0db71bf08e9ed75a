"""Per-API-key rate limit: the one-second window of core/ratelimit.py, per key prefix."""

import logging

from django.conf import settings
from rest_framework.throttling import BaseThrottle

from core.ratelimit import window_count
from orders.models import Merchant

logger = logging.getLogger(__name__)


class MerchantKeyRateThrottle(BaseThrottle):
    def allow_request(self, request, view) -> bool:
        merchant = request.user
        if not isinstance(merchant, Merchant):
            return True
        counted = window_count(merchant.api_key_prefix)
        if counted is None:
            return True
        count, self._wait = counted
        return count <= settings.API_RATE_LIMIT_PER_SECOND

    def wait(self) -> float:
        return max(self._wait, 0.001)
