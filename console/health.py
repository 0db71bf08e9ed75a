"""Liveness and readiness probes (SPEC 3)."""

import redis
from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse

from core.middleware import error_response
from core.redis import get_redis


class ProbesMiddleware:
    """GET or HEAD /healthz, /readyz and /metrics answer before Django looks at the Host header.

    Load balancers, orchestrators and Prometheus reach each web process by its address
    (`Host: 10.0.3.7:8000`), which is not a host the API serves (ALLOWED_HOSTS); Django would refuse
    them with a 400 before any view. The probes build no URL from the Host, so it does not matter to
    them. Any other method is a JSON 405 naming GET and HEAD (not the CSRF page Django would draw
    for a POST). First in MIDDLEWARE; every other path goes through the whole chain.
    """

    def __init__(self, get_response) -> None:
        from console.metrics import metrics_view  # late: the metrics module registers collectors

        self.get_response = get_response
        self.probes = {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics_view}

    def __call__(self, request: HttpRequest):
        probe = self.probes.get(request.path_info)
        if probe is None:
            return self.get_response(request)
        if request.method in ("GET", "HEAD"):
            return probe(request)
        response = error_response(405, "method_not_allowed", "Only GET and HEAD are allowed here.")
        response["Allow"] = "GET, HEAD"
        return response


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    checks = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except DatabaseError as exc:
        checks["database"] = f"error: {exc.__class__.__name__}"
    try:
        get_redis().ping()
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = f"error: {exc.__class__.__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )
