"""Shared fixtures: real PostgreSQL (pytest-django's test database) and real Redis."""

import pytest
from rest_framework.test import APIClient

from allocation.selectors import channel_cache_clear
from orders.redis_client import get_redis
from tests.factories import make_merchant


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
