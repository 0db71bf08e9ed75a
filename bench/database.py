"""What PostgreSQL says about a run (read-only): completion, timings, statements; and the growth seed.

The observer reads `created_at`/`completed_at` straight from orders_order instead of polling the
API per order, and counts its own statements so they can be taken out of the per-order figure.
"""

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2

# Not work the application asks for: transaction control and session settings.
_IGNORED = re.compile(r"^\s*(begin|commit|rollback|savepoint|release|set|show|start\s+transaction)\b", re.I)


MARKER = "bench-observer"


def _uuid_array(ids: list[str]) -> str:
    # One array literal, one parameter: pg_stat_statements then sees one statement, whatever the length.
    return "{" + ",".join(ids) + "}"


@dataclass(frozen=True)
class Statement:
    query: str
    toplevel: bool
    calls: int


class Observer:
    def __init__(self, dsn: str) -> None:
        self.conn = psycopg2.connect(dsn, application_name="bench-observer", connect_timeout=5)
        self.conn.set_session(readonly=True, autocommit=True)
        # Statements this connection ran that pg_stat_statements counts like the application's.
        self.own_statements = 0

    def _rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.conn.cursor() as cursor:
            # The marker keeps these out of the busiest-statements list; they are subtracted from the count.
            cursor.execute(f"/* {MARKER} */ {sql}", params)
            rows = cursor.fetchall()
        if "pg_stat_statements" not in sql:
            self.own_statements += 1
        return rows

    def close(self) -> None:
        self.conn.close()

    def backend_pid(self) -> int:
        """The PostgreSQL backend serving this connection (its CPU is the bench's, not the stack's)."""
        return self.conn.get_backend_pid()

    def database_name(self) -> str:
        return self._rows("SELECT current_database()")[0][0]

    def merchant_exists(self, merchant_id: str) -> bool:
        return bool(self._rows("SELECT 1 FROM orders_merchant WHERE id = %s", (merchant_id,)))

    def order_count(self) -> int:
        return self._rows("SELECT count(*) FROM orders_order")[0][0]

    def merchant_order_count(self, merchant_id: str) -> int:
        return self._rows("SELECT count(*) FROM orders_order WHERE merchant_id = %s", (merchant_id,))[0][0]

    def completed_count(self, ids: list[str]) -> int:
        return self._rows(
            "SELECT count(*) FROM orders_order WHERE id = ANY(%s::uuid[]) AND status = 'completed'",
            (_uuid_array(ids),),
        )[0][0]

    def wait_completed(self, ids: list[str], *, timeout: float, poll: float = 0.25) -> int:
        """Wait until every order in `ids` is completed, or `timeout` passes. How many completed."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.completed_count(ids) if ids else 0
            if done >= len(ids) or time.monotonic() >= deadline:
                return done
            time.sleep(poll)

    def timings(self, ids: list[str]) -> list[tuple]:
        """(created_at, completed_at) of the completed orders among `ids`, as epoch seconds."""
        return self._rows(
            "SELECT extract(epoch FROM created_at)::float8, extract(epoch FROM completed_at)::float8"
            " FROM orders_order WHERE id = ANY(%s::uuid[]) AND status = 'completed'",
            (_uuid_array(ids),),
        )

    def write_counters(self) -> tuple[int, int, int, int]:
        """(commits in this database, WAL records, full-page images, WAL bytes of the whole server).

        Counts the machine's load does not move, so a change too small for the CPU figures to show
        through other work still shows here. The commits include this observer's own reads (each
        one a transaction of its own in autocommit); the caller subtracts them.
        """
        ((commits,),) = self._rows(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        ((records, fpi, wal_bytes),) = self._rows("SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal")
        return int(commits), int(records), int(fpi), int(wal_bytes)

    def has_statement_stats(self) -> bool:
        return bool(self._rows("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'"))

    def statements(self) -> dict[tuple, Statement]:
        """pg_stat_statements of this database, keyed by statement, without the ignored kinds."""
        rows = self._rows(
            "SELECT userid, queryid, toplevel, query, calls FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return {
            (userid, queryid, toplevel): Statement(query, toplevel, calls)
            for userid, queryid, toplevel, query, calls in rows
            if not _IGNORED.match(query) and "pg_stat_statements" not in query
        }


# PostgreSQL's own foreign-key checks (RI triggers). The schema's foreign keys are DEFERRABLE
# INITIALLY DEFERRED, so the checks run at COMMIT, where pg_stat_statements counts them as top level.
_FK_CHECK = re.compile(r'^SELECT \$?\d+ FROM ONLY "[^"]+"\."[^"]+" x WHERE .* FOR KEY SHARE OF x', re.S)


@dataclass(frozen=True)
class StatementDelta:
    toplevel: int  # top-level statements (the application's, minus the bench's own)
    fk_checks: int  # of which PostgreSQL's foreign-key checks, not sent by the application
    nested: int  # statements run inside others (functions, triggers' own queries)
    top: list[tuple[int, str]]  # the busiest top-level statements: (calls, text)


def statements_delta(
    before: dict[tuple, Statement], after: dict[tuple, Statement], *, own: int
) -> StatementDelta:
    toplevel = fk_checks = nested = 0
    busiest = []
    for key, stmt in after.items():
        calls = stmt.calls - (before[key].calls if key in before else 0)
        if calls <= 0:
            continue
        if stmt.toplevel:
            toplevel += calls
            if _FK_CHECK.match(stmt.query):
                fk_checks += calls
            if MARKER not in stmt.query:
                busiest.append((calls, " ".join(stmt.query.split())))
        else:
            nested += calls
    busiest.sort(reverse=True)
    return StatementDelta(max(toplevel - own, 0), fk_checks, nested, busiest[:40])


def statement_stats_enable(dsn: str) -> None:
    """pg_stat_statements is preloaded by scripts/services.sh; the extension makes it readable."""
    conn = psycopg2.connect(dsn, application_name="bench-setup", connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    finally:
        conn.close()


# One batch of stored orders: completed long ago, each with its one transition. Ids are UUIDv7
# like the application's (time-ordered), spread over the 30 days before the seed ran.
_SEED_SQL = """
WITH params AS (
    SELECT g, now() - interval '1 hour' - (%(target)s - g) * (interval '30 days' / %(target)s) AS ts,
           md5(g::text || random()::text) AS h
    FROM generate_series(%(first)s, %(last)s) AS g
), inserted AS (
    INSERT INTO orders_order (id, merchant_id, reference, amount, currency, description, metadata,
        callback_url, status, outcome, channel, failure_code, failure_message, request_id,
        created_at, updated_at, completed_at, next_check_at, check_count)
    SELECT (lpad(to_hex((extract(epoch FROM ts) * 1000)::bigint), 12, '0') || '7' || substr(h, 1, 3)
            || '8' || substr(h, 4, 15))::uuid,
           %(merchant)s, 'stored-' || g, 100 * (1 + g %% 997) + g %% 50, 'USD', '', '{}', '',
           'completed', 'paid', 'sandbox-a', NULL, NULL, '', ts, ts + interval '1 second',
           ts + interval '1 second', NULL, 0
    FROM params
    ON CONFLICT DO NOTHING
    RETURNING id, completed_at
)
INSERT INTO orders_ordertransition (order_id, from_status, to_status, reason, channel, created_at)
SELECT id, 'paid', 'completed', 'bench: stored order', 'sandbox-a', completed_at FROM inserted
"""


def stored_orders_seed(
    dsn: str,
    *,
    merchant_id: str,
    have: int,
    target: int,
    progress: Callable[[int], None],
    batch: int = 100_000,
) -> int:
    """Top the stored merchant's completed orders up to `target` with INSERT ... SELECT generate_series."""
    conn = psycopg2.connect(dsn, application_name="bench-seed", connect_timeout=5)
    inserted = 0
    try:
        for first in range(have + 1, target + 1, batch):
            last = min(first + batch - 1, target)
            with conn, conn.cursor() as cursor:
                cursor.execute(
                    _SEED_SQL, {"first": first, "last": last, "target": target, "merchant": merchant_id}
                )
                inserted += cursor.rowcount
            progress(have + inserted)
        _settle(conn)
    finally:
        conn.close()
    return inserted


def stored_orders_unseed(dsn: str, *, merchant_id: str) -> int:
    """Delete the stored merchant's seeded orders (and their transitions). How many went.

    The transition log refuses DELETE by trigger (append-only, migration 0002); these rows are
    the bench's own filler of its own merchant, so the delete runs with triggers off for this
    transaction only (session_replication_role, which needs a superuser, as the dev database has).
    """
    conn = psycopg2.connect(dsn, application_name="bench-seed", connect_timeout=5)
    try:
        with conn, conn.cursor() as cursor:
            cursor.execute("SET LOCAL session_replication_role = replica")
            cursor.execute(
                "DELETE FROM orders_ordertransition t USING orders_order o"
                " WHERE t.order_id = o.id AND o.merchant_id = %s",
                [merchant_id],
            )
            cursor.execute("DELETE FROM orders_order WHERE merchant_id = %s", [merchant_id])
            deleted = cursor.rowcount
        _settle(conn)
    finally:
        conn.close()
    return deleted


def _settle(conn) -> None:
    """Leave the order tables as a long-lived database has them before anything is measured.

    Statistics and the visibility map are current, and the bulk change is written out: its dirty
    pages would otherwise be flushed by the checkpointer during the next measured burst.
    """
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE) orders_order")
        cursor.execute("VACUUM (ANALYZE) orders_ordertransition")
        cursor.execute("CHECKPOINT")
