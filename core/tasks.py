"""The stage task decorator: a pinned name and the one retry policy every stage shares.

A stage task is a thin wrapper around one service call. Its name is `<app>.<stage>`, which
routes it to its app's queue (CELERY_TASK_ROUTES) and is what queued messages carry, so it is
pinned rather than derived from the module path. When PostgreSQL is briefly unreachable
(restart, failover) the task retries with exponential backoff: 1, 2, 4, 8, 16 s, then gives
up and leaves the order to the beat sweep, which re-announces anything overdue (SPEC 9).
"""

from celery import shared_task
from django.db import InterfaceError, OperationalError

STAGE_RETRY = {
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "max_retries": 5,
}


def stage_task(name: str):
    """Declare a stage task: `@stage_task("gateway.charge")`."""
    return shared_task(name=name, **STAGE_RETRY)
