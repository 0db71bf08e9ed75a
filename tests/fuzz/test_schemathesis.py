"""The HTTP surface fuzzed from its own OpenAPI document (schemathesis over the WSGI app, in-process).

Every operation of /api/schema/ gets generated requests, valid and invalid: the order API with a
real merchant's Bearer key, the provider webhook endpoint and the probes (/healthz, /readyz,
/metrics; config/openapi.py describes them) without one. No answer is a 5xx, and every answer
conforms to the schema (documented status code, content type, headers, body); where the schema
states the whole rule, a request that breaks it is refused (negative checks: the list and create).
The list's cursor is fuzzed with decodable forgeries and real cursors, not only random text. At
least 1000 requests are sent in all, counted as they are made.

Reproducible, and still new cases per commit: the seed comes from the git commit (FUZZ_SEED
overrides it to replay a failure), and is printed in the summary and on every failure. No
example database. Most of the budget goes to the operations with rich inputs (create and list);
those that take a bare id get fewer examples, part of them on a real order of the merchant's own
(200) or of another merchant's (404). Each operation runs inside one rolled-back transaction
(`db`), not a flush per example.
"""

import base64
import contextlib
import hashlib
import os
import re
from collections import Counter
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import schemathesis
from django.core.management import call_command
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from config.wsgi import application
from orders.serializers import CURRENCY_CODES
from tests.factories import OrderFactory, make_merchant
from tests.seeds import commit_hash


def _seed() -> int:
    """FUZZ_SEED, else the commit under test: new cases per commit, the same ones for a commit."""
    if os.environ.get("FUZZ_SEED"):
        return int(os.environ["FUZZ_SEED"])
    commit = commit_hash()
    return int(commit[:12], 16) if commit else 20261130  # no git (a source tarball): a fixed seed


SEED = _seed()

schema = schemathesis.openapi.from_wsgi("/api/schema/", application)
schema.config.seed = SEED
schema.config.generation.update(
    # Unknown query parameters are ignored, as most APIs do (SPEC 3 rejects unknown body fields only).
    allow_extra_parameters=False,
    # The Bearer key is ours, sent on every case; what a missing or wrong key does is tests/security's.
    with_security_parameters=False,
)

MIN_CASES = 1000
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
PUBLIC_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def create_negative_data_rejection(ctx, response, case):
    """negative_data_rejection for the order body, but for the two rules the API takes wider
    than the schema can say: the currency and the URL scheme in any case (SPEC 3)."""
    body = case.body if isinstance(case.body, dict) else {}
    currency, url = body.get("currency"), body.get("callback_url")
    if isinstance(currency, str) and currency.upper() in CURRENCY_CODES and currency != currency.upper():
        return None
    if isinstance(url, str) and re.match(r"(?i)https?://", url) and not re.match(r"https?://", url):
        return None
    return negative_data_rejection(ctx, response, case)


# Where the schema states the whole rule, a request that breaks it must be refused: the list's
# enums, ranges and date-times, and the order body (types, ranges, lengths, unknown fields).
NEGATIVE_CHECKS = {
    "GET /api/v1/orders": negative_data_rejection,
    "POST /api/v1/orders": create_negative_data_rejection,
}
VALID_KEY = re.compile(r"[\x20-\x7e]{1,255}")
SUPPRESSED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much]


def fuzz_settings(max_examples: int) -> settings:
    # explicit: the schema's examples and schemathesis' coverage cases (boundaries, missing
    # parameters); generate: random cases; shrink: only ever runs on a failure.
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=False,  # the seed (SEED) decides: reproducible per commit
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=SUPPRESSED,
    )


calls: list[str] = []
known_orders: dict[str, str] = {}
known_cursors: list[str] = []


@pytest.fixture
def api_key(db):
    """A merchant with one order of its own, next to another merchant's order."""
    creds = make_merchant()
    for name, key in (("own", creds.api_key), ("foreign", make_merchant().api_key)):
        response = APIClient(HTTP_AUTHORIZATION=f"Bearer {key}").post(
            "/api/v1/orders",
            {"amount": 1050, "currency": "USD", "reference": f"fuzz-{name}"},
            format="json",
            HTTP_IDEMPOTENCY_KEY=f"fuzz-{name}",
        )
        assert response.status_code == 201
        known_orders[name] = response.json()["id"]
    # a real cursor of the merchant's list, for the fuzzer to mix in
    OrderFactory.create_batch(2, merchant=creds.merchant)
    page = APIClient(HTTP_AUTHORIZATION=f"Bearer {creds.api_key}").get("/api/v1/orders", {"limit": 1}).json()
    known_cursors.append(parse_qs(urlsplit(page["next"]).query)["cursor"][0])
    with _connection_kept_across_requests():
        try:
            yield creds.api_key
        finally:
            known_orders.clear()
            known_cursors.clear()


@contextlib.contextmanager
def _connection_kept_across_requests():
    # As Django's test client does around each request (so only after the setup requests): the
    # start and end of a request must not close the connection that holds the test's
    # transaction, and schemathesis calls the WSGI app directly.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@schema.hook
def flatmap_path_parameters(context, path_parameters):
    # A generated provider is almost never one we have; name real ones part of the time (the
    # sandbox keeps the half it had, Stripe gets a quarter).
    if "provider" in (path_parameters or {}):
        sandbox = {**path_parameters, "provider": "sandbox"}
        return st.sampled_from([path_parameters, sandbox, sandbox, {**path_parameters, "provider": "stripe"}])
    # A generated id is almost never an existing order; swap in real ones part of the time.
    if "order_id" not in (path_parameters or {}) or not known_orders:
        return st.just(path_parameters)
    return st.sampled_from(
        [
            path_parameters,
            path_parameters,
            {**path_parameters, "order_id": known_orders["own"]},
            {**path_parameters, "order_id": known_orders["foreign"]},
        ]
    )


@schema.hook
def map_case(context, case):
    # Generated Idempotency-Keys repeat a lot (" ", "0"), so most bodies would meet a key used
    # before with another body (422). For half of the bodies, a valid key gets a suffix derived
    # from the body: creation is reached, and the same body again is a replay. The other half
    # keep their key as generated, so reuse with another body is fuzzed too.
    key = (case.headers or {}).get("Idempotency-Key")
    if case.method != "POST" or not isinstance(key, str) or not VALID_KEY.fullmatch(key):
        return case
    digest = hashlib.sha256(repr(case.body).encode()).hexdigest()
    if int(digest[0], 16) % 2:
        case.headers["Idempotency-Key"] = f"{key[:238]}-{digest[:16]}"
    return case


_TOKEN_TEXT = st.text(max_size=40)
# What DRF's cursor holds (o=offset, r=reverse, p=position), forged: decodable, with made-up values,
# sometimes with a made-up signature the way ours are signed.
FORGED_CURSORS = st.builds(
    lambda tokens, signature: (
        base64.urlsafe_b64encode(urlencode(tokens).encode()).decode()
        + (f":{signature}" if signature is not None else "")
    ),
    st.dictionaries(st.sampled_from(["o", "r", "p"]), st.one_of(_TOKEN_TEXT, st.integers().map(str))),
    st.none()
    | st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", max_size=43),
)


WEBHOOKS = "POST /api/v1/gateway/webhooks/{provider}"
# A generated `data.channel` rarely has a channel code's shape, and then the body is refused as
# unreadable (400) before any signature is looked at; name a seeded channel and a well-formed
# unknown one part of the time, so the signature check (401) is reached whatever the seed.
WEBHOOK_CHANNELS = st.sampled_from([None, "sandbox-a", "no-such-channel"])


def _with_channel(case, channel):
    if channel is not None:
        data = case.body.get("data")
        case.body = {**case.body, "data": {**(data if isinstance(data, dict) else {}), "channel": channel}}
    return case


@schema.hook
def flatmap_case(context, case):
    # Random text almost never decodes as a cursor: for positive list cases, mix in forged
    # decodable ones (400) and a real one (200). Negative cases keep what they were made with.
    if case.meta.generation.mode.is_negative:
        return st.just(case)
    if case.operation.label == WEBHOOKS:
        if isinstance(case.body, dict):
            return WEBHOOK_CHANNELS.map(lambda channel: _with_channel(case, channel))
        return st.just(case)
    if case.operation.label != "GET /api/v1/orders" or not known_cursors:
        return st.just(case)

    def with_cursor(cursor):
        if cursor is not None:
            case.query = {**(case.query or {}), "cursor": cursor}
        return case

    return st.one_of(st.none(), FORGED_CURSORS, st.sampled_from(known_cursors)).map(with_cursor)


def run(case, api_key: str | None, checks=CHECKS) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    response = case.call(headers=headers)
    calls.append(f"{case.operation.label} -> {response.status_code}")
    negative = NEGATIVE_CHECKS.get(case.operation.label)
    try:
        case.validate_response(response, checks=checks + ([negative] if negative else []))
    except BaseException as exc:
        exc.add_note(f"schemathesis seed {SEED}: replay with FUZZ_SEED={SEED}")
        raise


@schema.include(path="/api/v1/orders").parametrize()
@fuzz_settings(max_examples=300)
def test_create_and_list_conform_to_the_schema(case, api_key):
    run(case, api_key)


@schema.include(path_regex=r"\{order_id\}").parametrize()
@fuzz_settings(max_examples=120)
def test_order_and_events_conform_to_the_schema(case, api_key):
    run(case, api_key)


@pytest.fixture
def channels(db):
    call_command("seed_sandbox", stdout=open(os.devnull, "w"))
    with _connection_kept_across_requests():
        yield


@pytest.fixture
def probes(db):
    with _connection_kept_across_requests():
        yield


@schema.include(path_regex=r"/webhooks/").parametrize()
@fuzz_settings(max_examples=150)
def test_provider_webhooks_conform_to_the_schema(case, channels):
    # The providers' endpoint is public: no key; most cases name a real provider.
    run(case, None, PUBLIC_CHECKS)


@schema.include(path_regex=r"^/(healthz|readyz|metrics)$").parametrize()
@fuzz_settings(max_examples=25)
def test_probes_conform_to_the_schema(case, probes):
    run(case, None, PUBLIC_CHECKS)


def test_enough_cases_were_sent():
    # Runs after the parametrized tests above (same module, file order).
    if not calls:
        pytest.skip("the fuzz tests themselves were not selected")
    counts = dict(sorted(Counter(calls).items()))
    print(f"schemathesis seed={SEED} (replay: FUZZ_SEED={SEED}) calls={len(calls)} {counts}")
    assert len(calls) >= MIN_CASES, counts
    # The budget reached past validation: orders were created, listed and read back.
    for reached in (
        "POST /api/v1/orders -> 201",
        "GET /api/v1/orders -> 200",
        "GET /api/v1/orders/{order_id} -> 200",
        "GET /api/v1/orders/{order_id} -> 404",
        "GET /api/v1/orders/{order_id}/events -> 200",
        "GET /api/v1/orders -> 400",
        "POST /api/v1/gateway/webhooks/{provider} -> 401",
        "GET /healthz -> 200",
        "GET /readyz -> 200",
        "GET /metrics -> 200",
    ):
        assert counts.get(reached, 0) > 0, reached
