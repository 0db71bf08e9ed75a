"""The order API fuzzed from its own OpenAPI document (schemathesis over the WSGI app, in-process).

Every operation of /api/schema/ gets generated requests, valid and invalid, with a real merchant's
Bearer key: no answer is a 5xx, and every answer conforms to the schema (documented status code,
content type, headers, body). At least 1000 requests are sent in all, counted as they are made.

Reproducible and bounded for CI: derandomized (the same cases on every run), no example database,
and most of the budget goes to the operations with rich inputs (create and list); the two that
take a bare id get fewer examples, part of them on a real order of the merchant's own (200) or of
another merchant's (404). Each operation runs inside one rolled-back transaction (`db`), not a
flush per example.
"""

import hashlib
import re
from collections import Counter

import pytest
import schemathesis
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
from tests.factories import make_merchant

schema = schemathesis.openapi.from_wsgi("/api/schema/", application)
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
# Where the schema states the whole rule (enums, ranges, date-times of the list filters), a
# request that breaks it must be refused. The order body's rules go further than a schema can
# say (ISO 4217 in any case, printable text, 4 KiB of metadata), so there the API decides.
STRICT_OPERATIONS = {"GET /api/v1/orders"}
VALID_KEY = re.compile(r"[\x20-\x7e]{1,255}")
SUPPRESSED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much]


def fuzz_settings(max_examples: int) -> settings:
    # explicit: the schema's examples and schemathesis' coverage cases (boundaries, missing
    # parameters); generate: random cases; shrink: only ever runs on a failure.
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=SUPPRESSED,
    )


calls: list[str] = []
known_orders: dict[str, str] = {}


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
    # As Django's test client does around each request (so only after the ones above): the
    # start and end of a request must not close the connection that holds the test's
    # transaction, and schemathesis calls the WSGI app directly.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield creds.api_key
    finally:
        known_orders.clear()
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@schema.hook
def flatmap_path_parameters(context, path_parameters):
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


def run(case, api_key: str) -> None:
    response = case.call(headers={"Authorization": f"Bearer {api_key}"})
    calls.append(f"{case.operation.label} -> {response.status_code}")
    strict = case.operation.label in STRICT_OPERATIONS
    case.validate_response(response, checks=CHECKS + ([negative_data_rejection] if strict else []))


@schema.include(path="/api/v1/orders").parametrize()
@fuzz_settings(max_examples=300)
def test_create_and_list_conform_to_the_schema(case, api_key):
    run(case, api_key)


@schema.include(path_regex=r"\{order_id\}").parametrize()
@fuzz_settings(max_examples=120)
def test_order_and_events_conform_to_the_schema(case, api_key):
    run(case, api_key)


def test_enough_cases_were_sent():
    # Runs after the parametrized tests above (same module, file order).
    if not calls:
        pytest.skip("the fuzz tests themselves were not selected")
    counts = dict(sorted(Counter(calls).items()))
    print(f"schemathesis calls={len(calls)} {counts}")
    assert len(calls) >= MIN_CASES, counts
    # The budget reached past validation: orders were created, listed and read back.
    for reached in (
        "POST /api/v1/orders -> 201",
        "GET /api/v1/orders -> 200",
        "GET /api/v1/orders/{order_id} -> 200",
        "GET /api/v1/orders/{order_id} -> 404",
        "GET /api/v1/orders/{order_id}/events -> 200",
    ):
        assert counts.get(reached, 0) > 0, reached
