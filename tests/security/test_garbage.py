"""Garbage on every endpoint, authenticated or not: bodies, headers, query strings, cursors, ids
(SPEC 3, 9). No answer is a 5xx; under /api/ every refusal is the JSON error shape.

Each test walks one endpoint through a list of hostile inputs and reports every input that broke
the rule at once, so a red run names them all. The requests go through Django's full stack
(middleware, URL resolver, views) in-process; raw WSGI values (latin-1 header strings, undecoded
query strings) are passed as a WSGI server would pass them.
"""

import base64
import json
import logging
import socket
import threading
import uuid

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection
from django.test import Client

from orders.models import Order
from tests.factories import OrderFactory, make_merchant

pytestmark = pytest.mark.django_db

ORDERS = "/api/v1/orders"
WEBHOOK = "/api/v1/gateway/webhooks/sandbox"
VALID = {"amount": 1050, "currency": "USD", "reference": "inv-1"}


def _nested(depth: int, opener: str = "[", closer: str = "]") -> bytes:
    return (opener * depth + "1" + closer * depth).encode()


# (label, content type, raw body)
BODIES = [
    ("empty", "application/json", b""),
    ("not json", "application/json", b"not json at all"),
    ("truncated", "application/json", b'{"amount": 1050, "currency": "US'),
    ("non-utf8", "application/json", b'{"reference": "\xff\xfe\xfa"}'),
    ("utf16 bom", "application/json", '{"amount": 1}'.encode("utf-16")),
    ("raw nul", "application/json", b"\x00" * 64),
    ("nul in json", "application/json", json.dumps({**VALID, "reference": "a\x00b"}).encode()),
    ("nul key", "application/json", json.dumps({**VALID, "metadata": {"\x00": "x"}}).encode()),
    ("nul channel", "application/json", b'{"data":{"channel":"\\u0000"}}'),
    ("lone surrogate", "application/json", b'{"amount":1050,"currency":"USD","reference":"\\ud800"}'),
    (
        "surrogate description",
        "application/json",
        b'{"amount":1050,"currency":"USD","reference":"s1","description":"\\ud800"}',
    ),
    (
        "surrogate metadata",
        "application/json",
        b'{"amount":1050,"currency":"USD","reference":"s2","metadata":{"a":"\\udfff"}}',
    ),
    (
        "surrogate metadata key",
        "application/json",
        b'{"amount":1050,"currency":"USD","reference":"s3","metadata":{"\\udfff":"a"}}',
    ),
    (
        "nul description",
        "application/json",
        b'{"amount":1050,"currency":"USD","reference":"s4","description":"\\u0000"}',
    ),
    (
        "nul metadata",
        "application/json",
        b'{"amount":1050,"currency":"USD","reference":"s5","metadata":{"a":"\\u0000"}}',
    ),
    ("surrogate currency", "application/json", b'{"amount":1050,"currency":"\\ud800SD","reference":"s6"}'),
    (
        "surrogate url",
        "application/json",
        b'{"amount":1050,"currency":"USD","reference":"s7","callback_url":"http://\\ud800.example/"}',
    ),
    ("surrogate key", "application/json", b'{"\\udfff": 1}'),
    ("open brackets", "application/json", b"[" * 5000),
    ("open braces", "application/json", b'{"a":' * 5000),
    ("deep array", "application/json", _nested(20000)),
    ("deep object", "application/json", ('{"a":' * 8000 + "1" + "}" * 8000).encode()),
    ("deep in data", "application/json", b'{"type":"charge.paid","data":' + _nested(10000) + b"}"),
    ("huge number", "application/json", b'{"amount": ' + b"9" * 5000 + b"}"),
    ("huge float", "application/json", b'{"amount": 1e400}'),
    ("nan", "application/json", b'{"amount": NaN, "currency": "USD", "reference": "x"}'),
    ("infinity", "application/json", b'{"amount": Infinity}'),
    ("top-level list", "application/json", b"[1, 2, 3]"),
    ("top-level string", "application/json", b'"hello"'),
    ("top-level number", "application/json", b"42"),
    ("null", "application/json", b"null"),
    ("true", "application/json", b"true"),
    (
        "wrong types",
        "application/json",
        json.dumps({"amount": "1050", "currency": 840, "reference": []}).encode(),
    ),
    ("nested types", "application/json", json.dumps({**VALID, "metadata": {"a": {"b": [1]}}}).encode()),
    ("metadata list", "application/json", json.dumps({**VALID, "metadata": [1, 2]}).encode()),
    ("bool amount", "application/json", json.dumps({**VALID, "amount": True}).encode()),
    ("big amount", "application/json", json.dumps({**VALID, "amount": 10**30}).encode()),
    ("bad url", "application/json", json.dumps({**VALID, "callback_url": "http://[::1"}).encode()),
    (
        "url port",
        "application/json",
        json.dumps({**VALID, "callback_url": "http://a.example:99999/"}).encode(),
    ),
    ("url nul", "application/json", json.dumps({**VALID, "callback_url": "http://a\x00.example/"}).encode()),
    ("url idna", "application/json", json.dumps({**VALID, "callback_url": "http://xn--a.example/"}).encode()),
    (
        "url long label",
        "application/json",
        json.dumps({**VALID, "callback_url": f"http://{'a' * 300}.example/"}).encode(),
    ),
    (
        "webhook shape",
        "application/json",
        json.dumps({"type": "charge.paid", "data": {"channel": ["x"]}}).encode(),
    ),
    (
        "webhook channel obj",
        "application/json",
        json.dumps({"type": 1, "data": {"channel": {"a": 1}}}).encode(),
    ),
    ("webhook long channel", "application/json", json.dumps({"data": {"channel": "c" * 60000}}).encode()),
    ("webhook data list", "application/json", json.dumps({"data": []}).encode()),
    ("just under limit", "application/json", json.dumps({**VALID, "description": "x" * 65000}).encode()),
    ("over limit", "application/json", b"{" + b" " * (64 * 1024) + b"}"),
    ("text/plain", "text/plain", b"amount=1050"),
    ("form", "application/x-www-form-urlencoded", b"amount=1050&currency=USD&reference=x"),
    ("form garbage", "application/x-www-form-urlencoded", b"%zz=%ff&&&=%00"),
    ("multipart garbage", "multipart/form-data; boundary=xx", b"--xx\r\ngarbage\r\n--xx--"),
    ("multipart no boundary", "multipart/form-data", b"garbage"),
    ("bad content type", "application/json; charset=nonsense", b"{}"),
    ("latin1 charset", "application/json; charset=latin-1", b'{"reference": "\xe9"}'),
    ("garbage content type", "\x00/\xff", b"{}"),
    ("xml", "application/xml", b"<order/>"),
]

# extra WSGI environ values, as a server hands them over (header values are latin-1 strings)
HEADERS = [
    ("huge authorization", {"HTTP_AUTHORIZATION": "Bearer " + "x" * 20000}),
    ("non-ascii authorization", {"HTTP_AUTHORIZATION": "Bearer sk_\xe9\xff"}),
    ("nul authorization", {"HTTP_AUTHORIZATION": "Bearer sk_\x00"}),
    ("bearer only", {"HTTP_AUTHORIZATION": "Bearer"}),
    ("lowercase bearer", {"HTTP_AUTHORIZATION": "bearer   sk_a b c"}),
    ("tab bearer", {"HTTP_AUTHORIZATION": "Bearer\tsk_abc"}),
    ("basic", {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"\xff:\x00").decode()}),
    ("basic garbage", {"HTTP_AUTHORIZATION": "Basic %%%"}),
    ("digest", {"HTTP_AUTHORIZATION": 'Digest username="x", realm="\xff"'}),
    ("prefix only key", {"HTTP_AUTHORIZATION": "Bearer sk_"}),
    ("prefix underscore key", {"HTTP_AUTHORIZATION": "Bearer sk__"}),
    ("long prefix key", {"HTTP_AUTHORIZATION": "Bearer sk_" + "a" * 190 + "_x"}),
    ("empty idempotency key", {"HTTP_IDEMPOTENCY_KEY": ""}),
    ("huge idempotency key", {"HTTP_IDEMPOTENCY_KEY": "k" * 20000}),
    ("non-ascii idempotency key", {"HTTP_IDEMPOTENCY_KEY": "cl\xe9\xff"}),
    ("nul idempotency key", {"HTTP_IDEMPOTENCY_KEY": "k\x00"}),
    ("control idempotency key", {"HTTP_IDEMPOTENCY_KEY": "\r\n\t"}),
    ("garbage request id", {"HTTP_X_REQUEST_ID": "\xff\x00" * 1000}),
    ("garbage content length", {"CONTENT_LENGTH": "abc"}),
    ("negative content length", {"CONTENT_LENGTH": "-1"}),
    ("huge content length", {"CONTENT_LENGTH": "9" * 40}),
    ("garbage accept", {"HTTP_ACCEPT": "\xff/\x00;q=banana"}),
    ("xml accept", {"HTTP_ACCEPT": "application/xml"}),
    ("garbage host", {"HTTP_HOST": "evil.example\xff:99999"}),
    ("garbage cookie", {"HTTP_COOKIE": "sessionid=\xff\x00; csrftoken=" + "x" * 5000}),
    ("forwarded proto", {"HTTP_X_FORWARDED_PROTO": "https\xff"}),
    ("forwarded for", {"HTTP_X_FORWARDED_FOR": "\xff, 999.1.1.1, ::::"}),
    ("remote addr", {"REMOTE_ADDR": "not-an-ip"}),
    (
        "webhook headers",
        {"HTTP_WEBHOOK_ID": "\xff", "HTTP_WEBHOOK_TIMESTAMP": "9" * 50, "HTTP_WEBHOOK_SIGNATURE": "v1,%%%"},
    ),
    (
        "webhook timestamp",
        {"HTTP_WEBHOOK_ID": "m", "HTTP_WEBHOOK_TIMESTAMP": "nan", "HTTP_WEBHOOK_SIGNATURE": "v1"},
    ),
    ("huge header", {"HTTP_X_PADDING": "p" * 60000}),
]

# raw QUERY_STRING values, undecoded as they arrive
QUERIES = [
    "status=%00",
    "status=garbage",
    "status=a&status=b",
    "outcome=%ff%fe",
    "reference=" + "r" * 5000,
    "reference=%00",
    "reference=%ed%a0%80",  # a lone surrogate, UTF-8 encoded
    "limit=-1",
    "limit=0",
    "limit=abc",
    "limit=" + "9" * 50,
    "limit=1e3",
    "created_after=garbage",
    "created_after=9999-99-99",
    "created_after=0001-01-01T00:00:00%2B14:00",
    "created_before=9999-12-31T23:59:59-14:00",
    "created_before=10000-01-01",
    "created_after=2020-01-01T00:00:00%00",
    "cursor=",
    "cursor=%00",
    "cursor=%ff",
    "cursor=" + "A" * 5000,
    "cursor=====",
    "%zz=%zz&&&===",
    "\xff\xfe=\x00",
    "a" * 10000,
    "=" * 100,
]


def _cursor(raw: str | bytes) -> str:
    return base64.b64encode(raw.encode() if isinstance(raw, str) else raw).decode()


# decodable cursors whose insides are forged (DRF's format: o=offset&r=reverse&p=position)
FORGED_CURSORS = [
    _cursor("p=garbage"),
    _cursor("o=0&r=0&p=garbage"),
    _cursor("p="),
    _cursor("p=%00"),
    _cursor("p=2020-13-45 00:00:00+00:00"),
    _cursor("p=2020-01-01 00:00:00"),
    _cursor("p=0001-01-01 00:00:00+14:00"),
    _cursor("p=9999-12-31 23:59:59-14:00"),
    _cursor("p=" + "9" * 5000),
    _cursor("r=1&p=garbage"),
    _cursor("r=" + "9" * 5000),
    _cursor("r=x"),
    _cursor("o=-1"),
    _cursor("o=" + "9" * 5000),
    _cursor("o=99999999"),
    _cursor("o=x"),
    _cursor("p=a&p=b"),
    _cursor(b"p=\xff\xfe"),
    _cursor("garbage"),
    _cursor(""),
    _cursor("&&&==="),
]


@pytest.fixture
def world(redis_client):
    """A merchant with an order, another merchant's order, the sandbox channels and a staff user."""
    call_command("seed_sandbox", stdout=open("/dev/null", "w"))
    creds = make_merchant()
    own = OrderFactory(merchant=creds.merchant)
    foreign = OrderFactory()
    User.objects.create_superuser("ops", password="pw-123456789")
    return {"key": creds.api_key, "own": str(own.pk), "foreign": str(foreign.pk)}


# (method, path template, is it an API path)
ENDPOINTS = [
    ("POST", ORDERS, True),
    ("GET", ORDERS, True),
    ("GET", ORDERS + "/{own}", True),
    ("GET", ORDERS + "/{own}/events", True),
    ("GET", ORDERS + "/{foreign}", True),
    ("POST", WEBHOOK, True),
    ("POST", "/api/v1/gateway/webhooks/nonexistent", True),
    ("GET", "/healthz", False),
    ("GET", "/readyz", False),
    ("GET", "/metrics", False),
    ("GET", "/admin/login/", False),
    ("POST", "/admin/login/", False),
]
WHO = ["anonymous", "merchant"]


def _with_who(endpoints: list) -> list:
    """Each endpoint as anonymous and as a merchant; the probes and the admin login, which no
    merchant key opens, once with a key they ignore (garbage Authorization is in HEADERS)."""
    cases = []
    for endpoint in endpoints:
        values = endpoint.values if hasattr(endpoint, "values") else endpoint
        marks = endpoint.marks if hasattr(endpoint, "marks") else ()
        for who in WHO if values[2] else ["merchant"]:
            cases.append(pytest.param(who, *values, marks=marks, id=f"{who}-{values[0]}-{values[1]}"))
    return cases


def _client(who: str, world) -> Client:
    client = Client(raise_request_exception=False)
    if who == "merchant":
        client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {world['key']}"
        client.defaults["HTTP_IDEMPOTENCY_KEY"] = str(uuid.uuid4())
    return client


def _problem(response, api: bool) -> str | None:
    """What is wrong with this answer, or None."""
    if response.status_code >= 500:
        return f"{response.status_code} {response.content[:200]!r}"
    if api and response.status_code >= 400 and response.request["REQUEST_METHOD"] != "HEAD":
        if not response.get("Content-Type", "").startswith("application/json"):
            return (
                f"{response.status_code} not JSON: {response.get('Content-Type')} {response.content[:100]!r}"
            )
        error = json.loads(response.content).get("error")
        # SPEC 3: {"error": {"code", "message", "fields"}}, `fields` an object even when empty
        if (
            not isinstance(error, dict)
            or not error.get("code")
            or not error.get("message")
            or not isinstance(error.get("fields"), dict)
        ):
            return f"{response.status_code} not the error shape: {response.content[:200]!r}"
    return None


def _check(label: str, response, api: bool, problems: list[str]) -> None:
    problem = _problem(response, api)
    if problem:
        problems.append(f"{label}: {problem}")


@pytest.mark.parametrize(("who", "method", "template", "api"), _with_who(ENDPOINTS))
def test_hostile_bodies_never_give_a_500(world, who, method, template, api):
    path = template.format(**world)
    problems: list[str] = []
    # endpoints that do not read a body get a sample: the parsing is the same code for all
    bodies = BODIES if method == "POST" else BODIES[::6]
    for label, content_type, body in bodies:
        client = _client(who, world)
        response = client.generic(method, path, body, content_type=content_type)
        _check(label, response, api, problems)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("who", "method", "template", "api"), _with_who(ENDPOINTS))
def test_hostile_headers_never_give_a_500(world, who, method, template, api):
    path = template.format(**world)
    body = json.dumps(VALID).encode() if method == "POST" else b""
    problems: list[str] = []
    for label, extra in HEADERS:
        client = _client(who, world)
        response = client.generic(method, path, body, content_type="application/json", **extra)
        _check(label, response, api, problems)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("who", "method", "template", "api"), _with_who(ENDPOINTS))
def test_hostile_query_strings_never_give_a_500(world, who, method, template, api):
    path = template.format(**world)
    problems: list[str] = []
    queries = QUERIES + [f"cursor={cursor}" for cursor in FORGED_CURSORS]
    # only the list reads its query string: the others get a sample
    for query in queries if (method, template) == ("GET", ORDERS) else queries[::5]:
        client = _client(who, world)
        response = client.generic(method, path, b"", QUERY_STRING=query)
        _check(repr(query[:80]), response, api, problems)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize(
    "method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "BREW"]
)
def test_hostile_methods_and_ids_never_give_a_500(world, who, method):
    problems: list[str] = []
    ids = ["x", "%00", "%ff", "0" * 5000, "00000000-0000-0000-0000-000000000000", "{" + world["own"] + "}"]
    paths = [(template.format(**world), api) for _, template, api in ENDPOINTS]
    paths += [(f"{ORDERS}/{bad}", True) for bad in ids] + [(f"{ORDERS}/{bad}/events", True) for bad in ids]
    paths += [("/api/v1/gateway/webhooks/" + "%ff" * 3, True), ("/api/v1/%00", True)]
    for path, api in paths:
        response = _client(who, world).generic(method, path, b"{}", content_type="application/json")
        _check(f"{method} {path[:80]}", response, api, problems)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cursor", FORGED_CURSORS)
def test_a_forged_but_decodable_cursor_is_a_400(world, cursor):
    # given a merchant with orders to page through
    client = _client("merchant", world)
    # when a cursor that decodes but was not written by us comes back
    response = client.get(ORDERS, {"cursor": cursor})
    # then it is refused as a bad filter, never a 500 and never someone's page
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "cursor" in error["fields"]


def test_a_real_cursor_still_pages_after_the_forged_ones_are_refused(world):
    # given three orders of the merchant and pages of one
    client = _client("merchant", world)
    key = world["key"]
    merchant = Order.objects.get(pk=world["own"]).merchant
    OrderFactory.create_batch(2, merchant=merchant)
    seen = []
    url = f"{ORDERS}?limit=1"
    # when the list is walked with the cursors the API hands out
    while url:
        response = client.get(url, HTTP_AUTHORIZATION=f"Bearer {key}")
        assert response.status_code == 200, response.content
        page = response.json()
        seen += [order["id"] for order in page["results"]]
        url = page["next"]
    # then every order was listed once
    assert len(seen) == 3 == len(set(seen))


@pytest.mark.django_db(transaction=True)  # the request runs on a thread: its own connection
def test_a_callback_host_whose_dns_never_answers_does_not_hold_the_request(
    merchant_creds, settings, monkeypatch
):
    # given the private-network check on, and a callback host whose name server never answers
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = False
    settings.CALLBACK_URL_RESOLVE_TIMEOUT_SECONDS = 0.2
    answer = threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "hangs.example":
            answer.wait(60)
            raise socket.gaierror("no answer")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    client = _client("merchant", {"key": merchant_creds.api_key})
    responses = []

    # when an order names that host
    def post() -> None:
        try:
            responses.append(
                client.post(
                    ORDERS,
                    {**VALID, "callback_url": "http://hangs.example/hook"},
                    content_type="application/json",
                )
            )
        finally:
            connection.close()

    request = threading.Thread(target=post)
    try:
        request.start()
        request.join(timeout=20)
        # then the request is answered while the lookup still hangs (delivery checks the host again)
        assert not request.is_alive(), "the request waited for the hung DNS lookup"
        assert not answer.is_set()
    finally:
        answer.set()
        request.join(timeout=60)
    assert responses[0].status_code == 201, responses[0].content


@pytest.mark.django_db
def test_a_foreign_host_is_a_json_400_and_one_log_line_without_a_traceback(caplog):
    # given a request for a Host this server does not serve (ALLOWED_HOSTS)
    caplog.set_level(logging.INFO)
    response = Client(raise_request_exception=False).get(ORDERS, HTTP_HOST="evil.example")
    # then the client gets the API's JSON 400
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"
    # and the log one warning naming the host, without Django's traceback (no log flood)
    (record,) = [r for r in caplog.records if r.name == "django.security.DisallowedHost"]
    # (the handlers' redaction renders a traceback into exc_text: neither may carry one)
    assert (record.levelname, record.exc_info, record.exc_text) == ("WARNING", None, None)
    assert "evil.example" in record.getMessage()
