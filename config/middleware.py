"""Request-wide concerns that must run before any view: request id and the body size limit."""

import re

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from config.logging import new_request_id, request_id_var

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware:
    """Takes X-Request-Id from the client when it is sane, else makes one; echoes it back."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        incoming = request.headers.get("X-Request-Id", "")
        request_id = incoming if _SAFE_REQUEST_ID.match(incoming) else new_request_id()
        request.request_id = request_id
        token = request_id_var.set(request_id)
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(token)
        response["X-Request-Id"] = request_id
        return response


def error_response(status: int, code: str, message: str, fields: dict | None = None) -> JsonResponse:
    body = {"error": {"code": code, "message": message}}
    if fields:
        body["error"]["fields"] = fields
    return JsonResponse(body, status=status)


class BodySizeLimitMiddleware:
    """413 for bodies over the limit, before anything reads them (SPEC 3)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        limit = settings.MAX_REQUEST_BODY_BYTES
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return error_response(400, "bad_request", "Content-Length is not a number.")
        if length > limit:
            return error_response(413, "payload_too_large", f"Request body exceeds {limit} bytes.")
        return self.get_response(request)


_API_PREFIX = "/api/"
# Headers of an error answer that still mean something once its body is replaced.
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


class ApiJsonErrorsMiddleware:
    """Every error under /api/ in the one JSON shape (SPEC 3), whoever wrote the answer.

    DRF's views answer through config.errors; plain Django views (the provider webhook endpoint's
    `require_POST`, CSRF, a resolver 404) answer HTML or an empty body. Those are rewritten here.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if (
            response.status_code < 400
            or not request.path.startswith(_API_PREFIX)
            or response.get("Content-Type", "").startswith("application/json")
        ):
            return response
        code = _CODES_BY_STATUS.get(response.status_code, "error")
        replaced = error_response(response.status_code, code, _MESSAGES.get(code, "The request failed."))
        for header in _KEPT_HEADERS:
            if header in response:
                replaced[header] = response[header]
        return replaced


_CODES_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}
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
