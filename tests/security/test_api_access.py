"""Who may call what: API keys (missing, wrong, revoked), merchants kept apart, body size and
rate limits, and the admin for staff only (SPEC 3, 8)."""

import json
import time
import uuid

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from orders.models import Order
from orders.services import merchant_rotate_api_key
from tests.factories import make_merchant

ORDERS = "/api/v1/orders"
BODY = {"amount": 1050, "currency": "USD", "reference": "inv-1"}


def client_for(api_key: str | None = None, header: str | None = None) -> APIClient:
    client = APIClient()
    if header is not None:
        client.credentials(HTTP_AUTHORIZATION=header)
    elif api_key is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}")
    return client


def create(client: APIClient, reference: str = "inv-1", **extra):
    return client.post(
        ORDERS, {**BODY, "reference": reference, **extra}, format="json", HTTP_IDEMPOTENCY_KEY=reference
    )


def every_endpoint(order_id: str) -> list[tuple[str, str]]:
    return [
        ("get", ORDERS),
        ("post", ORDERS),
        ("get", f"{ORDERS}/{order_id}"),
        ("get", f"{ORDERS}/{order_id}/events"),
    ]


def call(client: APIClient, method: str, path: str):
    if method == "post":
        return client.post(path, BODY, format="json", HTTP_IDEMPOTENCY_KEY=str(uuid.uuid4()))
    return client.get(path)


@pytest.fixture
def order_of_a(db):
    creds = make_merchant()
    response = create(client_for(creds.api_key))
    assert response.status_code == 201
    return creds, response.json()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "header",
    [
        None,  # no Authorization header
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token sk_abc",
        "Bearer sk_000000000000_not-a-real-key",
        "Bearer not-even-our-format",
        "Bearer sk_\x00",
        "Bearer " + "sk_" + "a" * 300,
    ],
)
def test_missing_or_wrong_key_is_401_on_every_endpoint(order_of_a, header):
    # given
    _, order = order_of_a
    client = client_for(header=header) if header is not None else APIClient()
    count = Order.objects.count()
    # when / then
    for method, path in every_endpoint(order["id"]):
        response = call(client, method, path)
        assert response.status_code == 401, (method, path, response.content)
        assert response.json()["error"]["code"] == "unauthorized"
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert order["id"] not in response.content.decode()
    assert Order.objects.count() == count


@pytest.mark.django_db
def test_a_key_with_the_right_prefix_but_wrong_secret_is_401(order_of_a):
    creds, order = order_of_a
    prefix, _, secret = creds.api_key.rpartition("_")
    forged = f"{prefix}_{'x' * len(secret)}"
    for method, path in every_endpoint(order["id"]):
        assert call(client_for(forged), method, path).status_code == 401


@pytest.mark.django_db
def test_a_rotated_key_is_revoked_at_once_and_the_new_one_works(order_of_a):
    # given
    creds, order = order_of_a
    # when
    new_key = merchant_rotate_api_key(merchant=creds.merchant)
    # then
    for method, path in every_endpoint(order["id"]):
        assert call(client_for(creds.api_key), method, path).status_code == 401
    assert client_for(new_key).get(f"{ORDERS}/{order['id']}").status_code == 200


@pytest.mark.django_db
def test_a_deactivated_merchants_key_is_401_everywhere(order_of_a):
    # given a key that worked
    creds, order = order_of_a
    assert client_for(creds.api_key).get(f"{ORDERS}/{order['id']}").status_code == 200
    # when its merchant is deactivated
    creds.merchant.is_active = False
    creds.merchant.save(update_fields=["is_active"])
    # then
    count = Order.objects.count()
    for method, path in every_endpoint(order["id"]):
        response = call(client_for(creds.api_key), method, path)
        assert response.status_code == 401, (method, path)
        assert order["id"] not in response.content.decode()
    assert Order.objects.count() == count


@pytest.mark.django_db
def test_another_merchants_order_is_404_everywhere_and_never_listed(order_of_a):
    # given merchant A's order, and merchant B
    _, order = order_of_a
    b = client_for(make_merchant().api_key)
    # when B asks for it by id, for its events, by reference, or lists everything
    for path in (f"{ORDERS}/{order['id']}", f"{ORDERS}/{order['id']}/events"):
        response = b.get(path)
        # then: as if it did not exist, and nothing of it in the answer
        assert response.status_code == 404
        assert response.json() == {"error": {"code": "not_found", "message": "No such order.", "fields": {}}}
    for query in ("", "?reference=inv-1", f"?status={order['status']}"):
        response = b.get(f"{ORDERS}{query}")
        assert response.status_code == 200
        assert response.json()["results"] == []
    # and B reusing A's reference and Idempotency-Key gets an order of its own, not A's
    response = create(b, reference="inv-1")
    assert response.status_code == 201
    assert response.json()["id"] != order["id"]
    assert "Idempotent-Replayed" not in response


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["get", "head", "options", "post", "put", "patch", "delete"])
@pytest.mark.parametrize("suffix", ["", "/events"])
def test_another_merchants_order_answers_exactly_as_a_missing_one(order_of_a, method, suffix):
    # given merchant A's order, merchant B, and an id that exists nowhere
    _, order = order_of_a
    b = client_for(make_merchant().api_key)
    before = Order.objects.values().get(pk=order["id"])
    missing = str(uuid.uuid4())
    # when B tries any method on A's order, and on the missing one
    theirs = getattr(b, method)(f"{ORDERS}/{order['id']}{suffix}", {"amount": 1}, format="json")
    nobodys = getattr(b, method)(f"{ORDERS}/{missing}{suffix}", {"amount": 1}, format="json")
    # then B cannot tell them apart (status and body), nothing of A's order shows, nothing changed
    assert theirs.status_code in (200, 404, 405), theirs.content
    assert theirs.status_code == nobodys.status_code
    assert theirs.content.decode().replace(order["id"], missing) == nobodys.content.decode()
    for value in (order["id"], order["reference"], str(order["amount"])):
        assert value not in theirs.content.decode()
    if method == "get":
        assert theirs.status_code == 404
    assert Order.objects.values().get(pk=order["id"]) == before


@pytest.mark.django_db
def test_an_unknown_order_id_is_the_same_404_as_another_merchants(order_of_a):
    creds_a, _ = order_of_a
    a = client_for(creds_a.api_key)
    for order_id in (str(uuid.uuid4()), "not-a-uuid", "1 OR 1=1", "%00"):
        response = a.get(f"{ORDERS}/{order_id}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def body_of(size: int) -> str:
    """An order body of exactly `size` bytes (the description pads it)."""
    skeleton = json.dumps({**BODY, "description": ""})
    body = json.dumps({**BODY, "description": "x" * (size - len(skeleton))})
    assert len(body.encode()) == size
    return body


@pytest.mark.django_db
def test_a_body_over_64_kib_is_413_before_anything_reads_it(merchant_creds):
    client = client_for(merchant_creds.api_key)
    # exactly 64 KiB is read and validated (the description is too long: 400, not 413)
    response = client.post(
        ORDERS, body_of(64 * 1024), content_type="application/json", HTTP_IDEMPOTENCY_KEY="k"
    )
    assert response.status_code == 400
    assert "description" in response.json()["error"]["fields"]
    # one byte more is refused unread, whoever sends it: a merchant, anyone, or a provider webhook
    for client, path in (
        (client_for(merchant_creds.api_key), ORDERS),
        (APIClient(), ORDERS),
        (APIClient(), "/api/v1/gateway/webhooks/sandbox"),
    ):
        response = client.post(
            path, body_of(64 * 1024 + 1), content_type="application/json", HTTP_IDEMPOTENCY_KEY="k"
        )
        assert response.status_code == 413, path
        assert response.json()["error"]["code"] == "payload_too_large"
    assert Order.objects.count() == 0


@pytest.mark.django_db
def test_over_the_rate_limit_is_429_with_retry_after(merchant_creds, settings):
    # given a limit of 3 requests per second per key
    settings.API_RATE_LIMIT_PER_SECOND = 3
    client = client_for(merchant_creds.api_key)
    # when 12 come as fast as they can: reads, and creations each with a key of its own
    started = time.time()
    responses = [client.get(ORDERS) for _ in range(6)] + [
        create(client, reference=f"burst-{n}") for n in range(6)
    ]
    windows = int(time.time()) - int(started) + 1  # one-second windows the burst touched
    # then at most 3 per window passed, the rest were refused, and a refused create made nothing
    passed = [r for r in responses if r.status_code in (200, 201)]
    limited = [r for r in responses if r.status_code == 429]
    assert len(passed) + len(limited) == len(responses)
    assert limited
    assert len(passed) <= 3 * windows
    for response in limited:
        assert response.json()["error"]["code"] == "rate_limited"
        assert response["Retry-After"] == "1"  # the rest of the current one-second window
    assert Order.objects.count() == sum(r.status_code == 201 for r in responses)
    # and another merchant's key has its own budget
    assert client_for(make_merchant().api_key).get(ORDERS).status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path",
    [
        "/admin/",
        "/admin/dashboard/",
        "/admin/orders/order/",
        "/admin/orders/merchant/",
        "/admin/allocation/paymentchannel/",
        "/admin/callbacks/callbackdelivery/",
        "/admin/gateway/chargeattempt/",
        "/admin/gateway/providerwebhook/",
    ],
)
def test_admin_sends_anonymous_and_non_staff_to_the_login(client, path, merchant_creds):
    # anonymous, and anonymous with a merchant's API key (a key is not an admin login)
    for response in (
        client.get(path),
        client.get(path, HTTP_AUTHORIZATION=f"Bearer {merchant_creds.api_key}"),
    ):
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")
    # a logged-in user who is not staff
    User.objects.create_user("clerk", password="pw-123456789")
    client.login(username="clerk", password="pw-123456789")
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


@pytest.mark.django_db
def test_admin_opens_for_staff(client):
    # the refusals above are about who asks, not broken pages
    User.objects.create_superuser("ops", password="pw-123456789")
    client.login(username="ops", password="pw-123456789")
    for path in ("/admin/", "/admin/dashboard/", "/admin/orders/order/", "/admin/orders/merchant/"):
        assert client.get(path).status_code == 200, path


# --- /metrics (issue 10 item 10) -------------------------------------------------------------


@pytest.fixture
def metrics_in_production(settings):
    """/metrics as production settings have it: a token is required."""
    settings.METRICS_REQUIRE_TOKEN = True
    settings.METRICS_TOKEN = "scrape-token-1"
    return settings


@pytest.mark.django_db
@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong",
        "Bearer scrape-token-",
        "Bearer scrape-token-1x",
        "Basic scrape-token-1",
        "scrape-token-1",
        "Bearer scrape-token-1\xe9",
    ],
)
def test_metrics_in_production_answer_401_without_the_token(client, metrics_in_production, header):
    extra = {} if header is None else {"HTTP_AUTHORIZATION": header}

    response = client.get("/metrics", **extra)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"orders_open" not in response.content


@pytest.mark.django_db
def test_metrics_in_production_are_served_with_the_token(client, metrics_in_production):
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-token-1")

    assert response.status_code == 200
    assert b"orders_open" in response.content


@pytest.mark.django_db
def test_metrics_required_but_no_token_configured_serves_nobody(client, settings):
    settings.METRICS_REQUIRE_TOKEN = True
    settings.METRICS_TOKEN = ""

    for header in ("", "Bearer ", "Bearer"):
        assert client.get("/metrics", HTTP_AUTHORIZATION=header).status_code == 401


@pytest.mark.django_db
def test_metrics_database_counts_are_reused_for_a_few_seconds(client, settings, django_assert_num_queries):
    # given counts read by a first scrape, cached for a minute
    from console.metrics import database_counts

    settings.METRICS_DB_CACHE_SECONDS = 60
    database_counts.clear()
    first = client.get("/metrics")
    assert first.status_code == 200
    # when scrapes follow at once, even with an order more in the database
    create(client_for(make_merchant().api_key), reference="after-first-scrape")
    with django_assert_num_queries(0):
        again = client.get("/metrics")
    # then they answer from the cache
    assert _open_pending(again) == _open_pending(first)
    # and with the cache off the new order shows
    settings.METRICS_DB_CACHE_SECONDS = 0
    assert _open_pending(client.get("/metrics")) == _open_pending(first) + 1
    database_counts.clear()


def _open_pending(response) -> float:
    for line in response.content.decode().splitlines():
        if line.startswith('orders_open{status="pending"}'):
            return float(line.split()[-1])
    raise AssertionError("orders_open pending not in the scrape")


# --- unauthenticated traffic per client IP (issue 10 item 13) ---------------------------------


def _an_ip() -> str:
    # A fresh address per test: the one-second windows in Redis outlive a test.
    n = uuid.uuid4().int
    return f"198.18.{n % 250}.{(n >> 8) % 250 + 1}"


def _burst(send, n: int = 12) -> tuple[list, int]:
    started = time.time()
    responses = [send() for _ in range(n)]
    return responses, int(time.time()) - int(started) + 1  # one-second windows the burst touched


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["bad_key", "no_key", "forged_webhook", "admin_login"])
def test_failed_authentication_is_rate_limited_per_client_ip(client, settings, merchant_creds, kind):
    # given a limit of 3 failures per second per IP
    settings.UNAUTHENTICATED_RATE_LIMIT_PER_SECOND = 3
    ip = _an_ip()
    send = {
        "bad_key": lambda: client.get(
            ORDERS, HTTP_AUTHORIZATION="Bearer sk_000000000000_guess", REMOTE_ADDR=ip
        ),
        "no_key": lambda: client.get(ORDERS, REMOTE_ADDR=ip),
        "forged_webhook": lambda: client.post(
            "/api/v1/gateway/webhooks/sandbox",
            b'{"data": {"channel": "sandbox-a"}}',
            content_type="application/json",
            REMOTE_ADDR=ip,
        ),
        "admin_login": lambda: client.post(
            "/admin/login/", {"username": "ops", "password": "guess"}, REMOTE_ADDR=ip
        ),
    }[kind]
    # when failures come from one IP as fast as they can
    responses, windows = _burst(send)
    # then at most 3 per window were looked at, the rest refused before any work
    limited = [r for r in responses if r.status_code == 429]
    assert limited, [r.status_code for r in responses]
    assert len(responses) - len(limited) <= 3 * windows
    for response in limited:
        assert response.json()["error"]["code"] == "rate_limited"
        assert response["Retry-After"] == "1"
    # and another IP, and a merchant with a good key on the same IP, are not held back
    assert client.get(ORDERS, REMOTE_ADDR=_an_ip()).status_code == 401
    assert client_for(merchant_creds.api_key).get(ORDERS, REMOTE_ADDR=_an_ip()).status_code == 200


@pytest.mark.django_db
def test_good_keys_from_one_ip_are_not_counted_as_failures(settings, merchant_creds):
    settings.UNAUTHENTICATED_RATE_LIMIT_PER_SECOND = 3
    ip = _an_ip()
    client = client_for(merchant_creds.api_key)

    responses = [client.get(ORDERS, REMOTE_ADDR=ip) for _ in range(10)]

    assert [r.status_code for r in responses] == [200] * 10


@pytest.mark.django_db
def test_behind_trusted_proxies_the_client_ip_is_the_one_the_proxy_saw(client, settings):
    # given one proxy of ours in front: it appends the address it saw to X-Forwarded-For
    settings.UNAUTHENTICATED_RATE_LIMIT_PER_SECOND = 3
    settings.TRUSTED_PROXY_COUNT = 1
    attacker, bystander = _an_ip(), _an_ip()
    # when one client fails again and again, claiming a fresh address of its own each time
    responses, windows = _burst(
        lambda: client.get(ORDERS, REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR=f"{_an_ip()}, {attacker}")
    )
    # then it is limited by the address the proxy saw, and others behind the same proxy are not
    limited = [r for r in responses if r.status_code == 429]
    assert limited
    assert len(responses) - len(limited) <= 3 * windows
    assert client.get(ORDERS, REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR=bystander).status_code == 401
