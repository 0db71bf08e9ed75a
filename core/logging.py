"""Log context (a request id and order id that follow an order from the API into every task),
and redaction: no API key, webhook secret or Authorization header ever reaches a log line."""

import contextvars
import logging
import re
import uuid
from datetime import UTC, datetime

from pythonjsonlogger.json import JsonFormatter

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
order_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("order_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


class ContextFilter(logging.Filter):
    """Adds the current request and order ids to every record that does not carry its own,
    and redacts secrets (it is the filter every handler already has: see settings.LOGGING)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "order_id", None) is None:
            order_id = order_id_var.get()
            if order_id is not None:
                record.order_id = order_id
        redact_record(record)
        return True


class ClientFaultLine(logging.Filter):
    """For loggers that report what a client sent wrong (django.security.DisallowedHost: a request
    for a Host this server does not serve): the message names it; Django's traceback with it is
    the same forty lines every time. One line at WARNING instead, so a client sending foreign
    Hosts costs the log a line each, and an alert on ERROR is not woken by other people's garbage."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class ServerErrorsOnly(logging.Filter):
    """For `django.request`: its lines for 4xx answers ("Bad Request: /path" at WARNING, with no
    request or order id) are dropped; RequestIdMiddleware logs each as `http.client_error` with
    both. Its 5xx lines (ERROR, with the traceback) pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "status_code", 500) >= 500


# --- redaction ---------------------------------------------------------------------------------

REDACTED = "[redacted]"
# Extra fields whose value is a secret whatever it looks like.
_SECRET_NAME = re.compile(r"authorization|api[_-]?key|secret|password|passwd|cookie|token|signature", re.I)
# Secrets recognisable inside any text: bearer tokens, our API keys (keep the public prefix,
# it names the key without revealing it) and Standard Webhooks secrets.
_SECRET_TEXT = (
    (re.compile(r"(\bBearer\s+)[^\s\"',;]+", re.I), r"\1" + REDACTED),
    (re.compile(r"\b(sk_[0-9a-f]{12}_)[A-Za-z0-9_\-]+"), r"\1" + REDACTED),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]+"), "whsec_" + REDACTED),
    # Credentials in a URL's query (a merchant's callback URL may carry one): ?token=..., &key=...
    (
        re.compile(r"([?&](?:[\w.-]*(?:token|key|secret|password|signature|sig))=)[^&#\s\"']+", re.I),
        r"\1" + REDACTED,
    ),
)
_MAYBE_SECRET = re.compile(r"bearer|sk_|whsec_|(?:token|key|secret|password|signature|sig)=", re.I)
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def redact_text(text: str) -> str:
    if not _MAYBE_SECRET.search(text):
        return text
    for pattern, replacement in _SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text


def redact_value(value, depth: int = 0):
    if isinstance(value, str):
        return redact_text(value)
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_NAME.search(k) else redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v, depth + 1) for v in value)
    return value


def redact_record(record: logging.LogRecord) -> None:
    """Scrub a record in place: its message, its extra fields and its traceback text."""
    if record.args:
        record.msg = record.getMessage()
        record.args = None
    if isinstance(record.msg, str):
        record.msg = redact_text(record.msg)
    for name, value in list(record.__dict__.items()):
        if name in _STANDARD:
            continue
        record.__dict__[name] = REDACTED if _SECRET_NAME.search(name) else redact_value(value)
    if record.exc_info and record.exc_info[0] is not None:
        # Formatters prefer exc_info to exc_text: render the traceback now, redacted.
        record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        record.exc_info = None
    elif record.exc_text:
        record.exc_text = redact_text(record.exc_text)


class RedactFilter(logging.Filter):
    """Redaction alone, for handlers that do not carry ContextFilter."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


class UtcJsonFormatter(JsonFormatter):
    """One JSON object a line, its `time` in ISO 8601 UTC to the millisecond ("…T14:44:03.262Z"),
    whatever the host's time zone: lines from several machines sort and compare as they are."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        at = datetime.fromtimestamp(record.created, UTC)
        return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
