"""The per-order statements run prepared (core/prepared.py): PREPAREd once per connection, then
EXECUTEd, with the same results and the same errors as a plain statement."""

import pytest
from django.db import DatabaseError, ProgrammingError, connection, transaction

from core import prepared
from orders.models import Order, OrderTransition, OutboxEvent
from orders.selectors import order_fields
from orders.transitions import order_transition
from tests.factories import OrderFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _prepared_on(settings):
    settings.PREPARED_STATEMENTS = True  # whatever the environment says


def _prepared_here() -> dict[str, str]:
    """This session's prepared statements: name -> statement text."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT name, statement FROM pg_prepared_statements")
        return dict(cursor.fetchall())


def _run(sql: str, params=()) -> list:
    with connection.cursor() as cursor:
        prepared.execute(cursor, sql, params)
        return cursor.fetchall()


def test_a_statement_is_prepared_once_per_connection_and_then_executed():
    sql = "SELECT %s::int + %s::int, %s::text"
    name = prepared.spelled(sql)[0]
    assert name not in _prepared_here()

    assert _run(sql, [40, 2, "a"]) == [(42, "a")]
    statements = _prepared_here()
    assert statements[name] == f"PREPARE {name} AS SELECT $1::int + $2::int, $3::text"

    assert _run(sql, [1, 2, "it's"]) == [(3, "it's")]  # values quoted as psycopg2 quotes them
    assert _prepared_here() == statements  # not prepared twice


def test_named_placeholders_are_one_parameter_per_name_and_percent_signs_stay():
    sql = "SELECT %(a)s::int * 10 + %(b)s::int, %(a)s::int, 'x' LIKE 'x%%'"
    name, prepare, run, order = prepared.spelled(sql)
    assert prepare == f"PREPARE {name} AS SELECT $1::int * 10 + $2::int, $1::int, 'x' LIKE 'x%'"
    assert (run, order) == (f"EXECUTE {name}(%s, %s)", ("a", "b"))

    assert _run(sql, {"b": 2, "a": 4}) == [(42, 4, True)]


def test_mixed_placeholders_are_refused():
    with pytest.raises(ValueError):
        prepared.spelled("SELECT %s, %(a)s")


@pytest.mark.django_db(transaction=True)
def test_a_new_connection_prepares_again():
    sql = "SELECT %s::int"
    assert _run(sql, [1]) == [(1,)]
    connection.close()  # what a worker does when the database went away: a fresh session

    assert prepared.spelled(sql)[0] not in _prepared_here()
    assert _run(sql, [2]) == [(2,)]
    assert prepared.spelled(sql)[0] in _prepared_here()


def test_a_statement_that_cannot_be_prepared_raises_djangos_error_and_is_not_remembered():
    sql = "SELECT nosuchcolumn FROM orders_order WHERE id = %s"
    with pytest.raises(ProgrammingError), transaction.atomic():
        _run(sql, ["00000000-0000-7000-8000-000000000000"])
    with pytest.raises(ProgrammingError), transaction.atomic():  # tried again, not EXECUTEd blind
        _run(sql, ["00000000-0000-7000-8000-000000000000"])


def test_an_error_in_execution_is_djangos_error_and_the_statement_stays_usable():
    sql = "SELECT 1 / %s::int"
    with pytest.raises(DatabaseError), transaction.atomic():
        _run(sql, [0])
    assert _run(sql, [1]) == [(1,)]


def test_a_prepared_prepare_survives_the_rollback_of_its_transaction():
    sql = "SELECT %s::int * 2"
    with pytest.raises(RuntimeError), transaction.atomic():
        _run(sql, [1])
        raise RuntimeError("roll back")
    assert _run(sql, [21]) == [(42,)]


def test_behind_a_transaction_pool_nothing_is_prepared(settings):
    # PREPARED_STATEMENTS=false: the statement runs as plain text, as it did before
    settings.PREPARED_STATEMENTS = False
    sql = "SELECT %(a)s::int + %(b)s::int -- never prepared"
    assert _run(sql, {"a": 40, "b": 2}) == [(42,)]
    assert _run("SELECT %s::text -- never prepared either", ["x"]) == [("x",)]
    assert not [text for text in _prepared_here().values() if "never prepared" in text]


def test_the_stage_statements_run_prepared_and_do_what_they_did():
    order = OrderFactory()

    moved = order_transition(
        order_id=order.pk, to="assigned", reason="test", seen_status="pending", channel="sandbox-a"
    )

    assert moved.applied and moved.status == "assigned" and moved.channel == "sandbox-a"
    # prepared by this test or an earlier one on this connection
    statements = _prepared_here().values()
    assert any("WITH changed AS (UPDATE orders_order SET status = $1" in text for text in statements)
    got = order_fields(order_id=order.pk, fields=("status", "channel"))
    assert (got.status, got.channel) == ("assigned", "sandbox-a")
    log = OrderTransition.objects.filter(order_id=order.pk).order_by("id")
    assert [(t.from_status, t.to_status, t.channel) for t in log][-1] == ("pending", "assigned", "sandbox-a")
    event = OutboxEvent.objects.filter(order_id=order.pk, topic="payment-channel-allocated").get()
    assert event.payload["channel"] == "sandbox-a" and event.payload["status"] == "assigned"

    # the same statement again, on another order: executed, not prepared a second time
    second = OrderFactory()
    count = len(_prepared_here())
    assert order_transition(
        order_id=second.pk, to="assigned", reason="test", seen_status="pending", channel="sandbox-b"
    ).applied
    assert len(_prepared_here()) == count
    assert Order.objects.get(pk=second.pk).channel == "sandbox-b"
