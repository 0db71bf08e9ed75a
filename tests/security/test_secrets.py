"""API keys and webhook secrets are shown once and never again: not in any log record, and not in
clear in any database row (only the key's hash, the secret encrypted) (SPEC 2, 8)."""

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection
from rest_framework.test import APIClient

from callbacks import http as callback_http
from callbacks.services import callback_deliver
from core import crypto
from orders.models import Merchant, Order
from orders.services import merchant_rotate_api_key, merchant_rotate_webhook_secret, merchant_signing_secrets
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
    for event in ("merchant.created", "order.created", "http.client_error", "callback.delivered"):
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


# --- settings fail closed (issue 10 item 9) --------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def _production_env(**overrides: str | None) -> dict[str, str]:
    """What a production process needs, with `overrides` (None removes a variable)."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "SECRET_KEY": "prod-" + "s" * 60,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "FIELD_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "METRICS_TOKEN": "metrics-token-1",
        "PUBLIC_BASE_URL": "https://pay.example",
        "SANDBOX_SECRET": "prod-sandbox-" + "x" * 20,
    }
    env.update(overrides)
    return {name: value for name, value in env.items() if value is not None}


def _python(args: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def production_host(tmp_path) -> Path:
    """This checkout as a production host holds it: the code without `.run/` (no embedded stack).

    manage.py is copied (Python would resolve a symlinked script back into this checkout); the
    rest are links.
    """
    for entry in REPO.iterdir():
        if entry.name == ".run":
            continue
        if entry.name == "manage.py":
            (tmp_path / entry.name).write_bytes(entry.read_bytes())
        else:
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


@pytest.mark.parametrize(
    "entry_point",
    [
        ["manage.py", "check"],
        ["-c", "import config.wsgi"],
        ["-c", "from config.celery_app import app; print(app.conf.broker_url)"],
    ],
    ids=["manage.py", "wsgi", "celery"],
)
def test_an_entry_point_without_a_settings_module_refuses_to_start_on_defaults(entry_point, production_host):
    # given a process on a production host started with no DJANGO_SETTINGS_MODULE and none of
    # production's secrets
    env = {"PATH": os.environ.get("PATH", "")}
    # when
    result = _python(entry_point, env, cwd=production_host)
    # then it is production's settings that load, and they refuse: no quiet development defaults
    assert result.returncode != 0, result.stdout
    assert "ImproperlyConfigured" in result.stderr, result.stderr[-2000:]
    assert "SECRET_KEY" in result.stderr


def test_manage_py_in_a_checkout_with_its_embedded_stack_runs_on_the_local_settings():
    # given this checkout, whose embedded stack (.run/pg) `make test` has made, and an
    # environment that names no settings (SPEC 2: `.venv/bin/python manage.py create_merchant NAME`)
    assert os.path.lexists(REPO / ".run" / "pg")
    probe = "from django.conf import settings; print(settings.SETTINGS_MODULE)"
    env = {"PATH": os.environ.get("PATH", "")}
    # when, then: the local settings (those of `make run` and `make up`)
    local = _python(["manage.py", "shell", "-c", probe], env)
    assert local.stdout.split()[-1:] == ["config.settings.local"], local.stderr[-2000:]
    # but an environment that holds a SECRET_KEY is a production one, and stays production
    production = _python(["manage.py", "shell", "-c", probe], _production_env(DJANGO_SETTINGS_MODULE=None))
    assert production.stdout.split()[-1:] == ["config.settings.production"], production.stderr[-2000:]


@pytest.mark.parametrize(
    "missing",
    ["SECRET_KEY", "DATABASE_URL", "REDIS_URL", "FIELD_ENCRYPTION_KEY", "PUBLIC_BASE_URL", "SANDBOX_SECRET"],
)
def test_production_refuses_to_start_without_each_required_variable(missing):
    result = _python(["-c", "import django; django.setup()"], _production_env(**{missing: None}))

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr, result.stderr[-2000:]
    assert missing in result.stderr


def test_production_refuses_a_field_encryption_key_that_is_not_a_fernet_key_without_echoing_it():
    result = _python(
        ["-c", "import django; django.setup()"], _production_env(FIELD_ENCRYPTION_KEY="not-a-real-key-42")
    )

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "not-a-real-key-42" not in result.stderr


_HTTPS_PROBE = """
import json, django
django.setup()
from django.test import Client
client = Client(HTTP_HOST="pay.example")  # PUBLIC_BASE_URL's host
answers = {}
for name, kwargs in (
    ("http", {}),
    ("http_claiming_https", {"HTTP_X_FORWARDED_PROTO": "https"}),
    ("https", {"secure": True}),
):
    r = client.get("/api/v1/orders", **kwargs)
    answers[name] = [r.status_code, r.get("Location"), r.get("Strict-Transport-Security")]
r = client.get("/healthz")
answers["healthz"] = [r.status_code, None, None]
answers["metrics"] = client.get("/metrics").status_code
answers["metrics_with_token"] = client.get("/metrics", HTTP_AUTHORIZATION="Bearer metrics-token-1").status_code
# a load balancer's and Prometheus's Host: the node's address
node = {"HTTP_HOST": "10.0.3.7:8000"}
answers["node_healthz"] = client.get("/healthz", **node).status_code
answers["node_readyz"] = client.get("/readyz", **node).status_code
answers["node_metrics"] = client.get("/metrics", HTTP_AUTHORIZATION="Bearer metrics-token-1", **node).status_code
answers["node_api"] = client.get("/api/v1/orders", secure=True, **node).status_code
answers["foreign_api"] = client.get("/api/v1/orders", secure=True, HTTP_HOST="evil.example").status_code
r = client.get("/admin/login/", secure=True)
answers["csrf_cookie_secure"] = bool(r.cookies["csrftoken"]["secure"])
print(json.dumps(answers))
"""


@pytest.mark.django_db
def test_production_serves_https_only_and_trusts_x_forwarded_proto_only_when_configured():
    # given production settings, not told to trust a proxy
    result = _python(["-c", _HTTPS_PROBE], _production_env())
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    # then plain HTTP is redirected to HTTPS, even when the client claims HTTPS itself
    assert answers["http"][:2] == [301, "https://pay.example/api/v1/orders"]
    assert answers["http_claiming_https"][:2] == [301, "https://pay.example/api/v1/orders"]
    # and over HTTPS the API answers, with HSTS, and cookies are HTTPS-only
    assert answers["https"][0] == 401
    assert "max-age=31536000" in answers["https"][2]
    assert answers["csrf_cookie_secure"] is True
    # and the probes stay reachable over plain HTTP from inside the network; /metrics with its token
    assert answers["healthz"][0] == 200
    assert answers["metrics"] == 401
    assert answers["metrics_with_token"] == 200
    # and they answer whatever Host a load balancer or Prometheus sends (its node's address), while
    # the API serves only PUBLIC_BASE_URL's host when ALLOWED_HOSTS is not set
    assert (answers["node_healthz"], answers["node_readyz"], answers["node_metrics"]) == (200, 200, 200)
    assert (answers["node_api"], answers["foreign_api"]) == (400, 400)

    # given a proxy of ours that sets X-Forwarded-Proto
    result = _python(["-c", _HTTPS_PROBE], _production_env(TRUST_X_FORWARDED_PROTO="true"))
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    # then its word is taken
    assert answers["http_claiming_https"][0] == 401
    assert answers["http"][0] == 301


def test_field_encryption_keys_rotate_first_encrypts_all_decrypt(settings):
    # given a secret stored under the old key
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.FIELD_ENCRYPTION_KEYS = [old]
    stored = crypto.encrypt("whsec_stored")
    # when a new key is put first
    settings.FIELD_ENCRYPTION_KEYS = [new, old]
    # then the stored secret still reads, and new ones are written under the new key
    assert crypto.decrypt(stored) == "whsec_stored"
    written = crypto.encrypt("whsec_new")
    rotated = crypto.rotate(stored)
    # and once everything is re-encrypted the old key can go
    settings.FIELD_ENCRYPTION_KEYS = [new]
    assert crypto.decrypt(written) == "whsec_new"
    assert crypto.decrypt(rotated) == "whsec_stored"
    with pytest.raises(InvalidToken):
        crypto.decrypt(stored)


def test_rotating_secret_key_leaves_stored_secrets_readable(settings):
    settings.FIELD_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    stored = crypto.encrypt("whsec_stored")

    settings.SECRET_KEY = "a-rotated-secret-key"

    assert crypto.decrypt(stored) == "whsec_stored"


def test_without_keys_where_they_are_required_nothing_is_encrypted_under_a_derived_key(settings):
    settings.FIELD_ENCRYPTION_KEYS = []
    settings.FIELD_ENCRYPTION_KEY_REQUIRED = True

    with pytest.raises(ImproperlyConfigured):
        crypto.encrypt("whsec_x")


@pytest.mark.django_db
def test_a_second_rotation_within_the_day_keeps_the_merchants_old_secret_signing():
    # given a merchant whose receiver knows its secret
    out = io.StringIO()
    call_command("create_merchant", "acme", stdout=out)
    creds = json.loads(out.getvalue())
    # when its secret is rotated twice within the day (a second click, a second operator)
    merchant_rotate_webhook_secret(merchant=Merchant.objects.get(pk=creds["id"]))
    second = merchant_rotate_webhook_secret(merchant=Merchant.objects.get(pk=creds["id"]))
    # then callbacks are signed with the newest and still with the one the receiver knows
    # (before: with the newest and the first rotation's, which nobody may have; the merchant's
    # receiver refused every callback at once)
    merchant = Merchant.objects.get(pk=creds["id"])
    assert merchant_signing_secrets(merchant=merchant) == [second, creds["webhook_secret"]]
