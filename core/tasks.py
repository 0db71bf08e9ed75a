"""The stage task decorator: a pinned name and the one retry policy every stage shares.

A stage task is a thin wrapper around one service call. Its name is `<app>.<stage>`, which
routes it to its app's queue (CELERY_TASK_ROUTES) and is what queued messages carry, so it is
pinned rather than derived from the module path. When PostgreSQL is briefly unreachable
(restart, failover) the task retries with exponential backoff: 1, 2, 4, 8, 16 s, then gives
up and leaves the order to the beat sweep, which re-announces anything overdue (SPEC 9).
"""

from functools import cache

from celery import current_app as celery_app
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


@cache
def publish_declares(app) -> tuple | None:
    """What a publish declares first: nothing on a Redis broker, kombu's default elsewhere.

    Stage messages go through the default exchange with the queue's name as routing key. On
    Redis (plain or Sentinel) that is an LPUSH onto the queue's list, which consults no
    declaration, yet kombu binds a copy of the queue entity and checks its declaration cache on
    every publish: about a tenth of a publish's CPU (py-spy, web and allocation worker). On
    RabbitMQ an undeclared queue drops the message, so kombu declares it there (once per
    connection, as always)."""
    with app.connection_for_write() as connection:
        return () if connection.transport.driver_type == "redis" else None


def stage_send(task_name: str, message: dict, *, argsrepr: str | None = None) -> None:
    """Queue one stage task with its message: the outbox, the webhook hand-off, the sweeps."""
    declare = publish_declares(celery_app._get_current_object())
    celery_app.send_task(task_name, args=[message], argsrepr=argsrepr, kwargsrepr="{}", declare=declare)
