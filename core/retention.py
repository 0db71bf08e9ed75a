"""Retention of history-only rows (SPEC 12): the batching shared by every app's pruning service.

Each app owns its tables' SQL (orders, gateway, callbacks services); this only runs one app's
DELETE ... LIMIT statement in short transactions until a batch comes back short or the pass has
used its batches. Each statement deletes at most `batch` rows chosen through an index on the
row's time, oldest first, skipping rows another transaction holds, so a pass never scans the
table, never holds a lock for long, and costs the same on a table of a thousand rows or a billion.
"""

from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone


def retention_cutoff() -> datetime:
    return timezone.now() - timedelta(days=settings.RETENTION_DAYS)


def delete_in_batches(sql: str, *, before: datetime, batch: int, max_batches: int) -> int:
    """Run `sql` (a DELETE taking %(before)s and %(batch)s) until it deletes fewer than `batch`
    rows or `max_batches` ran; returns how many rows went. The next pass goes on from there."""
    total = 0
    for _ in range(max_batches):
        with transaction.atomic(), connection.cursor() as cursor:
            # A batch waits for no one: a row lock it cannot skip, or a plan gone wrong, ends it.
            cursor.execute("SET LOCAL lock_timeout = '2s'; SET LOCAL statement_timeout = '30s'")
            cursor.execute(sql, {"before": before, "batch": batch})
            deleted = cursor.rowcount
        total += deleted
        if deleted < batch:
            break
    return total
