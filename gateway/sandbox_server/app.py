"""WSGI app of the sandbox provider: charges and refunds, status queries, ledgers, amount-driven outcomes."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from .dispatcher import Dispatcher
from .store import DEFAULT_DATABASE_URL, ChargeRow, NewWebhook, RefundRow, Store

log = logging.getLogger("sandbox.app")

MAX_BODY_BYTES = 64 * 1024
MAX_KEY_LENGTH = 255
MAX_FIELD_LENGTH = 200
MAX_URL_LENGTH = 2048
MAX_AMOUNT = 2**63 - 1
# The 81 sequence: three `paid` deliveries then a late `failed`, due this far apart from each other.
SEQUENCE_SPACING = timedelta(milliseconds=100)

StartResponse = Callable[..., Any]


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


@dataclass(frozen=True)
class Config:
    """Settings read once per process from the environment."""

    database_url: str
    webhook_delay: float
    slow_seconds: float
    threads: int
    webhook_senders: int

    @classmethod
    def from_env(cls) -> Config:
        return cls(
            database_url=os.environ.get("SANDBOX_DATABASE_URL") or DEFAULT_DATABASE_URL,
            webhook_delay=_env_float("SANDBOX_WEBHOOK_DELAY", 0.5),
            slow_seconds=_env_float("SANDBOX_SLOW_SECONDS", 8.0),
            threads=_env_int("SANDBOX_THREADS", 16),
            webhook_senders=_env_int("SANDBOX_WEBHOOK_SENDERS", 16),
        )


# --- per-process state ---------------------------------------------------------------------------------
# Created lazily and keyed by pid: a pool or thread created before a fork must never be used in the child.

_state_lock = threading.Lock()
_state_pid: int | None = None
_config: Config | None = None
_store: Store | None = None
_dispatcher: Dispatcher | None = None


def start_background() -> None:
    """Open the pool, create the schema and start this process's webhook dispatcher (idempotent)."""
    global _state_pid, _config, _store, _dispatcher
    pid = os.getpid()
    if _state_pid == pid:
        return
    with _state_lock:
        if _state_pid == pid:
            return
        config = Config.from_env()
        # Request threads plus the dispatcher loop plus a little slack for health checks.
        store = Store(config.database_url, maxconn=config.threads + 4)
        dispatcher = Dispatcher(store, senders=config.webhook_senders)
        dispatcher.start()
        _config, _store, _dispatcher = config, store, dispatcher
        _state_pid = pid
        log.info(
            "sandbox worker %d ready (webhook delay %.3f s, slow %.1f s)",
            pid,
            config.webhook_delay,
            config.slow_seconds,
        )


def stop_background() -> None:
    """Stop the dispatcher and close the pool of this process (gunicorn worker_exit)."""
    global _state_pid, _store, _dispatcher
    with _state_lock:
        if _state_pid != os.getpid():
            return
        if _dispatcher is not None:
            _dispatcher.stop()
        if _store is not None:
            _store.close()
        _state_pid, _store, _dispatcher = None, None, None


# --- outcomes ------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answer: HTTP status plus the `{"error": {...}}` body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Outcome:
    """What the sandbox does with an accepted charge, chosen by amount % 100 (SPEC 5)."""

    final_status: str
    failure_code: str | None
    # Webhook events to send, in order: (event type, status in data, failure_code in data).
    webhooks: tuple[tuple[str, str, str | None], ...]
    slow: bool = False


_PAID = ("charge.paid", "paid", None)
OUTCOMES: dict[int, Outcome] = {
    51: Outcome("failed", "card_declined", (("charge.failed", "failed", "card_declined"),)),
    52: Outcome("failed", "insufficient_funds", (("charge.failed", "failed", "insufficient_funds"),)),
    61: Outcome("paid", None, ()),
    62: Outcome("paid", None, (_PAID,), slow=True),
    81: Outcome("paid", None, (_PAID, _PAID, _PAID, ("charge.failed", "failed", "card_declined"))),
}
DEFAULT_OUTCOME = Outcome("paid", None, (_PAID,))
ALWAYS_UNAVAILABLE = 72
FIRST_CHANNEL_UNAVAILABLE = 71


# --- representation ------------------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _current_status(charge: ChargeRow, now: datetime) -> tuple[str, str | None]:
    if now >= charge.final_at:
        return charge.final_status, charge.failure_code
    return "pending", None


def charge_object(charge: ChargeRow, status: str, failure_code: str | None) -> dict[str, Any]:
    """The charge as the API shows it."""
    return {
        "id": charge.id,
        "status": status,
        "channel": charge.channel,
        "order_id": charge.order_id,
        "idempotency_key": charge.idempotency_key,
        "amount": charge.amount,
        "currency": charge.currency,
        "failure_code": failure_code,
        "created_at": _iso(charge.created_at),
    }


def ledger_entry(charge: ChargeRow, now: datetime) -> dict[str, Any]:
    """The charge as the ledger (`/sandbox/charges`) shows it."""
    status, failure_code = _current_status(charge, now)
    return {
        "id": charge.id,
        "order_id": charge.order_id,
        "channel": charge.channel,
        "idempotency_key": charge.idempotency_key,
        "amount": charge.amount,
        "currency": charge.currency,
        "status": status,
        "failure_code": failure_code,
        "created_at": _iso(charge.created_at),
    }


# --- request parsing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChargeRequest:
    """A validated `POST /v1/charges`."""

    idempotency_key: str
    channel: str
    order_id: str
    amount: int
    currency: str
    webhook_url: str | None


def _read_json(environ: dict[str, Any]) -> Any:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError as exc:
        raise ApiError(400, "invalid_request", "bad Content-Length") from exc
    if length > MAX_BODY_BYTES:
        raise ApiError(400, "invalid_request", "body too large")
    raw = environ["wsgi.input"].read(length) if length > 0 else b""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ApiError(400, "invalid_json", "body is not valid JSON") from exc


def _storable(value: str, name: str) -> str:
    """`value`, if PostgreSQL can store it as text: no NUL, no lone surrogate (JSON allows both)."""
    if "\x00" not in value:
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            pass
    raise ApiError(400, "invalid_request", f"`{name}` holds a NUL or an unpaired surrogate")


def _text_field(body: dict[str, Any], name: str, max_length: int = MAX_FIELD_LENGTH) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, "invalid_request", f"`{name}` must be a non-empty string")
    if len(value) > max_length:
        raise ApiError(400, "invalid_request", f"`{name}` is too long")
    return _storable(value, name)


def parse_charge_request(environ: dict[str, Any]) -> ChargeRequest:
    """Validate headers and body of a charge request; raise ApiError(400) on bad input."""
    key = (environ.get("HTTP_IDEMPOTENCY_KEY") or "").strip()
    if not key:
        raise ApiError(400, "missing_idempotency_key", "the Idempotency-Key header is required")
    if len(key) > MAX_KEY_LENGTH:
        raise ApiError(400, "invalid_request", "Idempotency-Key is too long")
    _storable(key, "Idempotency-Key")
    body = _read_json(environ)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    channel = _text_field(body, "channel")
    order_id = _text_field(body, "order_id")
    amount = body.get("amount")
    # bool is an int subclass in Python; `true` is not an amount.
    if not isinstance(amount, int) or isinstance(amount, bool) or not 0 <= amount <= MAX_AMOUNT:
        raise ApiError(400, "invalid_request", "`amount` must be a non-negative integer (minor units)")
    currency = _text_field(body, "currency")
    if len(currency) != 3 or not currency.isalpha():
        raise ApiError(400, "invalid_request", "`currency` must be a 3-letter code")
    webhook_url = body.get("webhook_url")
    if webhook_url is not None and (
        not isinstance(webhook_url, str)
        or not webhook_url.startswith(("http://", "https://"))
        or len(webhook_url) > MAX_URL_LENGTH
    ):
        raise ApiError(400, "invalid_request", "`webhook_url` must be an http(s) URL")
    if webhook_url is not None:
        _storable(webhook_url, "webhook_url")
    return ChargeRequest(key, channel, order_id, amount, currency.upper(), webhook_url)


# --- handlers ------------------------------------------------------------------------------------------


def _require_state() -> tuple[Config, Store, Dispatcher]:
    start_background()
    assert _config is not None and _store is not None and _dispatcher is not None
    return _config, _store, _dispatcher


def _plan_webhooks(charge: ChargeRow, outcome: Outcome, webhook_url: str | None) -> list[NewWebhook]:
    if not webhook_url:
        return []
    webhooks: list[NewWebhook] = []
    prev: str | None = None
    for index, (event_type, status, failure_code) in enumerate(outcome.webhooks):
        msg_id = "msg_" + uuid.uuid4().hex
        payload = json.dumps(
            {"type": event_type, "data": charge_object(charge, status, failure_code)},
            separators=(",", ":"),
        )
        due = charge.final_at + SEQUENCE_SPACING * index
        webhooks.append(NewWebhook(msg_id, prev, event_type, payload, due))
        # Each message of a sequence waits for its predecessor's delivery, so the order holds even when
        # a receiver fails and retries stretch the schedule.
        prev = msg_id
    return webhooks


def create_charge(environ: dict[str, Any]) -> tuple[int, Any]:
    """POST /v1/charges."""
    config, store, dispatcher = _require_state()
    req = parse_charge_request(environ)
    scenario = req.amount % 100
    if scenario == ALWAYS_UNAVAILABLE or (
        scenario == FIRST_CHANNEL_UNAVAILABLE
        and store.first_channel(req.order_id, req.channel) == req.channel
    ):
        raise ApiError(503, "channel_unavailable", "channel unavailable, nothing was charged")

    outcome = OUTCOMES.get(scenario, DEFAULT_OUTCOME)
    now = datetime.now(UTC)
    charge = ChargeRow(
        id="ch_" + uuid.uuid4().hex[:24],
        idempotency_key=req.idempotency_key,
        channel=req.channel,
        order_id=req.order_id,
        amount=req.amount,
        currency=req.currency,
        webhook_url=req.webhook_url,
        final_status=outcome.final_status,
        failure_code=outcome.failure_code,
        created_at=now,
        final_at=now + timedelta(seconds=config.webhook_delay),
    )
    webhooks = _plan_webhooks(charge, outcome, req.webhook_url)
    if store.insert_charge(charge, webhooks):
        if webhooks and config.webhook_delay <= 0.05:
            dispatcher.wake()
        if outcome.slow:
            # The ledger row is committed and the connection is back in the pool: the client's read
            # timeout fires while the charge is already made, which is the point of this scenario.
            time.sleep(config.slow_seconds)
        return 201, charge_object(charge, "pending", None)

    existing = store.get_charge_by_key(req.idempotency_key)
    if existing is None:
        raise RuntimeError(f"idempotency key {req.idempotency_key!r} conflicted but no charge was found")
    same = (
        existing.channel,
        existing.order_id,
        existing.amount,
        existing.currency,
        existing.webhook_url,
    ) == (req.channel, req.order_id, req.amount, req.currency, req.webhook_url)
    if not same:
        raise ApiError(
            422, "idempotency_key_reused", "this Idempotency-Key was used with a different request body"
        )
    return 200, charge_object(existing, *_current_status(existing, datetime.now(UTC)))


def _query_param(environ: dict[str, Any], name: str) -> str | None:
    values = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).get(name)
    return _storable(values[0], name) if values else None


def get_charge(environ: dict[str, Any]) -> tuple[int, Any]:
    """GET /v1/charges?idempotency_key=K."""
    _, store, _ = _require_state()
    key = _query_param(environ, "idempotency_key")
    if not key:
        raise ApiError(400, "invalid_request", "query parameter `idempotency_key` is required")
    charge = store.get_charge_by_key(key)
    if charge is None:
        raise ApiError(404, "not_found", "no charge with this idempotency key")
    return 200, charge_object(charge, *_current_status(charge, datetime.now(UTC)))


def list_ledger(environ: dict[str, Any]) -> tuple[int, Any]:
    """GET /sandbox/charges[?order=<order_id>]."""
    _, store, _ = _require_state()
    order_id = _query_param(environ, "order")
    now = datetime.now(UTC)
    return 200, [ledger_entry(charge, now) for charge in store.list_charges(order_id or None)]


def healthz(environ: dict[str, Any]) -> tuple[int, Any]:
    """GET /healthz: 200 once the database answers."""
    _, store, _ = _require_state()
    store.ping()
    return 200, {"status": "ok"}


def receive_callback(environ: dict[str, Any]) -> tuple[int, Any]:
    """POST /sandbox/callbacks: a merchant endpoint for the demo merchant; records and answers 200.

    It stands in for the merchant's server in `make run`, `make demo` and `make bench`.
    """
    _, store, _ = _require_state()
    body = _read_json(environ)
    data = body.get("data") if isinstance(body, dict) else None
    store.record_callback(
        webhook_id=environ.get("HTTP_WEBHOOK_ID", ""),
        order_id=str((data or {}).get("id", "")),
        event_type=str(body.get("type", "")) if isinstance(body, dict) else "",
        signature=environ.get("HTTP_WEBHOOK_SIGNATURE", ""),
        body=json.dumps(body),
    )
    return 200, {"received": True}


def list_callbacks(environ: dict[str, Any]) -> tuple[int, Any]:
    """GET /sandbox/callbacks[?order=<order_id>]: what the demo merchant received."""
    _, store, _ = _require_state()
    return 200, store.list_callbacks(_query_param(environ, "order") or None)


# --- refunds (SPEC 10) ----------------------------------------------------------------------------------

# What the sandbox does with a refund, by the refund amount % 100.
REFUND_DECLINED = 51
REFUND_SILENT = 61
REFUND_SLOW = 62
REFUND_FIRST_TRY_UNAVAILABLE = 72


@dataclass(frozen=True)
class RefundRequest:
    """A validated `POST /v1/refunds`."""

    idempotency_key: str
    charge_idempotency_key: str
    amount: int
    webhook_url: str | None


def parse_refund_request(environ: dict[str, Any]) -> RefundRequest:
    """Validate headers and body of a refund request; raise ApiError(400) on bad input."""
    key = (environ.get("HTTP_IDEMPOTENCY_KEY") or "").strip()
    if not key:
        raise ApiError(400, "missing_idempotency_key", "the Idempotency-Key header is required")
    if len(key) > MAX_KEY_LENGTH:
        raise ApiError(400, "invalid_request", "Idempotency-Key is too long")
    _storable(key, "Idempotency-Key")
    body = _read_json(environ)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    charge_key = _text_field(body, "charge_idempotency_key", MAX_KEY_LENGTH)
    amount = body.get("amount")
    if not isinstance(amount, int) or isinstance(amount, bool) or not 1 <= amount <= MAX_AMOUNT:
        raise ApiError(400, "invalid_request", "`amount` must be a positive integer (minor units)")
    webhook_url = body.get("webhook_url")
    if webhook_url is not None and (
        not isinstance(webhook_url, str)
        or not webhook_url.startswith(("http://", "https://"))
        or len(webhook_url) > MAX_URL_LENGTH
    ):
        raise ApiError(400, "invalid_request", "`webhook_url` must be an http(s) URL")
    if webhook_url is not None:
        _storable(webhook_url, "webhook_url")
    return RefundRequest(key, charge_key, amount, webhook_url)


def _refund_status(refund: RefundRow, now: datetime) -> tuple[str, str | None]:
    if now >= refund.final_at:
        return refund.final_status, refund.failure_code
    return "pending", None


def refund_object(refund: RefundRow, status: str, failure_code: str | None) -> dict[str, Any]:
    """The refund as the API, its webhooks and the ledger show it."""
    return {
        "id": refund.id,
        "object": "refund",
        "status": status,
        "channel": refund.channel,
        "order_id": refund.order_id,
        "charge_id": refund.charge_id,
        "idempotency_key": refund.idempotency_key,
        "amount": refund.amount,
        "currency": refund.currency,
        "failure_code": failure_code,
        "created_at": _iso(refund.created_at),
    }


def _same_refund(existing: RefundRow, charge: ChargeRow, req: RefundRequest) -> bool:
    return (existing.charge_id, existing.amount, existing.webhook_url) == (
        charge.id,
        req.amount,
        req.webhook_url,
    )


def create_refund(environ: dict[str, Any]) -> tuple[int, Any]:
    """POST /v1/refunds: refund (part of) a charge, at most what it charged in all."""
    config, store, dispatcher = _require_state()
    req = parse_refund_request(environ)
    charge = store.get_charge_by_key(req.charge_idempotency_key)
    if charge is None:
        raise ApiError(404, "charge_not_found", "no charge with this idempotency key; nothing was refunded")
    existing = store.get_refund_by_key(req.idempotency_key)
    if existing is None:
        if charge.final_status != "paid":
            raise ApiError(400, "charge_not_refundable", "the charge did not succeed; nothing was refunded")
        scenario = req.amount % 100
        if scenario == REFUND_FIRST_TRY_UNAVAILABLE and store.first_refund_try(req.idempotency_key):
            raise ApiError(503, "channel_unavailable", "channel unavailable, nothing was refunded")
        declined = scenario == REFUND_DECLINED
        now = datetime.now(UTC)
        refund = RefundRow(
            id="re_" + uuid.uuid4().hex[:24],
            idempotency_key=req.idempotency_key,
            charge_id=charge.id,
            channel=charge.channel,
            order_id=charge.order_id,
            amount=req.amount,
            currency=charge.currency,
            webhook_url=req.webhook_url,
            final_status="failed" if declined else "succeeded",
            failure_code="refund_declined" if declined else None,
            created_at=now,
            final_at=now + timedelta(seconds=config.webhook_delay),
        )
        webhooks = []
        if req.webhook_url and scenario != REFUND_SILENT:
            event_type = "refund.failed" if declined else "refund.succeeded"
            payload = json.dumps(
                {"type": event_type, "data": refund_object(refund, refund.final_status, refund.failure_code)},
                separators=(",", ":"),
            )
            webhooks.append(NewWebhook("msg_" + uuid.uuid4().hex, None, event_type, payload, refund.final_at))
        inserted = store.insert_refund(refund, webhooks)
        if inserted == "exceeds":
            raise ApiError(
                400, "amount_exceeds_charge", "refunds would exceed what was charged; nothing was refunded"
            )
        if inserted == "inserted":
            if webhooks and config.webhook_delay <= 0.05:
                dispatcher.wake()
            if scenario == REFUND_SLOW:
                time.sleep(config.slow_seconds)  # committed: the client times out, the refund is made
            return 201, refund_object(refund, "pending", None)
        existing = store.get_refund_by_key(req.idempotency_key)
        if existing is None:
            raise RuntimeError(f"refund key {req.idempotency_key!r} conflicted but no refund was found")
    if not _same_refund(existing, charge, req):
        raise ApiError(
            422, "idempotency_key_reused", "this Idempotency-Key was used with a different request body"
        )
    return 200, refund_object(existing, *_refund_status(existing, datetime.now(UTC)))


def get_refund(environ: dict[str, Any]) -> tuple[int, Any]:
    """GET /v1/refunds?idempotency_key=K."""
    _, store, _ = _require_state()
    key = _query_param(environ, "idempotency_key")
    if not key:
        raise ApiError(400, "invalid_request", "query parameter `idempotency_key` is required")
    refund = store.get_refund_by_key(key)
    if refund is None:
        raise ApiError(404, "not_found", "no refund with this idempotency key")
    return 200, refund_object(refund, *_refund_status(refund, datetime.now(UTC)))


def list_refund_ledger(environ: dict[str, Any]) -> tuple[int, Any]:
    """GET /sandbox/refunds[?order=<order_id>]: every refund made (declined ones are not)."""
    _, store, _ = _require_state()
    now = datetime.now(UTC)
    return 200, [
        refund_object(refund, *_refund_status(refund, now))
        for refund in store.list_refunds(_query_param(environ, "order") or None)
    ]


ROUTES: dict[str, dict[str, Callable[[dict[str, Any]], tuple[int, Any]]]] = {
    "/v1/charges": {"POST": create_charge, "GET": get_charge},
    "/sandbox/charges": {"GET": list_ledger},
    "/v1/refunds": {"POST": create_refund, "GET": get_refund},
    "/sandbox/refunds": {"GET": list_refund_ledger},
    "/sandbox/callbacks": {"POST": receive_callback, "GET": list_callbacks},
    "/healthz": {"GET": healthz},
}

_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """WSGI entry point."""
    path = environ.get("PATH_INFO") or "/"
    if len(path) > 1:
        path = path.rstrip("/")
    method = environ.get("REQUEST_METHOD", "GET").upper()
    extra_headers: list[tuple[str, str]] = []
    try:
        methods = ROUTES.get(path)
        if methods is None:
            raise ApiError(404, "not_found", f"no route for {path}")
        handler = methods.get(method)
        if handler is None:
            extra_headers.append(("Allow", ", ".join(sorted(methods))))
            raise ApiError(405, "method_not_allowed", f"{method} is not allowed on {path}")
        status, body = handler(environ)
    except ApiError as exc:
        status, body = exc.status, _error_body(exc.code, exc.message)
    except Exception:
        log.exception("unhandled error on %s %s", method, path)
        status, body = 500, _error_body("internal_error", "internal error")
    payload = json.dumps(body, separators=(",", ":")).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload))), *extra_headers]
    start_response(f"{status} {_REASONS.get(status, 'Status')}", headers)
    return [payload]
