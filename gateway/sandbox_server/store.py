"""PostgreSQL storage of the sandbox provider: charge and refund ledgers, first-try memory, webhook queue."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.pool

log = logging.getLogger("sandbox.store")

# Beside the payments database, on the embedded server's port (PG_PORT moves both).
DEFAULT_DATABASE_URL = f"postgres://payments@127.0.0.1:{os.environ.get('PG_PORT', '55432')}/sandbox"

# Fixed key so that two gunicorn workers booting together do not race on CREATE TABLE IF NOT EXISTS
# (which is not concurrency-safe in PostgreSQL: both can pass the existence check).
_SCHEMA_LOCK_KEY = 0x5A4D_B0C5

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandbox_charges (
    id              text PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    channel         text NOT NULL,
    order_id        text NOT NULL,
    amount          bigint NOT NULL,
    currency        text NOT NULL,
    webhook_url     text,
    final_status    text NOT NULL,
    failure_code    text,
    created_at      timestamptz NOT NULL,
    final_at        timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS sandbox_charges_order_idx ON sandbox_charges (order_id, created_at);
CREATE INDEX IF NOT EXISTS sandbox_charges_created_idx ON sandbox_charges (created_at);

CREATE TABLE IF NOT EXISTS sandbox_order_first_channel (
    order_id   text PRIMARY KEY,
    channel    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS sandbox_webhooks (
    msg_id           text PRIMARY KEY,
    charge_id        text NOT NULL,
    prev_msg_id      text,
    channel          text NOT NULL,
    url              text NOT NULL,
    event_type       text NOT NULL,
    payload          text NOT NULL,
    status           text NOT NULL DEFAULT 'pending',
    due_at           timestamptz NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    last_http_status integer,
    last_error       text,
    created_at       timestamptz NOT NULL,
    sent_at          timestamptz
);
CREATE INDEX IF NOT EXISTS sandbox_webhooks_due_idx ON sandbox_webhooks (due_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS sandbox_webhooks_charge_idx ON sandbox_webhooks (charge_id);

CREATE TABLE IF NOT EXISTS sandbox_merchant_callbacks (
    id          bigserial PRIMARY KEY,
    webhook_id  text,
    order_id    text,
    event_type  text,
    signature   text,
    body        text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sandbox_merchant_callbacks_order_idx ON sandbox_merchant_callbacks (order_id);

CREATE TABLE IF NOT EXISTS sandbox_refunds (
    id              text PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    charge_id       text NOT NULL REFERENCES sandbox_charges (id),
    channel         text NOT NULL,
    order_id        text NOT NULL,
    amount          bigint NOT NULL,
    currency        text NOT NULL,
    webhook_url     text,
    final_status    text NOT NULL,
    failure_code    text,
    created_at      timestamptz NOT NULL,
    final_at        timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS sandbox_refunds_charge_idx ON sandbox_refunds (charge_id);
CREATE INDEX IF NOT EXISTS sandbox_refunds_order_idx ON sandbox_refunds (order_id, created_at);

-- Refund keys whose first request was answered 503 (row 72): the retry is accepted.
CREATE TABLE IF NOT EXISTS sandbox_refund_first_tries (
    idempotency_key text PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now()
);
"""
# Which SCHEMA a database has: a process finding its own already there runs no DDL at all.
# `CREATE INDEX IF NOT EXISTS` takes a SHARE lock on its table before it looks, so a worker booting
# beside one already serving could deadlock with a charge's INSERT (seen in CI: the worker failed
# to boot and gunicorn shut the whole sandbox down).
_SCHEMA_VERSION = hashlib.sha256(SCHEMA.encode()).hexdigest()[:16]
_SCHEMA_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS sandbox_schema (version text PRIMARY KEY)"

_CHARGE_COLUMNS = (
    "id, idempotency_key, channel, order_id, amount, currency, webhook_url,"
    " final_status, failure_code, created_at, final_at"
)

_INSERT_CHARGE = """
INSERT INTO sandbox_charges (id, idempotency_key, channel, order_id, amount, currency, webhook_url,
                             final_status, failure_code, created_at, final_at)
VALUES (%(id)s, %(idempotency_key)s, %(channel)s, %(order_id)s, %(amount)s, %(currency)s, %(webhook_url)s,
        %(final_status)s, %(failure_code)s, %(created_at)s, %(final_at)s)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id
"""

# Charge and its webhooks go in as one statement: one round trip and atomic without a transaction block.
# The webhook rows are inserted only if the charge row was (a replayed key yields no row in `ins`).
_INSERT_CHARGE_WITH_WEBHOOKS = f"""
WITH ins AS ({_INSERT_CHARGE}),
wh AS (
    INSERT INTO sandbox_webhooks (msg_id, charge_id, prev_msg_id, channel, url, event_type, payload,
                                  due_at, created_at)
    SELECT w.msg_id, ins.id, w.prev_msg_id, %(channel)s, %(webhook_url)s, w.event_type, w.payload,
           w.due_at, %(created_at)s
    FROM ins CROSS JOIN unnest(%(w_ids)s::text[], %(w_prev)s::text[], %(w_types)s::text[],
                               %(w_payloads)s::text[], %(w_due)s::timestamptz[])
         AS w(msg_id, prev_msg_id, event_type, payload, due_at)
)
SELECT id FROM ins
"""

# A webhook that follows another one (the 81 sequence) waits until its predecessor is no longer
# pending, so receivers see the messages in order. Claiming pushes due_at out by a lease: a worker that
# dies mid-send leaves the row to be picked up again when the lease runs out.
_CLAIM_WEBHOOKS = """
UPDATE sandbox_webhooks w
SET due_at = %(lease_until)s, attempts = w.attempts + 1
WHERE w.msg_id IN (
    SELECT c.msg_id FROM sandbox_webhooks c
    WHERE c.status = 'pending' AND c.due_at <= %(now)s
      AND (c.prev_msg_id IS NULL OR NOT EXISTS (
            SELECT 1 FROM sandbox_webhooks p WHERE p.msg_id = c.prev_msg_id AND p.status = 'pending'))
    ORDER BY c.due_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING w.msg_id, w.channel, w.url, w.payload, w.attempts
"""

_RECORD_RESULTS = """
UPDATE sandbox_webhooks w
SET status = r.status,
    due_at = r.due_at,
    attempts = w.attempts + r.attempts_delta,
    last_http_status = COALESCE(r.http_status, w.last_http_status),
    last_error = r.error,
    sent_at = CASE WHEN r.status = 'sent' THEN r.finished_at ELSE w.sent_at END
FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::int[], %s::int[], %s::text[], %s::timestamptz[])
     AS r(msg_id, status, due_at, attempts_delta, http_status, error, finished_at)
WHERE w.msg_id = r.msg_id
"""


@dataclass(frozen=True)
class ChargeRow:
    """One ledger entry as stored."""

    id: str
    idempotency_key: str
    channel: str
    order_id: str
    amount: int
    currency: str
    webhook_url: str | None
    final_status: str
    failure_code: str | None
    created_at: datetime
    final_at: datetime


@dataclass(frozen=True)
class RefundRow:
    """One refund as stored (the ledger lists those not failed)."""

    id: str
    idempotency_key: str
    charge_id: str
    channel: str
    order_id: str
    amount: int
    currency: str
    webhook_url: str | None
    final_status: str
    failure_code: str | None
    created_at: datetime
    final_at: datetime


_REFUND_COLUMNS = (
    "id, idempotency_key, charge_id, channel, order_id, amount, currency, webhook_url,"
    " final_status, failure_code, created_at, final_at"
)


@dataclass(frozen=True)
class NewWebhook:
    """A webhook to queue together with its charge."""

    msg_id: str
    prev_msg_id: str | None
    event_type: str
    payload: str
    due_at: datetime


@dataclass(frozen=True)
class ClaimedWebhook:
    """A webhook leased to this process for one delivery attempt."""

    msg_id: str
    channel: str
    url: str
    payload: str
    attempts: int


@dataclass(frozen=True)
class DeliveryResult:
    """Outcome of one attempt, written back in batches by the dispatcher."""

    msg_id: str
    status: str  # 'pending' (retry later), 'sent' or 'dead'
    due_at: datetime
    attempts_delta: int  # -1 when a claimed row is handed back unsent
    http_status: int | None
    error: str | None
    finished_at: datetime


def ensure_database(dsn: str) -> None:
    """Create the database named in `dsn` if it does not exist, via the `postgres` maintenance db."""
    try:
        psycopg2.connect(dsn, connect_timeout=5).close()
        return
    except psycopg2.OperationalError as exc:
        first_error = exc
    params = psycopg2.extensions.parse_dsn(dsn)
    dbname = params.get("dbname")
    if not dbname:
        raise first_error
    admin = psycopg2.connect(**{**params, "dbname": "postgres", "connect_timeout": 5})
    try:
        admin.autocommit = True
        with admin.cursor() as cur:
            # CREATE DATABASE cannot run in a transaction, so a session-level advisory lock keeps two
            # workers booting together from both trying it.
            cur.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK_KEY,))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
            if cur.fetchone() is not None:
                return  # created meanwhile by another worker, or the first failure was transient
            log.info("creating database %s", dbname)
            try:
                cur.execute(f'CREATE DATABASE "{dbname.replace(chr(34), chr(34) * 2)}"')
            except (psycopg2.errors.DuplicateDatabase, psycopg2.errors.UniqueViolation):
                pass  # created by a process that does not take our lock
    finally:
        admin.close()  # also releases the advisory lock


def _schema_current(cur) -> bool:
    cur.execute("SELECT to_regclass('sandbox_schema') IS NOT NULL")
    if not cur.fetchone()[0]:
        return False
    cur.execute("SELECT EXISTS (SELECT 1 FROM sandbox_schema WHERE version = %s)", (_SCHEMA_VERSION,))
    return cur.fetchone()[0]


class Store:
    """Connection pool plus the handful of statements the sandbox needs (one or two per request)."""

    def __init__(self, dsn: str = DEFAULT_DATABASE_URL, *, maxconn: int = 20) -> None:
        ensure_database(dsn)
        # synchronous_commit=off: the sandbox is a test double, so losing the last few ms of writes on a
        # PostgreSQL crash is acceptable, and it roughly halves per-charge latency on a slow disk.
        self._pool = psycopg2.pool.ThreadedConnectionPool(
            1,
            maxconn,
            dsn,
            connect_timeout=5,
            application_name="sandbox_server",
            options="-c synchronous_commit=off -c TimeZone=UTC",
        )
        # ThreadedConnectionPool raises instead of waiting when exhausted; the semaphore makes callers
        # beyond maxconn wait for a free connection.
        self._slots = threading.BoundedSemaphore(maxconn)
        self.init_schema()

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.closeall()

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg2.extensions.connection]:
        """Borrow an autocommit connection; broken ones are discarded rather than returned."""
        with self._slots:
            conn = self._pool.getconn()
            if conn.closed:
                self._pool.putconn(conn, close=True)
                conn = self._pool.getconn()
            if not conn.autocommit:
                conn.autocommit = True
            broken = False
            try:
                yield conn
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                broken = True
                raise
            finally:
                self._pool.putconn(conn, close=broken or bool(conn.closed))

    def init_schema(self) -> None:
        """Create the tables if missing, unless this SCHEMA is already in place (then no DDL and no
        locks); serialised across processes by an advisory lock."""
        with self.connection() as conn:
            with conn.cursor() as cur:
                if _schema_current(cur):
                    return
            conn.autocommit = False
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                    if not _schema_current(cur):
                        cur.execute(SCHEMA)
                        cur.execute(_SCHEMA_VERSION_TABLE)
                        cur.execute(
                            "INSERT INTO sandbox_schema (version) VALUES (%s) ON CONFLICT DO NOTHING",
                            (_SCHEMA_VERSION,),
                        )
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            finally:
                conn.autocommit = True

    # --- the demo merchant's callback receiver ---------------------------------------------------

    def record_callback(
        self, *, webhook_id: str, order_id: str, event_type: str, signature: str, body: str
    ) -> None:
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO sandbox_merchant_callbacks (webhook_id, order_id, event_type, signature, body)"
                " VALUES (%s, %s, %s, %s, %s)",
                (webhook_id, order_id, event_type, signature, body),
            )

    def list_callbacks(self, order_id: str | None, limit: int = 1000) -> list[dict]:
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT webhook_id, order_id, event_type, received_at FROM sandbox_merchant_callbacks"
                " WHERE %s::text IS NULL OR order_id = %s ORDER BY id DESC LIMIT %s",
                (order_id, order_id, limit),
            )
            return [
                {"webhook_id": w, "order_id": o, "type": t, "received_at": r.isoformat()}
                for w, o, t, r in cur.fetchall()
            ]

    def ping(self) -> None:
        """Round trip to the database; raises if it is unreachable."""
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")

    # --- charges -------------------------------------------------------------------------------------

    def insert_charge(self, charge: ChargeRow, webhooks: Sequence[NewWebhook]) -> bool:
        """Insert the charge and its webhooks atomically; False if the idempotency key already exists."""
        params = {
            "id": charge.id,
            "idempotency_key": charge.idempotency_key,
            "channel": charge.channel,
            "order_id": charge.order_id,
            "amount": charge.amount,
            "currency": charge.currency,
            "webhook_url": charge.webhook_url,
            "final_status": charge.final_status,
            "failure_code": charge.failure_code,
            "created_at": charge.created_at,
            "final_at": charge.final_at,
        }
        if webhooks:
            sql = _INSERT_CHARGE_WITH_WEBHOOKS
            params.update(
                w_ids=[w.msg_id for w in webhooks],
                w_prev=[w.prev_msg_id for w in webhooks],
                w_types=[w.event_type for w in webhooks],
                w_payloads=[w.payload for w in webhooks],
                w_due=[w.due_at for w in webhooks],
            )
        else:
            sql = _INSERT_CHARGE
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone() is not None

    def get_charge_by_key(self, idempotency_key: str) -> ChargeRow | None:
        """The charge made under this idempotency key, if any."""
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(
                f"SELECT {_CHARGE_COLUMNS} FROM sandbox_charges WHERE idempotency_key = %s",
                (idempotency_key,),
            )
            row = cur.fetchone()
        return ChargeRow(*row) if row else None

    def list_charges(self, order_id: str | None, limit: int = 1000) -> list[ChargeRow]:
        """Ledger entries of one order (oldest first), or the most recent `limit` entries (newest first)."""
        with self.connection() as conn, conn.cursor() as cur:
            if order_id is None:
                cur.execute(
                    f"SELECT {_CHARGE_COLUMNS} FROM sandbox_charges ORDER BY created_at DESC, id LIMIT %s",
                    (limit,),
                )
            else:
                cur.execute(
                    f"SELECT {_CHARGE_COLUMNS} FROM sandbox_charges WHERE order_id = %s"
                    " ORDER BY created_at, id LIMIT %s",
                    (order_id, limit),
                )
            rows = cur.fetchall()
        return [ChargeRow(*row) for row in rows]

    def first_channel(self, order_id: str, channel: str) -> str:
        """Record `channel` as the first one asked for `order_id` unless one is already known; return it."""
        with self.connection() as conn, conn.cursor() as cur:
            # Two tries: when a concurrent request inserts the row after our statement's snapshot, ON
            # CONFLICT waits for it and does nothing, yet the SELECT half cannot see it; the retry can.
            for _ in range(2):
                cur.execute(
                    """
                    WITH ins AS (
                        INSERT INTO sandbox_order_first_channel (order_id, channel) VALUES (%s, %s)
                        ON CONFLICT (order_id) DO NOTHING RETURNING channel
                    )
                    SELECT channel FROM ins
                    UNION ALL
                    SELECT channel FROM sandbox_order_first_channel WHERE order_id = %s
                    LIMIT 1
                    """,
                    (order_id, channel, order_id),
                )
                row = cur.fetchone()
                if row is not None:
                    return row[0]
        raise RuntimeError(f"first channel of order {order_id!r} could not be read back")

    # --- refunds -------------------------------------------------------------------------------------

    def first_refund_try(self, idempotency_key: str) -> bool:
        """True the first time this refund key is seen by `first_refund_try` (row 72's 503), else False."""
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO sandbox_refund_first_tries (idempotency_key) VALUES (%s)"
                " ON CONFLICT DO NOTHING RETURNING idempotency_key",
                (idempotency_key,),
            )
            return cur.fetchone() is not None

    def insert_refund(self, refund: RefundRow, webhooks: Sequence[NewWebhook]) -> str:
        """Insert the refund unless it would take the charge's refunds past what was charged.

        "inserted", "exists" (the key is taken) or "exceeds". The charge row is locked for the
        check and the insert, so concurrent refunds of one charge are counted one after another.
        """
        with self.connection() as conn:
            conn.autocommit = False
            try:
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT amount FROM sandbox_charges WHERE id = %s FOR UPDATE", (refund.charge_id,)
                    )
                    (charged,) = cur.fetchone()
                    cur.execute(
                        "SELECT 1 FROM sandbox_refunds WHERE idempotency_key = %s", (refund.idempotency_key,)
                    )
                    if cur.fetchone() is not None:
                        conn.rollback()
                        return "exists"
                    cur.execute(
                        "SELECT COALESCE(sum(amount), 0) FROM sandbox_refunds"
                        " WHERE charge_id = %s AND final_status <> 'failed'",
                        (refund.charge_id,),
                    )
                    (taken,) = cur.fetchone()
                    if taken + refund.amount > charged:
                        conn.rollback()
                        return "exceeds"
                    cur.execute(
                        f"INSERT INTO sandbox_refunds ({_REFUND_COLUMNS})"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (
                            refund.id,
                            refund.idempotency_key,
                            refund.charge_id,
                            refund.channel,
                            refund.order_id,
                            refund.amount,
                            refund.currency,
                            refund.webhook_url,
                            refund.final_status,
                            refund.failure_code,
                            refund.created_at,
                            refund.final_at,
                        ),
                    )
                    for w in webhooks:
                        cur.execute(
                            "INSERT INTO sandbox_webhooks (msg_id, charge_id, prev_msg_id, channel, url,"
                            " event_type, payload, due_at, created_at)"
                            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                            (
                                w.msg_id,
                                refund.id,
                                w.prev_msg_id,
                                refund.channel,
                                refund.webhook_url,
                                w.event_type,
                                w.payload,
                                w.due_at,
                                refund.created_at,
                            ),
                        )
                conn.commit()
                return "inserted"
            except BaseException:
                conn.rollback()
                raise
            finally:
                conn.autocommit = True

    def get_refund_by_key(self, idempotency_key: str) -> RefundRow | None:
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(
                f"SELECT {_REFUND_COLUMNS} FROM sandbox_refunds WHERE idempotency_key = %s",
                (idempotency_key,),
            )
            row = cur.fetchone()
        return RefundRow(*row) if row else None

    def list_refunds(self, order_id: str | None, limit: int = 1000) -> list[RefundRow]:
        """Refunds made (not failed) of one order, oldest first, or the most recent `limit` ones."""
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(
                f"SELECT {_REFUND_COLUMNS} FROM sandbox_refunds"
                " WHERE final_status <> 'failed' AND (%s::text IS NULL OR order_id = %s)"
                " ORDER BY created_at, id LIMIT %s",
                (order_id, order_id, limit),
            )
            rows = cur.fetchall()
        return [RefundRow(*row) for row in rows]

    # --- webhooks ------------------------------------------------------------------------------------

    def claim_webhooks(self, now: datetime, lease_until: datetime, limit: int) -> list[ClaimedWebhook]:
        """Lease up to `limit` due webhooks to the caller (rows locked by another process are skipped)."""
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(_CLAIM_WEBHOOKS, {"now": now, "lease_until": lease_until, "limit": limit})
            rows = cur.fetchall()
        return [ClaimedWebhook(*row) for row in rows]

    def record_results(self, results: Sequence[DeliveryResult]) -> None:
        """Write a batch of delivery outcomes in one statement."""
        if not results:
            return
        columns = (
            [r.msg_id for r in results],
            [r.status for r in results],
            [r.due_at for r in results],
            [r.attempts_delta for r in results],
            [r.http_status for r in results],
            [r.error for r in results],
            [r.finished_at for r in results],
        )
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(_RECORD_RESULTS, columns)

    def webhook_counts(self) -> dict[str, int]:
        """Number of queued webhooks per status (for diagnostics)."""
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT status, count(*) FROM sandbox_webhooks GROUP BY status")
            return {status: count for status, count in cur.fetchall()}
