"""Runs localstripe (PyPI), the stateful fake Stripe server, on loopback for `make run`, `up` and tests.

`python -m gateway.sandbox_server.localstripe` instead of the `localstripe` script, because the
script binds every interface (`::`), and keeps its whole store in `/tmp/localstripe.pickle`, one
file for every copy on the machine, rewritten after every write: two suites (or a suite and the
dev stack) would read each other's objects. Here the store lives in memory only, and our webhook
endpoint is registered at start, since localstripe forgets its endpoints when it stops.

localstripe ignores `Idempotency-Key`: a create sent again after a lost answer made a second
PaymentIntent or Refund, where Stripe answers with the first request's result (a black-box audit
saw an order charged twice here). `idempotent` below answers as Stripe does: a POST under a key
already used with the same parameters gets the first answer again (`Idempotent-Replayed: true`),
with other parameters a 400 `idempotency_error`, while the first is still running a 409. Keys
belong to the account, not to one API key (localstripe is one account, any `sk_` key reads all of
it), so a channel's key rotated between a lost answer and the resend still gets the first answer.
A request refused before anything was made (400, 401, 403, 404) leaves its key unused, as on
Stripe. Keys are kept while the process runs (Stripe: 24 h).

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


_IN_PROGRESS = object()
_answered: dict[str, object] = {}  # Idempotency-Key -> (body, answer) or _IN_PROGRESS
# Refused before the endpoint made anything: Stripe saves no result under the key for these.
_NOTHING_MADE = frozenset({400, 401, 403, 404})


def _idempotency_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"type": "idempotency_error", "message": message}}, status=status)


@web.middleware
async def idempotent(request: web.Request, handler):
    key = request.headers.get("Idempotency-Key")
    if request.method != "POST" or not key:
        return await handler(request)
    body = await request.read()
    seen = _answered.get(key)
    if seen is _IN_PROGRESS:
        return _idempotency_error(409, "There is currently another in-progress request using this key.")
    if seen is not None:
        first_body, (status, content_type, payload) = seen
        if first_body != body:
            return _idempotency_error(
                400, "Keys for idempotent requests can only be used with the same parameters."
            )
        return web.Response(
            status=status, body=payload, content_type=content_type, headers={"Idempotent-Replayed": "true"}
        )
    _answered[key] = _IN_PROGRESS
    try:
        response = await handler(request)
    except BaseException:
        del _answered[key]
        raise
    if response.status in _NOTHING_MADE:
        del _answered[key]
    else:
        _answered[key] = (body, (response.status, response.content_type, response.body))
    return response


def public_base_url(environ) -> str:
    """Where the stack's web takes webhooks: PUBLIC_BASE_URL, else WEB_BIND's address, as the
    product's settings read it (this stand-in imports no product code)."""
    if environ.get("PUBLIC_BASE_URL"):
        return environ["PUBLIC_BASE_URL"]
    host, _, port = environ.get("WEB_BIND", "127.0.0.1:8000").rpartition(":")
    if not port.isdigit() or host.startswith("unix"):
        host, port = "127.0.0.1", "8000"
    if host in ("", "0.0.0.0", "[::]"):  # noqa: S104 - a wildcard bind, read as loopback
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s localstripe %(levelname)s %(message)s")
    resources.Store.dump_to_disk = _no_disk
    resources.Store.try_load_from_disk = _no_disk
    server.app.middlewares.insert(0, idempotent)
    host, _, port = os.environ.get("LOCALSTRIPE_BIND", "127.0.0.1:8420").rpartition(":")
    channel = os.environ.get("LOCALSTRIPE_CHANNEL", "stripe-test")
    base = public_base_url(os.environ)
    webhooks.register_webhook(
        channel, base + WEBHOOK_PATH, stripe_endpoint_secret(channel), STRIPE_WEBHOOK_EVENTS
    )
    web.run_app(server.app, host=host or "127.0.0.1", port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
