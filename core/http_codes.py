"""The API's error code for each HTTP status it answers without a more specific one (SPEC 3's
`{"error": {"code", ...}}`), shared by Django's middleware and the web server's own answers
(core/http_server.py, which runs before Django is set up: this module imports nothing)."""


def error_body(code: str, message: str, fields: dict | None = None) -> dict:
    """SPEC 3's error object: `fields` always present, empty when no one field is at fault."""
    return {"error": {"code": code, "message": message, "fields": fields or {}}}


ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    429: "rate_limited",
    431: "headers_too_large",
    500: "internal_error",
    503: "service_unavailable",
}
