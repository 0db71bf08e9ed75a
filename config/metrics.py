"""Prometheus metrics: the counters and histograms the stages bump, scrape-time gauges, /metrics.

Processes (gunicorn workers, Celery pool children) each write their samples to files under
PROMETHEUS_MULTIPROC_DIR; /metrics sums them (prometheus-client's multiprocess mode). Without
that variable (tests, a shell) everything lives in the default in-process registry.

Gauges that describe the system rather than one process (outbox backlog, open orders, queue
depth) are computed when scraped by a custom collector, from PostgreSQL and Redis, through
partial indexes, so a scrape costs the same with a million completed orders as with none.
"""

import hmac
import logging
import os
import threading
import time
import uuid

# prometheus-client picks multiprocess mode when the variable exists, even empty, and then writes
# its files into the current directory, where /metrics never reads them. Empty means unset here.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == "":
    del os.environ["PROMETHEUS_MULTIPROC_DIR"]

import redis
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

from config.middleware import error_response

logger = logging.getLogger(__name__)

ORDERS_CREATED = Counter("orders_created", "Orders accepted by the API (idempotent replays excluded).")
ORDER_TRANSITIONS = Counter("order_transitions", "Order status transitions applied.", ["from", "to"])
CHARGE_ATTEMPTS = Counter(
    "charge_attempts",
    "Charge attempt results: accepted/rejected/unknown when the provider answers the charge,"
    " paid/failed when its final word is applied.",
    ["result", "channel"],
)
CALLBACK_ATTEMPTS = Counter(
    "callback_attempts",
    "Client callback attempts: success (2xx), http_error (any other status), error (no answer).",
    ["result"],
)
REFUND_TRANSITIONS = Counter("refund_transitions", "Refund status transitions applied.", ["to"])
ORDER_STAGE_SECONDS = Histogram(
    "order_stage_seconds",
    "Seconds from an order's creation until it reached the stage (status).",
    ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400),
)


def _created_at(order_id) -> float | None:
    """The creation time carried by a UUIDv7 order id (orders/ids.py): no query needed."""
    try:
        value = order_id if isinstance(order_id, uuid.UUID) else uuid.UUID(str(order_id))
    except ValueError:
        return None
    if value.version != 7:
        return None
    return (value.int >> 80) / 1000.0


def order_transitioned(*, order_id, from_status: str | None, to: str) -> None:
    """Count a transition that was applied and time how long the order took to reach `to`."""
    ORDER_TRANSITIONS.labels(from_status or "none", to).inc()
    if from_status is None or from_status == to:
        return  # creation (zero by definition) and failover (not a new stage)
    created = _created_at(order_id)
    if created is not None:
        ORDER_STAGE_SECONDS.labels(to).observe(max(time.time() - created, 0.0))


def refund_transitioned(*, to: str) -> None:
    REFUND_TRANSITIONS.labels(to).inc()


def charge_answered(*, attempt, result) -> None:
    """The provider's answer to a charge request (a ChargeAttempt and a ChargeResult).

    Counted only when the attempt was still "sending": a task re-run after a crash replays an
    answer already recorded, and must not count it twice.
    """
    if attempt.status == "sending":
        CHARGE_ATTEMPTS.labels(result.outcome.value, attempt.channel).inc()


def charge_settled(*, channel: str, status: str, applied: bool) -> None:
    """A provider's final word that moved the order (duplicates and late signals are not counted)."""
    if applied:
        CHARGE_ATTEMPTS.labels(status, channel).inc()


def callback_attempted(*, status_code: int | None) -> None:
    if status_code is None:
        result = "error"
    elif 200 <= status_code < 300:
        result = "success"
    else:
        result = "http_error"
    CALLBACK_ATTEMPTS.labels(result).inc()


# --- scrape-time gauges ------------------------------------------------------------------------

# kombu's Redis transport keeps one list per queue and priority step; the plain name is step 0.
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (3, 6, 9)


def queue_depths() -> dict[str, int]:
    """Messages waiting in each service's Celery queue (Redis LLEN). Raises redis.RedisError."""
    from orders.redis_client import get_redis

    queues = tuple(settings.SERVICE_QUEUES)
    pipe = get_redis().pipeline(transaction=False)
    for queue in queues:
        pipe.llen(queue)
        for step in _KOMBU_PRIORITY_STEPS:
            pipe.llen(f"{queue}{_KOMBU_PRIORITY_SEP}{step}")
    lengths = pipe.execute()
    per_queue = 1 + len(_KOMBU_PRIORITY_STEPS)
    return {queue: sum(lengths[i * per_queue : (i + 1) * per_queue]) for i, queue in enumerate(queues)}


class _DatabaseCounts:
    """The database counts of the last scrape, reused for METRICS_DB_CACHE_SECONDS.

    Per process, one entry: several scrapers (Prometheus pairs, dashboards) polling every web
    worker cost each worker one pair of queries per interval rather than one per scrape.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: tuple[int, dict[str, int]] | None = None
        self._read_at = 0.0

    def get(self) -> tuple[int, dict[str, int]]:
        from orders.selectors import orders_open_by_status, outbox_backlog

        with self._lock:
            now = time.monotonic()
            if self._value is None or now - self._read_at >= settings.METRICS_DB_CACHE_SECONDS:
                self._value = (outbox_backlog(), orders_open_by_status())
                self._read_at = now
            return self._value

    def clear(self) -> None:
        with self._lock:
            self._value = None


database_counts = _DatabaseCounts()


class SystemCollector:
    """Outbox backlog, open orders by status and Celery queue depth, read when scraped."""

    def collect(self):
        yield from self._database()
        yield from self._queues()

    def _database(self):
        try:
            backlog, counts = database_counts.get()
        except DatabaseError as exc:
            logger.warning("metrics.database_unavailable", extra={"error": repr(exc)})
            yield _scrape_error("database")
            return
        yield GaugeMetricFamily(
            "outbox_backlog", "Outbox events committed but not yet published.", value=backlog
        )
        by_status = GaugeMetricFamily(
            "orders_open",
            "Orders not yet completed, by status (completed ones are not counted).",
            labels=["status"],
        )
        for status in ("pending", "assigned", "processing", "paid", "failed"):
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status

    def _queues(self):
        try:
            depths = queue_depths()
        except redis.RedisError as exc:
            logger.warning("metrics.redis_unavailable", extra={"error": repr(exc)})
            yield _scrape_error("redis")
            return
        depth = GaugeMetricFamily(
            "celery_queue_depth", "Messages waiting in each Celery queue.", labels=["queue"]
        )
        for queue, n in depths.items():
            depth.add_metric([queue], n)
        yield depth


def _scrape_error(source: str) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(
        "metrics_scrape_error", "1 when a source of scrape-time gauges could not be read.", labels=["source"]
    )
    gauge.add_metric([source], 1)
    return gauge


class _DefaultRegistry:
    """The in-process default registry, when there is no multiprocess directory (tests, shells)."""

    def collect(self):
        return REGISTRY.collect()


def metrics_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_DefaultRegistry())
    registry.register(SystemCollector())
    return registry


def _token_accepted(request: HttpRequest) -> bool:
    """SPEC 3: with a token set, or required (production), `Authorization: Bearer <METRICS_TOKEN>`."""
    token = settings.METRICS_TOKEN
    if not token:
        return not settings.METRICS_REQUIRE_TOKEN  # required and unset: nobody reads the metrics
    presented = request.headers.get("Authorization", "")
    return hmac.compare_digest(presented.encode("utf-8", "replace"), f"Bearer {token}".encode())


def metrics_view(request: HttpRequest) -> HttpResponse:
    """GET /metrics: Prometheus text."""
    if not _token_accepted(request):
        response = error_response(401, "unauthorized", "Use 'Authorization: Bearer <METRICS_TOKEN>'.")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(metrics_registry()), content_type=CONTENT_TYPE_LATEST)
