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


# `make test` runs two pytest workers (pytest-xdist, -n 2), then the fuzz run alone (Makefile). The
# tests that start stacks on fixed ports and servers of their own (faults, e2e, scale) run as one
# group, in order, on one worker: run side by side on 2 cores, the fault and scale
# scenarios' timings were starved (sentinels not converging, a second poll not firing in 120 s).
# Everything else spreads over both workers, test by test. (xdist 3.8's --dist loadgroup did not group here: its node-id
# suffix never appeared under pytest 9.2; so the grouping is this scheduler's.)
_STACK_GROUPS = {"faults": "stacks", "e2e": "stacks", "scale": "stacks"}


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class StackGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            parts = nodeid.split("/")
            group = _STACK_GROUPS.get(parts[1]) if len(parts) > 2 and parts[0] == "tests" else None
            return group or nodeid

    return StackGroups(config, log)


def _fault_lines(terminalreporter) -> list[str]:
    """The count lines of the fault and scale scenarios (tests/faults/harness.py `verify`), carried
    on each test's report, so the summary has them whichever worker ran the scenario."""
    lines = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) == "teardown":
                lines += [value for key, value in report.user_properties if key == "fault_line"]
    return lines


def pytest_terminal_summary(terminalreporter) -> None:
    lines = _fault_lines(terminalreporter)
    if lines:
        terminalreporter.section("fault injection")
        for line in lines:
            terminalreporter.write_line(line)
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
