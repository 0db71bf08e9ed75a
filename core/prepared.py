"""The per-order statements as server-side prepared statements: parsed and planned once per connection.

psycopg2 sends every statement as text with its values inline, so PostgreSQL parses, analyses and
plans it each time. For a stage's statement (an UPDATE of the order with its transition row and
its outbox event in one CTE) that is two thirds of the server's CPU for it: 0.41 to 0.45 ms against
0.13 to 0.17 ms prepared (2,000 runs each, the backend's own CPU time, this machine). `execute` sends
`PREPARE` the first time a connection meets a statement and `EXECUTE` from then on; after five
executions PostgreSQL keeps a generic plan when custom ones cost no less.

Use it only where the plan does not depend on the values — lookups by key and inserts, which is
what a stage runs per order. A generic plan cannot use a partial index whose predicate a
parameter decides; the sweeps and the console's searches stay plain.

Prepared statements live in the database session: a process behind a transaction-mode pooler
runs with PREPARED_STATEMENTS=false (README, "PostgreSQL connections"), and then `execute` is
plain cursor.execute. A statement whose result columns change under it (a migration altering its
table) fails with "cached plan must not change result type"; restarting the processes after a
migration, as a deploy does, prepares again.
"""

import hashlib
import re
import weakref
from collections.abc import Mapping, Sequence
from functools import lru_cache

from django.conf import settings

# Statement names prepared on each psycopg2 connection; a reconnect is a new connection, which
# starts with none, and a closed one drops out with its entry.
_prepared: "weakref.WeakKeyDictionary[object, set[str]]" = weakref.WeakKeyDictionary()

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%s|%%")


@lru_cache(maxsize=512)
def spelled(sql: str) -> tuple[str, str, str, tuple[str, ...] | None]:
    """(name, PREPARE text, EXECUTE text, the named parameters' order or None for positional ones).

    `sql` is written as for cursor.execute: `%s` or `%(name)s` placeholders, `%%` for a percent
    sign. A name used twice is one parameter.
    """
    names: list[str] = []
    positional = 0

    def number(match: re.Match) -> str:
        nonlocal positional
        text, name = match.group(0), match.group(1)
        if text == "%%":
            return "%"
        if name is None:
            positional += 1
            return f"${positional}"
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    body = _PLACEHOLDER.sub(number, sql)
    if names and positional:
        raise ValueError("a statement mixes %s and %(name)s placeholders")
    count = len(names) or positional
    name = "q_" + hashlib.blake2b(sql.encode(), digest_size=10).hexdigest()
    arguments = f"({', '.join(['%s'] * count)})" if count else ""
    return name, f"PREPARE {name} AS {body}", f"EXECUTE {name}{arguments}", tuple(names) if names else None


def execute(cursor, sql: str, params: Sequence | Mapping = ()) -> None:
    """cursor.execute(sql, params), as a prepared statement of the cursor's connection.

    `cursor` is a Django cursor (`connection.cursor()`); errors surface as Django's database
    errors either way, so a stage's retry on OperationalError still applies.
    """
    if not settings.PREPARED_STATEMENTS:
        cursor.execute(sql, params)
        return
    name, prepare, run, order = spelled(sql)
    raw = cursor.cursor.connection
    names = _prepared.get(raw)
    if names is None:
        names = _prepared.setdefault(raw, set())
    if name not in names:
        # Straight to psycopg2: PREPARE is set-up, not a statement of the caller's (query counts
        # and logs stay as they were), and it has no parameters for psycopg2 to interpolate.
        with cursor.db.wrap_database_errors:
            cursor.cursor.execute(prepare)
        names.add(name)
    values = [params[key] for key in order] if order is not None else list(params)
    cursor.execute(run, values)
