"""Reading orders (SPEC 3): detail, list, events, auth, isolation, errors, throttling, docs, probes."""

import time
import uuid
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.utils import timezone
from rest_framework.test import APIClient

from core.exception_handlers import api_exception_handler
from orders.models import Order, OrderStatus, Outcome
from orders.transitions import order_transition
from tests.factories import OrderFactory

pytestmark = pytest.mark.django_db

URL = "/api/v1/orders"
BODY = {"amount": 1050, "currency": "USD", "reference": "inv-2041"}


def _create(client, **overrides):
    body = {**BODY, **overrides}
    response = client.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY=f"key-{body['reference']}")
    assert response.status_code == 201, response.content
    return response.json()


def _assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


# --- detail -------------------------------------------------------------------------------


def test_detail_returns_the_order(api):
    created = _create(api)

    response = api.get(f"{URL}/{created['id']}")

    assert response.status_code == 200
    assert response.json() == created


@pytest.mark.parametrize(
    "order_id",
    [str(uuid.uuid4()), "not-a-uuid", "12345", "%00", "0" * 300],
    ids=["random-uuid", "word", "number", "nul", "long"],
)
def test_detail_of_an_unknown_id_is_404(api, order_id):
    response = api.get(f"{URL}/{order_id}")

    _assert_error(response, 404, "not_found")


def test_events_of_an_unknown_id_is_404(api):
    _assert_error(api.get(f"{URL}/{uuid.uuid4()}/events"), 404, "not_found")
    _assert_error(api.get(f"{URL}/not-a-uuid/events"), 404, "not_found")


# --- merchant isolation ------------------------------------------------------------------


def test_another_merchants_order_is_invisible_on_every_endpoint(api, other_api):
    # given
    theirs = _create(other_api, reference="theirs")
    mine = _create(api, reference="mine")
    # when / then: detail and events answer 404, exactly like an unknown id
    _assert_error(api.get(f"{URL}/{theirs['id']}"), 404, "not_found")
    _assert_error(api.get(f"{URL}/{theirs['id']}/events"), 404, "not_found")
    # and the list never shows it, whatever the filter
    listed = api.get(URL).json()["results"]
    assert [order["id"] for order in listed] == [mine["id"]]
    assert api.get(URL, {"reference": "theirs"}).json()["results"] == []
    # the owner still sees it
    assert other_api.get(f"{URL}/{theirs['id']}").status_code == 200


# --- authentication ----------------------------------------------------------------------

ENDPOINTS = [
    ("post", URL),
    ("get", URL),
    ("get", URL + "/{id}"),
    ("get", URL + "/{id}/events"),
]
BAD_AUTH = {
    "missing": None,
    "wrong-key": "Bearer sk_0123456789ab_notthekey",
    "unknown-prefix": "Bearer sk_ffffffffffff_x",
    "no-prefix": "Bearer not-a-key",
    "empty-bearer": "Bearer ",
    "scheme-only": "Bearer",
    "basic": "Basic dXNlcjpwYXNz",
    "token-scheme": "Token sk_abc",
    "too-long": "Bearer sk_" + "a" * 300,
    "nul-byte": "Bearer sk_0123\x00_x",
    "non-ascii": "Bearer sk_caf\u00e9_x",
}


@pytest.mark.parametrize("method,path", ENDPOINTS, ids=["create", "list", "detail", "events"])
@pytest.mark.parametrize("header", BAD_AUTH.values(), ids=BAD_AUTH.keys())
def test_missing_or_bad_authorization_is_401_on_every_endpoint(api, method, path, header):
    # given: an order that exists, so a 401 cannot be a 404 in disguise
    order = _create(api)
    client = APIClient()
    if header is not None:
        client.credentials(HTTP_AUTHORIZATION=header)
    # when
    response = getattr(client, method)(
        path.format(id=order["id"]),
        BODY if method == "post" else None,
        format="json",
        HTTP_IDEMPOTENCY_KEY="k",
    )
    # then
    _assert_error(response, 401, "unauthorized")
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert Order.objects.count() == 1


def test_a_rotated_key_stops_working(api, merchant_creds):
    from orders.services import merchant_rotate_api_key

    new_key = merchant_rotate_api_key(merchant=merchant_creds.merchant)

    _assert_error(api.get(URL), 401, "unauthorized")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {new_key}")
    assert client.get(URL).status_code == 200


def test_an_inactive_merchant_is_401(api, merchant_creds):
    merchant_creds.merchant.is_active = False
    merchant_creds.merchant.save(update_fields=["is_active"])

    _assert_error(api.get(URL), 401, "unauthorized")


# --- other errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path",
    [("delete", URL), ("put", URL), ("patch", URL), ("delete", URL + "/{id}"), ("post", URL + "/{id}")],
)
def test_unsupported_method_is_a_json_405(api, method, path):
    order = _create(api)

    response = getattr(api, method)(path.format(id=order["id"]))

    _assert_error(response, 405, "method_not_allowed")
    assert Order.objects.get().status == OrderStatus.PENDING


@pytest.mark.parametrize("path", ["/nope", "/api/v1/nope", "/api/v1/orders/", "/api/v2/orders"])
def test_unknown_url_is_a_json_404(api, path):
    _assert_error(api.get(path), 404, "not_found")


@pytest.mark.parametrize(
    ("path", "hint"),
    [
        ("/api/v1/orders/", "/api/v1/orders"),
        ("/api/v1/orders/01a22a48-b737-786c-a84c-0b2d41ca6738/events/", "/api/v1/orders/01a22a48-"),
        ("/api/v1/nope/", None),
    ],
)
def test_a_trailing_slash_on_an_api_path_is_a_404_that_says_so(api, path, hint):
    error = _assert_error(api.get(path), 404, "not_found")

    if hint:
        assert "no trailing slash" in error["message"] and hint in error["message"]
    else:
        assert "trailing slash" not in error["message"]


# --- list ---------------------------------------------------------------------------------


def _orders(merchant, count: int, **fields) -> list[Order]:
    """Orders with distinct creation times one minute apart, oldest first."""
    base = timezone.now() - timedelta(days=1)
    orders = []
    for i in range(count):
        order = OrderFactory(merchant=merchant, **fields)
        Order.objects.filter(pk=order.pk).update(created_at=base + timedelta(minutes=i))
        order.refresh_from_db()
        orders.append(order)
    return orders


def test_list_is_newest_first(api, merchant_creds):
    orders = _orders(merchant_creds.merchant, 5)

    response = api.get(URL)

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"results", "next", "previous"}
    assert [o["id"] for o in body["results"]] == [str(o.pk) for o in reversed(orders)]
    assert body["next"] is None
    assert body["previous"] is None


def test_list_pages_with_a_cursor(api, merchant_creds):
    # given
    orders = _orders(merchant_creds.merchant, 25)
    expected = [str(o.pk) for o in reversed(orders)]
    # when: walk forwards with `next`
    pages = [api.get(URL, {"limit": 10}).json()]
    while pages[-1]["next"]:
        assert len(pages) < 5, "pagination does not end"
        pages.append(api.get(pages[-1]["next"]).json())
    # then
    assert [len(page["results"]) for page in pages] == [10, 10, 5]
    seen = [o["id"] for page in pages for o in page["results"]]
    assert seen == expected
    assert len(set(seen)) == 25
    assert pages[0]["previous"] is None
    assert pages[2]["next"] is None
    assert parse_qs(urlsplit(pages[0]["next"]).query)["limit"] == ["10"]
    # and walk back with `previous`
    back = api.get(pages[2]["previous"]).json()
    assert [o["id"] for o in back["results"]] == expected[10:20]
    back = api.get(back["previous"]).json()
    assert [o["id"] for o in back["results"]] == expected[:10]
    assert back["previous"] is None


def test_new_orders_do_not_shift_a_page_being_walked(api, merchant_creds):
    # given: a client on page one
    orders = _orders(merchant_creds.merchant, 6)
    first = api.get(URL, {"limit": 3}).json()
    # when: a new order arrives before it asks for page two
    OrderFactory(merchant=merchant_creds.merchant)
    second = api.get(first["next"]).json()
    # then: page two continues where page one stopped
    assert [o["id"] for o in second["results"]] == [str(o.pk) for o in reversed(orders[:3])]


def test_list_filters_by_status_outcome_and_reference(api, merchant_creds):
    # given
    merchant = merchant_creds.merchant
    pending = OrderFactory(merchant=merchant, reference="a")
    paid = OrderFactory(merchant=merchant, reference="b", status=OrderStatus.PAID, outcome=Outcome.PAID)
    done_failed = OrderFactory(
        merchant=merchant, reference="c", status=OrderStatus.COMPLETED, outcome=Outcome.FAILED
    )
    done_paid = OrderFactory(
        merchant=merchant, reference="d", status=OrderStatus.COMPLETED, outcome=Outcome.PAID
    )

    def ids(**query) -> set[str]:
        response = api.get(URL, query)
        assert response.status_code == 200, response.content
        return {o["id"] for o in response.json()["results"]}

    # then
    assert ids(status="pending") == {str(pending.pk)}
    assert ids(status="completed") == {str(done_failed.pk), str(done_paid.pk)}
    assert ids(outcome="paid") == {str(paid.pk), str(done_paid.pk)}
    assert ids(outcome="failed") == {str(done_failed.pk)}
    assert ids(status="completed", outcome="paid") == {str(done_paid.pk)}
    assert ids(reference="c") == {str(done_failed.pk)}
    assert ids(reference="zzz") == set()
    assert ids(status="processing") == set()


def test_list_filters_by_creation_time(api, merchant_creds):
    # given: three orders created a minute apart
    old, middle, new = _orders(merchant_creds.merchant, 3)

    def ids(**query) -> list[str]:
        response = api.get(URL, query)
        assert response.status_code == 200, response.content
        return [o["id"] for o in response.json()["results"]]

    # then: created_after is inclusive, created_before exclusive
    assert ids(created_after=middle.created_at.isoformat()) == [str(new.pk), str(middle.pk)]
    assert ids(created_before=middle.created_at.isoformat()) == [str(old.pk)]
    assert ids(created_after=old.created_at.isoformat(), created_before=new.created_at.isoformat()) == [
        str(middle.pk),
        str(old.pk),
    ]
    assert ids(created_after=(new.created_at + timedelta(seconds=1)).isoformat()) == []


@pytest.mark.parametrize(
    "query",
    [
        {"status": "bogus"},
        {"status": "PENDING"},
        {"outcome": "completed"},
        {"created_after": "yesterday"},
        {"created_before": "2024-13-01T00:00:00Z"},
        {"created_after": "9999-12-31T23:59:59-05:00"},
        {"limit": "0"},
        {"limit": "abc"},
        {"limit": "-1"},
        {"limit": "101"},
        {"cursor": "garbage"},
        {"reference": "r" * 65},
        {"reference": "a\x00b"},
        # a parameter given twice: DRF would read the last copy and drop the other unseen
        {"limit": ["5", "30.0"]},
        {"status": ["paid", "failed"]},
    ],
    ids=lambda q: "-".join(f"{k}={v[:12]!r}" for k, v in q.items()),
)
def test_invalid_filter_value_is_400(api, query):
    response = api.get(URL, query)

    _assert_error(response, 400, "invalid_request")
    assert set(response.json()["error"]["fields"]) == set(query)


# --- events -------------------------------------------------------------------------------


def test_events_are_the_transitions_oldest_first(api):
    # given: an order created through the API and moved on twice
    order = _create(api)
    order_transition(
        order_id=order["id"], to="assigned", seen_status="pending", channel="sandbox-a", reason="allocated"
    )
    order_transition(
        order_id=order["id"],
        to="processing",
        seen_status="assigned",
        seen_channel="sandbox-a",
        reason="charge accepted",
    )
    # when
    response = api.get(f"{URL}/{order['id']}/events")
    # then
    assert response.status_code == 200
    events = response.json()
    assert [set(event) for event in events] == [{"from", "to", "at", "reason", "channel"}] * 3
    assert [(e["from"], e["to"], e["channel"]) for e in events] == [
        (None, "pending", None),
        ("pending", "assigned", "sandbox-a"),
        ("assigned", "processing", "sandbox-a"),
    ]
    assert [e["reason"] for e in events][1:] == ["allocated", "charge accepted"]
    assert events[0]["reason"]
    ats = [e["at"] for e in events]
    assert ats == sorted(ats)


# --- throttling ---------------------------------------------------------------------------


def _burst_until_limited(client, *, budget: int = 200) -> tuple[list, int]:
    """GETs as fast as they come until one is refused (or `budget` ran out): the responses and
    how many one-second windows the burst touched. The limiter counts per wall-clock second, so
    the burst may straddle a boundary; the checks below hold for any number of windows."""
    started = int(time.time())
    responses = []
    while len(responses) < budget:
        responses.append(client.get(URL))
        if responses[-1].status_code == 429:
            break
    return responses, int(time.time()) - started + 1


def test_requests_over_the_rate_limit_get_429_with_retry_after(api, other_api, settings, redis_client):
    # given
    settings.API_RATE_LIMIT_PER_SECOND = 3
    for key in redis_client.scan_iter("ratelimit:*"):
        redis_client.delete(key)
    # when
    responses, windows = _burst_until_limited(api)
    other = other_api.get(URL)
    # then: the first three pass whatever the windows, at most three per window pass, and the
    # burst ended with a refusal saying when to come back
    statuses = [r.status_code for r in responses]
    assert statuses[:3] == [200, 200, 200]
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) <= 3 * windows
    refused = responses[-1]
    _assert_error(refused, 429, "rate_limited")
    assert 1 <= int(refused["Retry-After"]) <= 2
    assert other.status_code == 200, "the limit is per API key"


def test_rate_limit_window_resets(api, settings, redis_client):
    settings.API_RATE_LIMIT_PER_SECOND = 2
    for key in redis_client.scan_iter("ratelimit:*"):
        redis_client.delete(key)
    responses, _ = _burst_until_limited(api)
    assert responses[-1].status_code == 429
    refused_in = int(time.time())  # the refusal's window, or an earlier one
    # when: the next request is counted in a later window (a wait for a condition, not a duration)
    while int(time.time()) <= refused_in:
        time.sleep(0.01)
    # then
    assert api.get(URL).status_code == 200


# --- docs and probes ----------------------------------------------------------------------


def test_openapi_schema_describes_the_order_api(client):
    response = client.get("/api/schema/", {"format": "json"})

    assert response.status_code == 200
    schema = response.json()
    assert {"/api/v1/orders", "/api/v1/orders/{order_id}", "/api/v1/orders/{order_id}/events"} <= set(
        schema["paths"]
    )
    assert {"get", "post"} <= set(schema["paths"]["/api/v1/orders"])
    request_body = schema["components"]["schemas"]["OrderCreateRequest"]["properties"]
    assert request_body["amount"]["type"] == "integer"
    # the headers a client acts on are declared where they are sent
    for path in ("/api/v1/orders", "/api/v1/orders/{order_id}/refunds"):
        created = schema["paths"][path]["post"]["responses"]["201"]
        assert created["headers"]["Idempotent-Replayed"]["schema"]["enum"] == ["true"]
    for operation in (schema["paths"]["/api/v1/orders"]["get"], schema["paths"]["/api/v1/orders"]["post"]):
        for code in ("429", "503"):
            assert "Retry-After" in operation["responses"][code]["headers"]
        assert "406" in operation["responses"]
    assert "headers" not in schema["paths"]["/readyz"]["get"]["responses"]["503"]
    # what is read back is typed as what was sent (before: metadata was only "readOnly")
    flat = {"type": "object", "additionalProperties": {"type": "string"}, "readOnly": True}
    for name in ("Order", "Refund"):
        assert schema["components"]["schemas"][name]["properties"]["metadata"] == flat
    # a merchant learns from the docs alone what its callback receiver gets and how to verify it
    about = schema["info"]["description"]
    for word in ("order.paid", "refund.failed", "webhook-signature", "whsec_", "standardwebhooks"):
        assert word in about


def test_api_docs_page_is_served(client):
    response = client.get("/api/docs/")

    assert response.status_code == 200
    assert b"swagger" in response.content.lower()


@pytest.mark.parametrize("value", ["xml", "html", "api", "csv", "%00", "x" * 300])
def test_a_format_no_renderer_has_is_a_406_saying_what_there_is(api, value):
    # given an order to read and to list
    order = _create(api)
    paths = [URL, f"{URL}/{order['id']}", f"{URL}/{order['id']}/events", f"{URL}/{order['id']}/refunds"]
    # when each is asked for in a format none of its renderers speaks, as are the schema and docs
    # (the docs page is HTML: `?format=html` is its own)
    docs = ["/api/docs/"] if value != "html" else []
    answers = {path: api.get(f"{path}?format={value}") for path in [*paths, "/api/schema/", *docs]}
    posted = api.post(
        f"{URL}?format={value}", {**BODY, "reference": "fmt"}, format="json", HTTP_IDEMPOTENCY_KEY="f"
    )
    # then each is a 406 in the error shape (DRF's own negotiation raised Http404: a 500), and the
    # API's say what there is without echoing the value
    for path, response in [*answers.items(), ("POST", posted)]:
        error = _assert_error(response, 406, "not_acceptable")
        assert error["fields"] == {} and value not in error["message"], (path, error)
        if path.startswith(URL) or path == "POST":
            assert "answered as" in error["message"], (path, error)
    assert "json" in answers[URL].json()["error"]["message"]
    # and the refused create made no order, so the same key then takes the body
    assert Order.objects.filter(reference="fmt").count() == 0
    assert (
        api.post(URL, {**BODY, "reference": "fmt"}, format="json", HTTP_IDEMPOTENCY_KEY="f").status_code
        == 201
    )
    # while the formats that exist still answer
    assert api.get(f"{URL}?format=json").status_code == 200
    assert api.get("/api/schema/?format=yaml").status_code == 200


def test_djangos_own_404_and_403_raised_in_a_view_are_answered_in_the_error_shape():
    # (what the unknown format raised before: the handler read a `detail` they do not have)
    for exc, status, code in [(Http404(), 404, "not_found"), (PermissionDenied(), 403, "forbidden")]:
        response = api_exception_handler(exc, {})
        assert response.status_code == status
        assert response.data["error"]["code"] == code and response.data["error"]["fields"] == {}


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "BREW"])
def test_a_probe_answers_another_method_with_a_json_405(client, path, method):
    response = client.generic(method, path, b"{}", content_type="application/json")

    _assert_error(response, 405, "method_not_allowed")
    assert response["Allow"] == "GET, HEAD"


def test_healthz(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_readyz_checks_database_and_redis(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


def test_metrics_are_served_as_prometheus_text(client):
    response = client.get("/metrics")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert b"# TYPE" in response.content


# --- query counts on the hot paths ---------------------------------------------------------

# Create: merchant lookup, claim the key, savepoint, one statement inserting the order, its
# transition and outbox event and storing the answer on the key, release savepoint. The
# savepoint pair is the test's own transaction showing through; in production it is BEGIN/COMMIT.
CREATE_QUERIES = 5


def test_create_query_count_is_pinned(api, django_assert_max_num_queries):
    with django_assert_max_num_queries(CREATE_QUERIES):
        response = api.post(URL, BODY, format="json", HTTP_IDEMPOTENCY_KEY="pinned")

    assert response.status_code == 201, response.content


def test_replay_query_count_is_pinned(api, django_assert_max_num_queries):
    api.post(URL, BODY, format="json", HTTP_IDEMPOTENCY_KEY="pinned")

    # merchant, the failed claim, the stored key
    with django_assert_max_num_queries(3):
        response = api.post(URL, BODY, format="json", HTTP_IDEMPOTENCY_KEY="pinned")

    assert response["Idempotent-Replayed"] == "true"


def test_read_query_counts_are_pinned(api, merchant_creds, django_assert_max_num_queries):
    orders = _orders(merchant_creds.merchant, 30)

    # merchant + one page query, whatever the page size
    with django_assert_max_num_queries(2):
        assert len(api.get(URL, {"limit": 25}).json()["results"]) == 25
    with django_assert_max_num_queries(2):
        assert api.get(f"{URL}/{orders[0].pk}").status_code == 200
    with django_assert_max_num_queries(3):
        assert api.get(f"{URL}/{orders[0].pk}/events").status_code == 200
