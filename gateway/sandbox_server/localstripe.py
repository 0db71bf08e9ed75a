"""Runs localstripe (PyPI), the stateful fake Stripe server, on loopback for `make run`, `up` and tests.

`python -m gateway.sandbox_server.localstripe` instead of the `localstripe` script, because the
script binds every interface (`::`), and keeps its whole store in `/tmp/localstripe.pickle`, one
file for every copy on the machine, rewritten after every write: two suites (or a suite and the
dev stack) would read each other's objects. Here the store lives in memory only, and our webhook
endpoint is registered at start, since localstripe forgets its endpoints when it stops.

Environment: LOCALSTRIPE_BIND (default 127.0.0.1:8420), PUBLIC_BASE_URL (where webhooks go),
SANDBOX_SECRET (the endpoint secret is derived from it, see secrets.py), LOCALSTRIPE_CHANNEL
(the channel code the endpoint is registered for, default `stripe-test`).
"""

import logging
import os

from aiohttp import web
from localstripe import resources, server, webhooks

from gateway.sandbox_server.secrets import STRIPE_WEBHOOK_EVENTS, stripe_endpoint_secret

WEBHOOK_PATH = "/api/v1/gateway/webhooks/stripe"


def _no_disk(self) -> None:
    """The store stays in memory (see the module's docstring)."""


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s localstripe %(levelname)s %(message)s")
    resources.Store.dump_to_disk = _no_disk
    resources.Store.try_load_from_disk = _no_disk
    host, _, port = os.environ.get("LOCALSTRIPE_BIND", "127.0.0.1:8420").rpartition(":")
    channel = os.environ.get("LOCALSTRIPE_CHANNEL", "stripe-test")
    base = os.environ.get("PUBLIC_BASE_URL") or "http://127.0.0.1:8000"
    webhooks.register_webhook(
        channel, base + WEBHOOK_PATH, stripe_endpoint_secret(channel), STRIPE_WEBHOOK_EVENTS
    )
    web.run_app(server.app, host=host or "127.0.0.1", port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
