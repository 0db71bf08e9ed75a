"""The Celery application shared by every service's worker."""

import os

from celery import Celery, signals

from core.logging import order_id_var, request_id_var

# Production unless told otherwise (see config/wsgi.py).
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")

app = Celery("payments")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.setup_logging.connect
def _keep_django_logging(**_) -> None:
    """Leave logging to Django's LOGGING (JSON lines, secret redaction, LOG_LEVEL).

    Without a receiver here, Celery sets the root logger to the worker's `-l` level and adds its
    own handler: with `-l warning` every stage's INFO line (SPEC 8: logs carrying the order id)
    was dropped in the running workers. Celery's own loggers stay at WARNING (LOGGING).
    """


@signals.task_postrun.connect
def _drop_broken_db_connections(**_) -> None:
    """Close a database connection that failed during the task, if it no longer works.

    With CELERY_DB_REUSE_MAX, Celery's Django fixup keeps connections open across tasks and never
    checks them; after a PostgreSQL restart every pool process would keep its dead connection and
    fail each later task with InterfaceError("connection already closed"), for good. Checking only
    connections that saw an error keeps the happy path free of an extra query.
    """
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        if conn.connection is not None and conn.errors_occurred:
            conn.close_if_unusable_or_obsolete()


@signals.task_prerun.connect
def _bind_log_context(task=None, args=None, **_) -> None:
    """Carry the order id and the originating request id into every log line of a task."""
    message = args[0] if args and isinstance(args[0], dict) else {}
    payload = message.get("payload") or {}
    order_id_var.set(message.get("order_id"))
    request_id_var.set(payload.get("request_id") or message.get("request_id"))
