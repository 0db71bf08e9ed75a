"""Model instances from plain SELECTs: the hot paths' reads without the ORM's query compilation.

A stage reads a row or two per task. Building that SELECT through a QuerySet (clone, compile,
select list, ORDER BY for first()) costs more CPU than PostgreSQL spends answering it: py-spy
found an `Order.objects.select_related("merchant").filter(pk=...).first()` to be a quarter of
the callbacks worker's CPU. Here the select list is spelled once per (model, fields) and the
row becomes the instance QuerySet.only() would make, each field's own conversion from the
database applied (JSON and the like), so callers see no difference.
"""

from functools import cache

from django.db import connection
from django.db.models import Model


@cache
def _plan(model: type[Model], names: tuple[str, ...]) -> tuple[tuple, tuple, tuple, tuple]:
    """The fields `names` (attnames) in the model's own order, where each one's value sits in a
    row ordered as `names`, and their conversions from the database."""
    by_attname = {field.attname: field for field in model._meta.concrete_fields}
    unknown = [name for name in names if name not in by_attname]
    if unknown:
        raise ValueError(f"{model.__name__} has no column(s) {unknown}")
    fields = tuple(field for field in model._meta.concrete_fields if field.attname in names)
    positions = tuple(names.index(field.attname) for field in fields)
    converters = []
    for index, field in enumerate(fields):
        column = field.get_col(model._meta.db_table)
        found = connection.ops.get_db_converters(column) + field.get_db_converters(connection)
        if found:
            converters.append((index, tuple(found), column))
    return fields, tuple(field.attname for field in fields), positions, tuple(converters)


@cache
def all_columns(model: type[Model]) -> tuple[str, ...]:
    """Every concrete field's attname, in the model's order."""
    return tuple(field.attname for field in model._meta.concrete_fields)


@cache
def select_list(model: type[Model], names: tuple[str, ...], table: str = "") -> str:
    """`names` as SQL columns, in the order given, qualified by `table` when given (spelled once
    per arguments: the stages ask for the same few on every task)."""
    fields, _, positions, _ = _plan(model, names)
    by_position = {position: field for field, position in zip(fields, positions, strict=True)}
    prefix = f"{table}." if table else ""
    return ", ".join(f'{prefix}"{by_position[i].column}"' for i in range(len(names)))


def instance(model: type[Model], names: tuple[str, ...], row) -> Model:
    """The instance with only `names` loaded, from `row` (values in the order of `names`)."""
    _, attnames, positions, converters = _plan(model, names)
    values = [row[position] for position in positions]
    for index, functions, column in converters:
        for function in functions:
            values[index] = function(values[index], column, connection)
    return model.from_db(connection.alias, attnames, values)
