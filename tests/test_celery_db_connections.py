"""A worker process outlives a PostgreSQL restart: the connection a task found dead is dropped after
the task, so the next task reconnects instead of failing with "connection already closed"."""

import pytest
from celery import signals
from django.db import OperationalError, connection

from orders.models import Order


@pytest.mark.django_db(transaction=True)
def test_a_connection_killed_under_a_task_is_replaced_for_the_next_task():
    # given a reused connection that the server terminates (what a restart does to every one)
    Order.objects.exists()
    with pytest.raises(OperationalError):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    # when the task ends
    signals.task_postrun.send(sender=None, task_id="t", task=None, args=(), kwargs={}, retval=None)
    # then the next task's queries work on a new connection
    assert Order.objects.exists() is False


@pytest.mark.django_db(transaction=True)
def test_a_healthy_connection_is_kept_without_an_extra_query(django_assert_num_queries):
    Order.objects.exists()
    before = connection.connection
    with django_assert_num_queries(0):
        signals.task_postrun.send(sender=None, task_id="t", task=None, args=(), kwargs={}, retval=None)
    assert connection.connection is before
