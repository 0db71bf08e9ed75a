"""Shared fixtures: real PostgreSQL (pytest-django's test database) and real Redis."""

import os

import pytest
from hypothesis import core as hypothesis_core
from hypothesis import settings as hypothesis_settings
from rest_framework.test import APIClient

from allocation.selectors import channel_cache_clear
from core.redis import get_redis
from gateway.providers import base
from gateway.providers.base import ChargeOutcome, ChargeResult, InvalidWebhook, ProviderAdapter, StatusResult
from tests.factories import ChannelFactory, make_merchant
from tests.seeds import commit_hash
from tests.stub_provider import StubProvider


def _commit_seed() -> int | None:
    """The first 8 hex digits of the commit under test, or None outside a git checkout."""
    head = commit_hash()
    return int(head[:8], 16) if head else None


# Property tests in CI: the same examples for one commit (a red build is reproducible: re-run it,
# or HYPOTHESIS_SEED=<seed shown in the header> locally), new ones with every commit (the seed is
# the commit's hash), so CI explores instead of repeating the same cases forever. No example
# database in CI: a failure found there is kept as an explicit @example (or, for a state
# machine, a replayed step list) in the test itself. Outside CI each run explores afresh and
# remembers failures in .hypothesis/. HYPOTHESIS_PROFILE=ci replays CI's examples locally.
IN_CI = bool(os.environ.get("CI"))
hypothesis_settings.register_profile("ci", database=None, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if IN_CI else "default"))
HYPOTHESIS_SEED = os.environ.get("HYPOTHESIS_SEED") or (
    str(_commit_seed() or "") if hypothesis_settings.get_current_profile_name() == "ci" else ""
)
if HYPOTHESIS_SEED:
    hypothesis_core.global_force_seed = int(HYPOTHESIS_SEED)
elif hypothesis_settings.get_current_profile_name() == "ci":
    # No git (a tarball): fixed examples rather than unreproducible ones.
    hypothesis_settings.register_profile("ci", database=None, print_blob=True, derandomize=True)
    hypothesis_settings.load_profile("ci")


def pytest_terminal_summary(terminalreporter) -> None:
    profile = hypothesis_settings.get_current_profile_name()
    terminalreporter.write_line(
        f"hypothesis profile {profile}, HYPOTHESIS_SEED={HYPOTHESIS_SEED or '(random)'} (set it to replay)"
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

    def fetch_status(self, *, channel, idempotency_key, provider_reference=""):
        return StatusResult("paid")

    def parse_webhook(self, *, body, headers):
        raise InvalidWebhook("the accepting provider sends no webhooks")


@pytest.fixture
def accepting_channel():
    """The only channel: one of the AcceptingAdapter's (unit tests may stub the provider)."""
    base.register(AcceptingAdapter())
    yield ChannelFactory(code="accepting-a", provider=AcceptingAdapter.name)
    base._adapters.pop(AcceptingAdapter.name, None)


@pytest.fixture
def stub():
    """The stub provider (tests/stub_provider.py), registered under the name "stub"."""
    provider = StubProvider()
    base.register(provider)
    yield provider
    base._adapters.pop("stub", None)


@pytest.fixture
def channels(db):
    """Two channels of the stub provider: stub-1 tried first, then stub-2."""
    return [
        ChannelFactory(code="stub-1", provider="stub", priority=1),
        ChannelFactory(code="stub-2", provider="stub", priority=2),
    ]
