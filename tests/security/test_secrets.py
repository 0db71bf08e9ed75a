"""API keys and webhook secrets are shown once and never again: not in any log record, and not in
clear in any database row (only the key's hash, the secret encrypted) (SPEC 2, 8)."""

import hashlib
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.management import call_command
from django.db import connection
from rest_framework.test import APIClient

from callbacks import http as callback_http
from callbacks.services import callback_deliver
from orders import crypto
from orders.models import Merchant, Order
from orders.services import merchant_rotate_api_key, merchant_rotate_webhook_secret
from tests.factories import make_paid
from tests.logs import console_output


class Endpoint:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                endpoint.bodies.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint(settings):
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = True
    callback_http._session.cache_clear()
    server = Endpoint()
    yield server
    server.close()
    callback_http._session.cache_clear()


def secret_forms(api_key: str, webhook_secret: str) -> list[str]:
    """The secrets as they could leak: whole, or their random part alone (after `sk_<prefix>_`)."""
    random_part = api_key.split("_", 2)[2]
    assert len(random_part) >= 40
    return [api_key, random_part, webhook_secret, webhook_secret.removeprefix("whsec_")]


@pytest.fixture
def log_output():
    """What the console handler writes, at every level."""
    with console_output(logging.DEBUG) as output:
        yield output


def redis_dump(client) -> str:
    """Every key and value of the test Redis database, as text."""
    parts = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            values = [client.get(key)]
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"hash":
            values = [item for pair in client.hgetall(key).items() for item in pair]
        elif kind in (b"set", b"zset"):
            values = client.zrange(key, 0, -1) if kind == b"zset" else list(client.smembers(key))
        else:
            values = []
        parts.append(key.decode(errors="replace"))
        parts.extend(v.decode(errors="replace") for v in values if v is not None)
    return "\n".join(parts)


@pytest.mark.django_db(transaction=True)
def test_keys_and_secrets_never_reach_a_log_line(endpoint, log_output):
    # given a merchant made with the management command (the one place the key is printed)
    out = io.StringIO()
    call_command("create_merchant", "acme", "--callback-url", endpoint.url, stdout=out)
    creds = json.loads(out.getvalue())
    api = APIClient(HTTP_AUTHORIZATION=f"Bearer {creds['api_key']}")
    # when the key is used, misused, and the secret signs a callback
    response = api.post(
        "/api/v1/orders",
        {"amount": 1000, "currency": "USD", "reference": "r-1"},
        format="json",
        HTTP_IDEMPOTENCY_KEY="k-1",
    )
    assert response.status_code == 201
    assert api.get(f"/api/v1/orders/{response.json()['id']}").status_code == 200
    wrong = APIClient(HTTP_AUTHORIZATION=f"Bearer {creds['api_key']}x")
    assert wrong.get("/api/v1/orders").status_code == 401
    order = Order.objects.get(pk=response.json()["id"])
    make_paid(order.pk)
    assert callback_deliver(order_id=order.pk) is True
    assert len(endpoint.bodies) == 1
    # and both are rotated (the new ones must not leak either)
    merchant = Merchant.objects.get(pk=creds["id"])
    new_key = merchant_rotate_api_key(merchant=merchant)
    new_secret = merchant_rotate_webhook_secret(merchant=merchant)
    # then no line, message, extra field or traceback carries any of them
    logged = log_output()
    for event in ("merchant.created", "order.created", "Unauthorized", "callback.delivered"):
        assert event in logged  # the calls above did log, through this handler
    for event in ("merchant.api_key_rotated", "merchant.webhook_secret_rotated"):
        assert event in logged
    for secret in secret_forms(creds["api_key"], creds["webhook_secret"]) + secret_forms(new_key, new_secret):
        assert secret not in logged


@pytest.mark.django_db(transaction=True)
def test_no_database_row_or_redis_value_holds_a_key_or_secret_in_clear(endpoint, redis_client):
    # given a merchant with a rotated key and secret, an order and a delivered callback
    out = io.StringIO()
    call_command("create_merchant", "acme", "--callback-url", endpoint.url, stdout=out)
    creds = json.loads(out.getvalue())
    merchant = Merchant.objects.get(pk=creds["id"])
    old_key, old_secret = creds["api_key"], creds["webhook_secret"]
    new_key = merchant_rotate_api_key(merchant=merchant)
    new_secret = merchant_rotate_webhook_secret(merchant=merchant)
    api = APIClient(HTTP_AUTHORIZATION=f"Bearer {new_key}")
    order_id = api.post(
        "/api/v1/orders",
        {"amount": 1000, "currency": "USD", "reference": "r-1"},
        format="json",
        HTTP_IDEMPOTENCY_KEY="k-1",
    ).json()["id"]
    make_paid(order_id)
    assert callback_deliver(order_id=order_id) is True
    # then the merchant row has the key's hash and the secrets encrypted
    merchant.refresh_from_db()
    assert merchant.api_key_hash == hashlib.sha256(new_key.encode()).hexdigest()
    assert crypto.decrypt(merchant.webhook_secret_encrypted) == new_secret
    assert crypto.decrypt(merchant.previous_webhook_secret_encrypted) == old_secret
    # and no row of any table, read as text, contains any of them
    with connection.cursor() as cursor:
        tables = connection.introspection.table_names(cursor)
        dump = []
        for table in tables:
            cursor.execute(f'SELECT t::text FROM "{table}" t')
            dump.extend(row[0] for row in cursor.fetchall())
    text = "\n".join(dump)
    assert creds["id"] in text  # the dump does see the merchant
    # nor any Redis value (the events published for the order, rate-limit counters, ...)
    cached = redis_dump(redis_client)
    assert order_id in cached  # the dump does see the order's events
    for secret in secret_forms(old_key, old_secret) + secret_forms(new_key, new_secret):
        assert secret not in text
        assert secret not in cached
