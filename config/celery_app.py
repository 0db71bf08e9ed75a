"""The Celery application shared by every service's worker."""

import os

from celery import Celery, signals

from config.logging import order_id_var, request_id_var

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

app = Celery("payments")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.task_prerun.connect
def _bind_log_context(task=None, args=None, **_) -> None:
    """Carry the order id and the originating request id into every log line of a task."""
    message = args[0] if args and isinstance(args[0], dict) else {}
    payload = message.get("payload") or {}
    order_id_var.set(message.get("order_id"))
    request_id_var.set(payload.get("request_id") or message.get("request_id"))
