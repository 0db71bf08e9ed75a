"""/metrics (Prometheus text) and the gauges read when it is scraped.

Processes (gunicorn workers, Celery pool children) each write their samples to files under
PROMETHEUS_MULTIPROC_DIR; /metrics sums them (prometheus-client's multiprocess mode). Without
that variable (tests, a shell) everything lives in the default in-process registry. The counters
themselves are core/metrics.py.

Gauges that describe the system rather than one process (outbox backlog, open orders, queue
depth) are computed when scraped by a custom collector, from PostgreSQL and Redis, through
partial indexes, so a scrape costs the same with a million completed orders as with none.
"""

import hmac
import logging
import os
import threading
import time

import redis
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from core import metrics as _counters  # noqa: F401  (registers the counters before a scrape)
from core.broker import BROKER_ERRORS, queue_depths
from core.middleware import error_response

logger = logging.getLogger(__name__)


class _DatabaseCounts:
    """The database counts of the last scrape, reused for METRICS_DB_CACHE_SECONDS.

    Per process, one entry: several scrapers (Prometheus pairs, dashboards) polling every web
    worker cost each worker one pair of queries per interval rather than one per scrape.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: tuple | None = None
        self._read_at = 0.0

    def get(
        self,
    ) -> tuple[int, dict[str, int], dict[str, int], dict[str, int], dict[str, int], dict[str, int], int]:
        """(outbox backlog, open orders by status, refunds by status, refunded amount by currency,
        orders and refunds that need a person by why, exhausted callback deliveries)."""
        from callbacks.selectors import deliveries_exhausted_count
        from console.dashboard import OVERDUE_GRACE
        from orders.selectors import (
            orders_open_by_status,
            orders_stuck_counts,
            outbox_backlog,
            refunded_by_currency,
            refunds_by_status,
            refunds_stuck_counts,
        )

        with self._lock:
            now = time.monotonic()
            if self._value is None or now - self._read_at >= settings.METRICS_DB_CACHE_SECONDS:
                self._value = (
                    outbox_backlog(),
                    orders_open_by_status(),
                    refunds_by_status(),
                    refunded_by_currency(),
                    orders_stuck_counts(overdue_before=timezone.now() - OVERDUE_GRACE),
                    refunds_stuck_counts(overdue_before=timezone.now() - OVERDUE_GRACE),
                    deliveries_exhausted_count(),
                )
                self._read_at = now
            return self._value

    def clear(self) -> None:
        with self._lock:
            self._value = None


database_counts = _DatabaseCounts()


class SystemCollector:
    """Outbox backlog, open orders by status, refunds by status and refunded amounts per currency,
    and Celery queue depth, read when scraped."""

    def collect(self):
        yield from self._database()
        yield from self._queues()

    def _database(self):
        try:
            backlog, counts, refunds, refunded, stuck, stuck_refunds, exhausted = database_counts.get()
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
        refunds_gauge = GaugeMetricFamily("refunds", "Refunds by status (SPEC 10).", labels=["status"])
        for status in ("pending", "processing", "succeeded", "failed"):
            refunds_gauge.add_metric([status], refunds.get(status, 0))
        yield refunds_gauge
        refunded_gauge = GaugeMetricFamily(
            "refunded_amount",
            "The amounts of succeeded refunds, per currency, in the currency's minor units.",
            labels=["currency"],
        )
        for currency, total in sorted(refunded.items()):
            refunded_gauge.add_metric([currency], total)
        yield refunded_gauge
        # What an on-call alert wants: the dashboard's lists of work for a person.
        for noun, counts_by_why in (("orders", stuck), ("refunds", stuck_refunds)):
            gauge = GaugeMetricFamily(
                f"{noun}_needing_a_person",
                f"{noun.capitalize()} the dashboard lists as needing a person: the sweep gave up"
                " (gave_up), the check is overdue (overdue: beat or workers down), the provider has"
                " not settled it in a quarter of the status checks (unanswered).",
                labels=["why"],
            )
            for why in ("gave_up", "overdue", "unanswered"):
                gauge.add_metric([why], counts_by_why.get(why, 0))
            yield gauge
        yield GaugeMetricFamily(
            "callback_deliveries_exhausted",
            "Callback deliveries that ran out of attempts, waiting for an operator's resend.",
            value=exhausted,
        )

    def _queues(self):
        try:
            depths = queue_depths()
        except (redis.RedisError, *BROKER_ERRORS) as exc:
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
