"""A second stack moved by the README's port variables alone gets its own provider webhooks:
PUBLIC_BASE_URL, unset, follows WEB_BIND, in the product's settings and in the localstripe launcher
that registers the Stripe webhook endpoint (found by a soak on a second stack: both pointed at
http://127.0.0.1:8000, the first stack's web)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.sandbox_server.localstripe import public_base_url

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    ({"WEB_BIND": "127.0.0.1:47999"}, "http://127.0.0.1:47999"),
    ({"WEB_BIND": "0.0.0.0:8123"}, "http://127.0.0.1:8123"),  # a wildcard bind is reached on loopback
    ({"WEB_BIND": "unix:/run/web.sock"}, "http://127.0.0.1:8000"),
    ({}, "http://127.0.0.1:8000"),
    (
        {"WEB_BIND": "127.0.0.1:47999", "PUBLIC_BASE_URL": "https://pay.example.com"},
        "https://pay.example.com",
    ),
]


def settings_value(environ: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("WEB_BIND", "PUBLIC_BASE_URL")}
    env.update(environ, DJANGO_SETTINGS_MODULE="config.settings.local")
    code = "import django; django.setup(); from django.conf import settings; print(settings.PUBLIC_BASE_URL)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(("environ", "expected"), CASES)
def test_the_webhook_address_follows_the_webs_bind(environ, expected):
    assert settings_value(environ) == expected
    assert public_base_url(environ) == expected
