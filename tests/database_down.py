"""PostgreSQL restarting, as a request meets it: every statement refused at the driver, the way
Django raises it then. Installed on the test's own connection, so only that request sees it."""

from contextlib import contextmanager

from django.db import OperationalError, connection


@contextmanager
def database_restarting():
    def refuse(execute, sql, params, many, context):
        raise OperationalError("the database system is not yet accepting connections")

    with connection.execute_wrapper(refuse):
        yield
