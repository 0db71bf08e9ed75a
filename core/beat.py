"""Beat on several machines, one scheduling at a time (SPEC 12): a PostgreSQL advisory lock.

Every beat process runs this scheduler. Before it sends anything it must hold a session-level
advisory lock on a connection of its own; the others stand by and try again every
BEAT_LOCK_RETRY_SECONDS. PostgreSQL drops a session lock with its connection, so when the active
beat dies (kill -9, a crashed machine, a network cut) the lock is freed without any lease to
expire: at once when the kernel closes the socket, and after the server's TCP keepalives give up
(about BEAT_LOCK_KEEPALIVE_SECONDS) when the machine vanished. A standby takes it on its next try.

Why PostgreSQL and not a lock in the broker (e.g. celery-redbeat): PostgreSQL is already the one
record every role shares, whatever the broker (Redis, Sentinel, RabbitMQ); a Redis lock with a TTL
needs renewing, can outlive its holder by the TTL, and a Sentinel failover can lose it (replication
is asynchronous), letting two beats schedule. An advisory lock lives exactly as long as the
session that holds it; the sweeps it schedules are idempotent anyway, the lock only keeps them
from being doubled.

The lock is per database (two stacks on two databases never block each other). It needs a real
session: through PgBouncer in transaction mode, point BEAT_LOCK_DATABASE_URL at PostgreSQL
itself (or a session-mode pool).
"""

import logging
import time
import zlib

import psycopg2
from celery.beat import PersistentScheduler
from django.conf import settings

logger = logging.getLogger(__name__)

# pg_try_advisory_lock's one-bigint form; stable across processes and Python versions.
LOCK_KEY = zlib.crc32(b"payments.beat") or 1
# How often an active beat checks that its session (and so its lock) is still there.
CHECK_SECONDS = 1.0


def _dsn_kwargs() -> dict:
    """BEAT_LOCK_DATABASE_URL if set, else the database the app uses (read now: the tests switch
    the connection to their test database)."""
    from django.db import connections

    if settings.BEAT_LOCK_DATABASE_URL:
        return {"dsn": settings.BEAT_LOCK_DATABASE_URL}
    db = connections["default"].settings_dict
    params = {"dbname": db["NAME"], "user": db.get("USER"), "password": db.get("PASSWORD")}
    params.update(host=db.get("HOST") or None, port=db.get("PORT") or None)
    return {key: value for key, value in params.items() if value}


def _connect() -> "psycopg2.extensions.connection":
    idle = max(int(settings.BEAT_LOCK_KEEPALIVE_SECONDS) // 3, 1)
    conn = psycopg2.connect(
        **_dsn_kwargs(),
        connect_timeout=5,
        application_name="payments-beat",
        # Client side: a vanished server is noticed within about BEAT_LOCK_KEEPALIVE_SECONDS.
        keepalives=1,
        keepalives_idle=idle,
        keepalives_interval=idle,
        keepalives_count=2,
        tcp_user_timeout=int(settings.BEAT_LOCK_KEEPALIVE_SECONDS * 1000),
        # Server side: a vanished beat's session (and lock) is dropped within the same bound.
        options=(
            f"-c tcp_keepalives_idle={idle} -c tcp_keepalives_interval={idle}"
            " -c tcp_keepalives_count=2 -c statement_timeout=5000"
            f" -c tcp_user_timeout={int(settings.BEAT_LOCK_KEEPALIVE_SECONDS * 1000)}"
        ),
    )
    conn.autocommit = True
    return conn


class BeatLock:
    """The advisory lock, held on a connection of its own for as long as the process lives."""

    def __init__(self) -> None:
        self.conn = None
        self.held = False
        self.checked_at = 0.0

    def hold(self) -> bool:
        """True while this process holds the lock (taking it if it is free)."""
        now = time.monotonic()
        if self.held and now - self.checked_at < CHECK_SECONDS:
            return True
        try:
            if self.conn is None or self.conn.closed:
                self.conn = _connect()
            with self.conn.cursor() as cursor:
                if self.held:
                    # Same session, so the lock is still ours; a lost session raises here.
                    cursor.execute("SELECT 1")
                else:
                    cursor.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
                    if cursor.fetchone()[0]:
                        self.held = True
                        # INFO: every start takes it, and a takeover is the design working.
                        logger.info("beat.lock_acquired", extra={"lock_key": LOCK_KEY})
        except psycopg2.Error as exc:
            event = "beat.lock_lost" if self.held else "beat.lock_unreachable"
            logger.warning(event, extra={"error": repr(exc)})
            self.release()
            return False
        self.checked_at = now
        return self.held

    def release(self) -> None:
        self.held = False
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg2.Error:
                pass
            self.conn = None


class LockedScheduler(PersistentScheduler):
    """Celery's scheduler, sending only while this process holds the beat lock."""

    def __init__(self, *args, **kwargs) -> None:
        self.lock = BeatLock()
        super().__init__(*args, **kwargs)

    def tick(self, *args, **kwargs) -> float:
        if not self.lock.hold():
            # Standing by: the entries' next runs are recomputed from their last runs when the
            # lock comes, so a new holder sends whatever fell due while nobody held it.
            return settings.BEAT_LOCK_RETRY_SECONDS
        return min(super().tick(*args, **kwargs), CHECK_SECONDS)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.lock.release()
