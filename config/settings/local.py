"""`make run` / `make up`: everything on loopback, waits shortened so a demo finishes in seconds."""

from .base import *  # noqa: F403
from .base import env

DEBUG = env.bool("DEBUG", default=False)
CALLBACK_ALLOW_PRIVATE_NETWORKS = env.bool("CALLBACK_ALLOW_PRIVATE_NETWORKS", default=True)
API_RATE_LIMIT_PER_SECOND = env.int("API_RATE_LIMIT_PER_SECOND", default=2000)
UNAUTHENTICATED_RATE_LIMIT_PER_SECOND = env.int("UNAUTHENTICATED_RATE_LIMIT_PER_SECOND", default=1000)
BEAT_INTERVAL_SECONDS = env.float("BEAT_INTERVAL_SECONDS", default=1.0)
CELERY_BEAT_SCHEDULE = {
    name: {**entry, "schedule": entry["schedule"] if entry["schedule"] > 60 else BEAT_INTERVAL_SECONDS}
    for name, entry in CELERY_BEAT_SCHEDULE.items()  # noqa: F405
}
OUTBOX_RELAY_AGE_SECONDS = env.float("OUTBOX_RELAY_AGE_SECONDS", default=3.0)
STAGE_TIMEOUT_SECONDS = {
    "pending": env.float("PENDING_TIMEOUT_SECONDS", default=5.0),
    "assigned": env.float("ASSIGNED_TIMEOUT_SECONDS", default=5.0),
    "processing": env.float("POLL_FIRST_SECONDS", default=3.0),
    "paid": env.float("CALLBACK_GRACE_SECONDS", default=5.0),
    "failed": env.float("CALLBACK_GRACE_SECONDS", default=5.0),
}
POLL_INTERVAL_SECONDS = env.float("POLL_INTERVAL_SECONDS", default=2.0)
REFUND_RETRY_SECONDS = env.float("REFUND_RETRY_SECONDS", default=0.5)
GATEWAY_READ_TIMEOUT = env.float("GATEWAY_READ_TIMEOUT", default=2.0)
CALLBACK_RETRY_SCHEDULE = env.list("CALLBACK_RETRY_SCHEDULE", cast=float, default=[1, 2, 4, 8, 15, 30])
