"""One beat schedules at a time (SPEC 12): the PostgreSQL advisory lock of core/beat.py, on the
test database. tests/scale/test_scale.py runs two real beats and kills the active one."""

import time

import psycopg2
import pytest

from core.beat import LOCK_KEY, BeatLock, _connect
from tests.e2e.conftest import wait_for


@pytest.fixture
def locks(transactional_db):
    made: list[BeatLock] = []

    def make() -> BeatLock:
        made.append(BeatLock())
        return made[-1]

    yield make
    for lock in made:
        lock.release()


def test_one_holder_at_a_time_and_the_next_takes_over_when_it_goes(locks):
    first, second = locks(), locks()
    assert first.hold()
    assert not second.hold()
    assert first.hold()  # still its own
    # the holder's process dies: its session closes, PostgreSQL drops the lock with it (the
    # backend ends a moment after the socket closes: a bounded wait)
    first.conn.close()
    wait_for(second.hold, 5, "the lock to pass to the second")
    first.held = False
    assert not first.hold()


def test_a_holder_whose_session_is_cut_stops_scheduling(locks):
    holder, standby = locks(), locks()
    assert holder.hold()
    pid = holder.conn.get_backend_pid()
    admin = _connect()
    try:
        with admin.cursor() as cursor:
            # waits (up to 5 s) for the backend to end
            cursor.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    finally:
        admin.close()
    # PostgreSQL released the lock with the session: the standby gets it
    wait_for(standby.hold, 5, "the lock to pass to the standby")
    holder.checked_at = time.monotonic() - 10  # its next liveness check is due
    assert not holder.hold()
    assert holder.conn is None


def test_the_lock_is_per_database(locks):
    from django.db import connections

    lock = locks()
    assert lock.hold()
    db = connections["default"].settings_dict
    other = psycopg2.connect(dbname="postgres", user=db["USER"], host=db["HOST"], port=db["PORT"])
    other.autocommit = True
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
            assert cursor.fetchone()[0]  # another database's stack has a beat lock of its own
    finally:
        other.close()
