"""Request-wide concerns that must run before any view: request id, the body size limit, reading the body."""

import io
import ipaddress
import json
import logging
import re

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.handlers.wsgi import LimitedStream
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse, UnreadablePostError
from django.urls import Resolver404, resolve

from core.http_codes import ERROR_CODES, error_body
from core.logging import new_request_id, request_id_var
from core.ratelimit import window_count

logger = logging.getLogger(__name__)

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware:
    """Takes X-Request-Id from the client when it is sane, else makes one; echoes it back.

    A 4xx answer (what a client sent) is logged here, while the request id is still the
    context's: one INFO line `http.client_error` with the request id, the error's code and the
    order id its path names, so a merchant quoting the request id of a refused request finds it.
    Django's own WARNING for it ("Conflict: /path", mostly written after this middleware has
    returned, so without either id) is dropped (`core.logging.ServerErrorsOnly`). A 5xx keeps
    Django's ERROR line with its traceback, written inside the request, with the request id.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        incoming = request.headers.get("X-Request-Id", "")
        request_id = incoming if _SAFE_REQUEST_ID.match(incoming) else new_request_id()
        request.request_id = request_id
        token = request_id_var.set(request_id)
        try:
            response = self.get_response(request)
            if 400 <= response.status_code < 500:
                _log_client_error(request, response)
        finally:
            request_id_var.reset(token)
        response["X-Request-Id"] = request_id
        return response


# An order's id in an API or console path: /api/v1/orders/<id>/..., /admin/orders/order/<id>/...
_ORDER_IN_PATH = re.compile(
    r"/orders/(?:order/)?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})(?:/|$)"
)


def _log_client_error(request: HttpRequest, response: HttpResponse) -> None:
    extra = {"method": request.method[:16], "path": request.path[:200], "status_code": response.status_code}
    if match := _ORDER_IN_PATH.search(request.path):
        extra["order_id"] = match.group(1).lower()
    code = _error_code(response)
    if code:
        extra["code"] = code
    logger.info("http.client_error", extra=extra)


def _error_code(response: HttpResponse) -> str:
    """The `error.code` of one of our JSON error bodies, or "" (a streamed, foreign or huge one)."""
    if getattr(response, "streaming", False) or "json" not in response.get("Content-Type", ""):
        return ""
    content = response.content
    if len(content) > 64 * 1024:
        return ""
    try:
        code = json.loads(content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return ""
    return code[:64] if isinstance(code, str) else ""


def error_response(status: int, code: str, message: str, fields: dict | None = None) -> JsonResponse:
    return JsonResponse(error_body(code, message, fields), status=status)


class BodySizeLimitMiddleware:
    """413 for bodies over the limit, before anything reads them (SPEC 3); then reads the body."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        limit = settings.MAX_REQUEST_BODY_BYTES
        chunked = "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower()
        if chunked and "CONTENT_LENGTH" not in request.META:
            try:
                _buffer_chunked_body(request, limit)
            except Exception as exc:  # a malformed chunk: the server's parse errors are not OSErrors
                return _unreadable(exc)
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return error_response(400, "bad_request", "Content-Length is not a number.")
        if length > limit:
            return error_response(413, "payload_too_large", f"Request body exceeds {limit} bytes.")
        try:
            # Read whole now, within the web server's read deadline (core/http_server.py), so a
            # body that never arrives is one clear answer here rather than an error in a view.
            request.body  # noqa: B018 (the read is the point)
        except UnreadablePostError as exc:
            return _unreadable(exc)
        return self.get_response(request)


def _buffer_chunked_body(request: HttpRequest, limit: int) -> None:
    """Read a chunked body (no Content-Length), at most one byte past the limit, and give it its
    length: Django reads a body only as far as Content-Length says, so a chunked create would
    arrive empty (a misleading "amount is required") and any size would pass the 413 check."""
    data = request.META["wsgi.input"].read(limit + 1)
    request.META["CONTENT_LENGTH"] = str(len(data))
    request._stream = LimitedStream(io.BytesIO(data), len(data))


def _unreadable(exc: BaseException) -> HttpResponse:
    if _caused_by(exc, TimeoutError):
        return error_response(408, "request_timeout", "The request body did not arrive in time.")
    return error_response(400, "bad_request", "The request body could not be read.")


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    while exc is not None:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__
    return False


_API_PREFIX = "/api/"
# Headers of an error answer that still mean something once its body is replaced.
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


# PostgreSQL unreachable or restarting, as Django raises it.
DATABASE_ERRORS = (OperationalError, InterfaceError)


def database_unavailable(exc: BaseException) -> JsonResponse:
    """A 503 the client may retry (a merchant with the same Idempotency-Key, a provider by its own
    redelivery), rather than a 500 that reads as a bug."""
    logger.warning("api.database_unavailable", extra={"error": repr(exc)})
    response = error_response(503, "service_unavailable", _MESSAGES["service_unavailable"])
    response["Retry-After"] = "1"
    return response


class ApiJsonErrorsMiddleware:
    """Every error under /api/ in the one JSON shape (SPEC 3), whoever wrote the answer.

    DRF's views answer through core.exception_handlers; plain Django views (the provider webhook endpoint's
    `require_POST`, CSRF, a resolver 404) answer HTML or an empty body. Those are rewritten here,
    and a plain view that meets the database down answers 503, as DRF's do.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if request.path.startswith(_API_PREFIX) and isinstance(exception, DATABASE_ERRORS):
            return database_unavailable(exception)
        return None

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if (
            response.status_code < 400
            or not request.path.startswith(_API_PREFIX)
            or response.get("Content-Type", "").startswith("application/json")
        ):
            return response
        code = ERROR_CODES.get(response.status_code, "error")
        replaced = error_response(response.status_code, code, _MESSAGES.get(code, "The request failed."))
        for header in _KEPT_HEADERS:
            if header in response:
                replaced[header] = response[header]
        return replaced


_MESSAGES = {
    "bad_request": "The request could not be understood.",
    "unauthorized": "Authentication is required.",
    "forbidden": "You do not have permission to do this.",
    "not_found": "The requested resource was not found.",
    "method_not_allowed": "This method is not allowed here.",
    "not_acceptable": "Only application/json answers are available.",
    "payload_too_large": "The request body is too large.",
    "unsupported_media_type": "The body must be application/json.",
    "rate_limited": "Too many requests; retry later.",
    "internal_error": "An internal error occurred.",
    "service_unavailable": "Temporarily unavailable; retry shortly.",
}


def client_ip(request: HttpRequest) -> str:
    """The client's address: REMOTE_ADDR, or behind TRUSTED_PROXY_COUNT proxies of ours the
    X-Forwarded-For entry the outermost one added. IPv6 clients count per /64, which one
    subscriber usually holds whole."""
    candidate = request.META.get("REMOTE_ADDR", "")
    hops = settings.TRUSTED_PROXY_COUNT
    if hops > 0:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        forwarded = [part for part in forwarded if part]
        if len(forwarded) >= hops:
            candidate = forwarded[-hops]
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return "unknown"
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


_WEBHOOK_PREFIX = "/api/v1/gateway/webhooks/"
_ADMIN_LOGIN = "/admin/login/"


class UnauthenticatedRateLimitMiddleware:
    """Per client IP, requests that fail to authenticate: API calls answered 401, provider
    webhooks refused, admin login posts that did not log in. Over
    UNAUTHENTICATED_RATE_LIMIT_PER_SECOND in a one-second window, that IP's API calls, webhooks
    and login posts answer 429 before any work (key lookup, signature check, password hash).

    Failures are what is counted, so a provider delivering webhooks in bulk or merchants behind
    one NAT with good keys are never slowed; guessing keys, forging webhooks or passwords is.
    The counter is the Redis fixed window of core/ratelimit.py.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        path = request.path
        login_post = path == _ADMIN_LOGIN and request.method == "POST"
        if not (path.startswith(_API_PREFIX) or login_post):
            return self.get_response(request)
        name = f"unauth:{client_ip(request)}"
        counted = window_count(name, increment=False)
        if counted is not None and counted[0] >= settings.UNAUTHENTICATED_RATE_LIMIT_PER_SECOND:
            response = error_response(429, "rate_limited", "Too many unauthenticated requests; retry later.")
            response["Retry-After"] = "1"
            return response
        response = self.get_response(request)
        if _failed_to_authenticate(path, login_post, response.status_code):
            window_count(name)
        return response


def _failed_to_authenticate(path: str, login_post: bool, status: int) -> bool:
    if login_post:
        return status != 302  # a failed login renders the form again (200); success redirects
    if path.startswith(_WEBHOOK_PREFIX):
        return status in (400, 401, 403, 404)
    return status == 401


class ConsoleGarbageMiddleware:
    """The operators' console (/admin/) refuses, with a 400, input none of its pages produce and
    Django's admin would hand to the database as it is (answering 500):

    - a NUL character in the query string (a list filter `?status__exact=%00`): PostgreSQL text
      cannot hold one;
    - an action on ids that are not ids of the page's model (`_selected_action=garbage` on a
      UUID or integer key).

    Staff only in practice, but every byte from the network may be garbage.
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info.startswith("/admin/"):
            problem = _console_garbage(request)
            if problem:
                return error_response(400, "bad_request", problem)
        return self.get_response(request)


def _console_garbage(request: HttpRequest) -> str | None:
    query = request.META.get("QUERY_STRING", "")
    if ("%00" in query or "\x00" in query) and any(
        "\x00" in text for key, values in request.GET.lists() for text in (key, *values)
    ):
        return "A query parameter holds a NUL character."
    if request.method != "POST" or "_selected_action" not in request.POST:
        return None
    try:
        view = resolve(request.path_info).func
    except Resolver404:
        return None
    model_admin = getattr(view, "model_admin", None)
    if model_admin is None:
        return None
    key = model_admin.model._meta.pk
    for value in request.POST.getlist("_selected_action"):
        try:
            if "\x00" in value:
                raise ValidationError("NUL")
            key.to_python(value)
        except ValidationError:
            plural = model_admin.model._meta.verbose_name_plural
            return f"The selection holds an id that is not one of {plural}."
    return None
