"""Prometheus metrics: the counters and histograms the stages bump.

Processes (gunicorn workers, Celery pool children) each write their samples to files under
PROMETHEUS_MULTIPROC_DIR; /metrics sums them (prometheus-client's multiprocess mode). Without
that variable (tests, a shell) everything lives in the default in-process registry.

The scrape-time gauges and the /metrics view are the console's (console/metrics.py).
"""

import os
import time
import uuid

# prometheus-client picks multiprocess mode when the variable exists, even empty, and then writes
# its files into the current directory, where /metrics never reads them. Empty means unset here.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == "":
    del os.environ["PROMETHEUS_MULTIPROC_DIR"]

from prometheus_client import Counter, Histogram

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
REFUNDS_CREATED = Counter("refunds_created", "Refunds accepted by the API (idempotent replays excluded).")
REFUND_TRANSITIONS = Counter("refund_transitions", "Refund status transitions applied.", ["to"])
ORDER_STAGE_SECONDS = Histogram(
    "order_stage_seconds",
    "Seconds from an order's creation until it reached the stage (status).",
    ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400),
)


def _created_at(order_id) -> float | None:
    """The creation time carried by a UUIDv7 order id (core/ids.py): no query needed."""
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
