"""The parts of the HTTP surface that are not DRF views, added to the OpenAPI document.

drf-spectacular describes DRF views only; the provider webhook endpoint and the probes are plain
Django views, so without this the published schema, and the schemathesis run fuzzing from it
(tests/fuzz), would leave them out.
"""

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json_error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _text(description: str) -> dict:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def _header(name: str, description: str) -> dict:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


_PROBE_STATUS = {
    "type": "object",
    "properties": {"status": {"type": "string"}, "checks": {"type": "object"}},
    "required": ["status"],
}

PATHS = {
    "/api/v1/gateway/webhooks/{provider}": {
        "post": {
            "operationId": "provider_webhook",
            "summary": "A payment provider's signed event (SPEC 5, 7; Stripe: SPEC 11).",
            "tags": ["provider webhooks"],
            "security": [],
            "parameters": [
                {"name": "provider", "in": "path", "required": True, "schema": {"type": "string"}},
                _header("webhook-id", "Standard Webhooks message id."),
                _header("webhook-timestamp", "Unix seconds; more than 5 minutes off is refused."),
                _header("webhook-signature", "Space-separated `v1,<base64 HMAC-SHA256>`."),
                _header(
                    "Stripe-Signature",
                    "Stripe's `t=<unix seconds>,v1=<hex HMAC-SHA256>` (provider `stripe`).",
                ),
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "type": {"type": "string"},
                                "data": {
                                    "type": "object",
                                    "properties": {
                                        "channel": {"type": "string"},
                                        "order_id": {"type": "string"},
                                        "idempotency_key": {"type": "string"},
                                        "status": {"type": "string"},
                                    },
                                },
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "Verified and stored (or a duplicate of one stored).",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "received": {"type": "boolean"},
                                    "duplicate": {"type": "boolean"},
                                    "ignored": {
                                        "type": "boolean",
                                        "description": "Authentic, not acted on, not stored.",
                                    },
                                },
                                "required": ["received", "duplicate"],
                            }
                        }
                    },
                },
                **{
                    code: _json_error(text)
                    for code, text in (
                        ("400", "Unreadable request; for `stripe`, also a signature that does not verify."),
                        ("401", "Signature or timestamp not valid; nothing changed."),
                        ("403", "Signed by a channel that did not make the charge; nothing changed."),
                        ("404", "Unknown provider."),
                        ("405", "Only POST."),
                        ("413", "Body over 64 KiB."),
                        ("429", "Too many refused webhooks from this address."),
                    )
                },
            },
        }
    },
    "/healthz": {
        "get": {
            "operationId": "healthz",
            "summary": "The process is up.",
            "tags": ["probes"],
            "security": [],
            "responses": {
                "200": {"description": "Up.", "content": {"application/json": {"schema": _PROBE_STATUS}}},
            },
        }
    },
    "/readyz": {
        "get": {
            "operationId": "readyz",
            "summary": "The database and Redis are reachable.",
            "tags": ["probes"],
            "security": [],
            "responses": {
                "200": {"description": "Ready.", "content": {"application/json": {"schema": _PROBE_STATUS}}},
                "503": {
                    "description": "Not ready.",
                    "content": {"application/json": {"schema": _PROBE_STATUS}},
                },
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus text; production requires `Authorization: Bearer $METRICS_TOKEN`.",
            "tags": ["probes"],
            "security": [],
            "parameters": [_header("Authorization", "`Bearer <METRICS_TOKEN>` where required.")],
            "responses": {
                "200": _text("Prometheus exposition format."),
                "401": _json_error("The token is required and was not given."),
            },
        }
    },
}


def add_plain_django_paths(result: dict, generator, request, public) -> dict:
    """drf-spectacular postprocessing hook: add PATHS to the generated document."""
    result.setdefault("paths", {}).update(PATHS)
    return result


# The response headers a client acts on, on every operation that can send them.
_REPLAYED = {
    "description": "`true` when this is the stored answer to an earlier request with the same"
    " Idempotency-Key and body (no second order or refund was made); absent on the first answer.",
    "schema": {"type": "string", "enum": ["true"]},
}
_RETRY_AFTER = {
    "description": "Seconds to wait before trying again.",
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}
_IDEMPOTENT_CREATES = ("orders_create", "orders_refunds_create")


def declare_response_headers(result: dict, generator, request, public) -> dict:
    """drf-spectacular postprocessing hook: `Idempotent-Replayed` on the creates' 201 and
    `Retry-After` on every 429 and 503, which drf-spectacular has no view-level way to say."""
    for path, operations in result.get("paths", {}).items():
        if not path.startswith("/api/v1/"):
            continue  # the probes' 503 says "not ready", with no time to wait
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            responses = operation.get("responses", {})
            if operation.get("operationId") in _IDEMPOTENT_CREATES and "201" in responses:
                responses["201"].setdefault("headers", {})["Idempotent-Replayed"] = _REPLAYED
            for code in ("429", "503"):
                if code in responses:
                    responses[code].setdefault("headers", {})["Retry-After"] = _RETRY_AFTER
    return result
