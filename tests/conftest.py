"""Shared fixtures: real PostgreSQL (pytest-django's test database) and real Redis."""

import os

import pytest
from hypothesis import settings as hypothesis_settings
from rest_framework.test import APIClient

from allocation.selectors import channel_cache_clear
from gateway.providers import base
from gateway.providers.base import ChargeOutcome, ChargeResult, InvalidWebhook, ProviderAdapter, StatusResult
from orders.redis_client import get_redis
from tests.factories import ChannelFactory, make_merchant

# CI runs the property tests on the same examples every time, so a red build is reproducible
# rather than a roll of the dice; elsewhere each run explores new ones. HYPOTHESIS_PROFILE=ci
# replays CI's examples locally.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
hypothesis_settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default")
)


@pytest.fixture(autouse=True)
def _fresh_channel_cache():
    channel_cache_clear()
    yield
    channel_cache_clear()


@pytest.fixture
def redis_client():
    client = get_redis()
    client.ping()
    return client


@pytest.fixture
def merchant_creds(db):
    return make_merchant()


@pytest.fixture
def api(merchant_creds):
    """An API client authenticated as `merchant_creds`."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {merchant_creds.api_key}")
    return client


@pytest.fixture
def other_api(db):
    creds = make_merchant()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {creds.api_key}")
    client.creds = creds
    return client


class AcceptingAdapter(ProviderAdapter):
    """A provider that accepts every charge, answers "paid" when asked and sends no webhooks."""

    name = "fake-accepting"

    def charge(self, *, channel, request):
        return ChargeResult(ChargeOutcome.ACCEPTED, provider_reference="pr-1", http_status=201)

    def fetch_status(self, *, channel, idempotency_key):
        return StatusResult("paid")

    def parse_webhook(self, *, body, headers):
        raise InvalidWebhook("the accepting provider sends no webhooks")


@pytest.fixture
def accepting_channel():
    """The only channel: one of the AcceptingAdapter's (unit tests may stub the provider)."""
    base.register(AcceptingAdapter())
    yield ChannelFactory(code="accepting-a", provider=AcceptingAdapter.name)
    base._adapters.pop(AcceptingAdapter.name, None)
