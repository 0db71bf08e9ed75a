"""The sandbox's schema set-up beside workers already serving (gateway/sandbox_server/store.py)."""

import threading

import psycopg2

from gateway.sandbox_server.store import Store
from tests.sandbox.conftest import database_url_for


def test_a_worker_finding_its_schema_in_place_runs_no_ddl_beside_one_serving(sandbox_db):
    url = database_url_for(sandbox_db)
    Store(url, maxconn=2).close()  # the first worker to boot: creates the schema
    serving = psycopg2.connect(url)  # another worker, in the middle of writing a charge and a refund
    outcome: list[object] = []

    def boot() -> None:
        try:
            Store(url, maxconn=2).close()
            outcome.append("booted")
        except Exception as exc:  # reported below
            outcome.append(exc)

    try:
        with serving.cursor() as cur:
            cur.execute("LOCK TABLE sandbox_charges, sandbox_refunds IN ROW EXCLUSIVE MODE")
        late = threading.Thread(target=boot, daemon=True)
        late.start()
        late.join(timeout=10)
        # CREATE INDEX IF NOT EXISTS would wait here for a SHARE lock (and deadlock when the
        # serving transaction then needs a table the DDL already locked)
        assert outcome == ["booted"], "the booting worker waited on the serving worker's locks"
    finally:
        serving.rollback()
        serving.close()
        late.join(timeout=10)


def test_a_database_without_the_schema_gets_it_once(sandbox_db):
    url = database_url_for(sandbox_db)
    for _ in range(2):
        Store(url, maxconn=2).close()
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM sandbox_schema")
            assert cur.fetchone()[0] == 1
            cur.execute("SELECT to_regclass('sandbox_refund_first_tries') IS NOT NULL")
            assert cur.fetchone()[0]
    finally:
        conn.close()
