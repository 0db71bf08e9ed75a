"""The API layer's errors: one JSON shape for every error, {"error": {"code", "message", "fields"}}
(SPEC 3; `fields` is {} when no one field is at fault), and the one place domain errors
(core/errors.py) become HTTP statuses."""

import logging

from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, JsonResponse
from django.urls import Resolver404, resolve
from rest_framework import exceptions, status
from rest_framework.response import Response

from core.errors import Conflict, DomainError, InvalidRequest, NotFound, Unprocessable
from core.http_codes import error_body
from core.middleware import DATABASE_ERRORS, database_unavailable, error_response

logger = logging.getLogger(__name__)


class ApiError(exceptions.APIException):
    """An error with an explicit machine-readable code, raised by views (services raise DomainError)."""

    def __init__(self, status_code: int, code: str, message: str, fields: dict | None = None):
        self.status_code = status_code
        self.code = code
        self.message = message
        self.fields = fields
        super().__init__(detail=message, code=code)


# A domain error's class is its HTTP status; a subclass takes its nearest listed base's.
_DOMAIN_STATUS = {
    InvalidRequest: status.HTTP_400_BAD_REQUEST,
    NotFound: status.HTTP_404_NOT_FOUND,
    Conflict: status.HTTP_409_CONFLICT,
    Unprocessable: status.HTTP_422_UNPROCESSABLE_ENTITY,
}

_CODES = {
    exceptions.ParseError: "malformed_json",
    exceptions.AuthenticationFailed: "unauthorized",
    exceptions.NotAuthenticated: "unauthorized",
    exceptions.PermissionDenied: "forbidden",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.Throttled: "rate_limited",
    exceptions.ValidationError: "invalid_request",
}


def _flatten(detail) -> object:
    if isinstance(detail, dict):
        return {key: _flatten(value) for key, value in detail.items()}
    if isinstance(detail, list):
        flat = [_flatten(item) for item in detail]
        return flat if any(isinstance(item, dict) for item in flat) else [str(item) for item in flat]
    return str(detail)


def _safe(value: object) -> object:
    """The error body with every string encodable: messages echo input, which may hold a lone
    surrogate (JSON allows "\\ud800"), and the renderer's UTF-8 encode would turn that into a 500."""
    if isinstance(value, dict):
        return {_safe(key): _safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_safe(item) for item in value]
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def api_exception_handler(exc, context) -> Response | JsonResponse | None:
    if isinstance(exc, DATABASE_ERRORS):
        return database_unavailable(exc)
    if isinstance(exc, DomainError):
        http_status = next(
            (code for cls, code in _DOMAIN_STATUS.items() if isinstance(exc, cls)),
            status.HTTP_400_BAD_REQUEST,
        )
        exc = ApiError(http_status, exc.code, exc.message, exc.fields)
    if isinstance(exc, ApiError):
        return Response(_safe(error_body(exc.code, exc.message, exc.fields)), status=exc.status_code)
    # DRF's handler answers Django's own two as its NotFound and PermissionDenied, but reading our
    # body from the original would find no `detail`: convert first, as it does.
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    from rest_framework.views import exception_handler  # late: rest_framework.views imports our auth

    response = exception_handler(exc, context)
    if response is None:
        return None
    code = next((c for cls, c in _CODES.items() if isinstance(exc, cls)), "error")
    if isinstance(exc, exceptions.ValidationError):
        detail = exc.detail
        if isinstance(detail, dict):
            non_field = detail.get("non_field_errors")
            message = str(non_field[0]) if non_field else "The request is not valid."
            body = error_body(code, message, _flatten(detail))
        else:
            items = _flatten(detail)
            message = items[0] if isinstance(items, list) and items else str(items)
            body = error_body(code, message)
    else:
        body = error_body(code, str(exc.detail))
    if response.status_code == status.HTTP_401_UNAUTHORIZED:
        response["WWW-Authenticate"] = 'Bearer realm="api"'
    response.data = _safe(body)
    return response


def handler404(request: HttpRequest, exception=None) -> JsonResponse:
    path = request.path
    if path.startswith("/api/v1/") and path.endswith("/") and _resolves(path.rstrip("/")):
        # DRF's own routers end paths with "/", ours do not (SPEC 3): say so rather than "not found"
        return error_response(
            404, "not_found", f"No such path: API paths have no trailing slash ({path.rstrip('/')[:200]})."
        )
    return error_response(404, "not_found", "The requested resource was not found.")


def _resolves(path: str) -> bool:
    try:
        resolve(path)
    except Resolver404:
        return False
    return True


def handler500(request: HttpRequest) -> JsonResponse:
    return error_response(500, "internal_error", "An internal error occurred.")


def handler400(request: HttpRequest, exception=None) -> JsonResponse:
    return error_response(400, "bad_request", "The request could not be understood.")


def handler403(request: HttpRequest, exception=None) -> JsonResponse:
    return error_response(403, "forbidden", "You do not have permission to do this.")
