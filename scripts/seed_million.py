"""Insert N completed orders (default 1,000,000) fast, with SQL generate_series, for console timing.

    DATABASE_URL=postgres://payments@127.0.0.1:55432/payments_million \\
        .venv/bin/python scripts/seed_million.py [--count 1000000] [--days 7] [--orders-only]

Orders are spread evenly over the last `--days` days (so the last hour holds count/(24*days) of
them, like a steady production day), each completed 0.2-3 s after creation (one in fifty after
a callback retry, up to a minute), 2 % failed, on the sandbox channels. Ids are UUIDv7 built
from created_at, like the API's. Each order also gets its charge attempt and its delivered
callback (delivery and attempt), so the console's reads of those tables are timed at full size
too (--orders-only skips them). Batches of 100,000 orders, one statement and transaction each;
ANALYZE at the end so the planner (and the console's estimated counts) know the tables.
Point it at a database of its own: as far as any query can tell, these are real orders.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

import django

django.setup()

from django.db import connection, transaction  # noqa: E402

from orders.models import Merchant  # noqa: E402
from orders.services import merchant_create  # noqa: E402

BATCH = 100_000
MERCHANT = "seed-million"
TABLES = ("orders_order", "gateway_chargeattempt", "callbacks_callbackdelivery", "callbacks_callbackattempt")

_ORDERS = """
INSERT INTO orders_order (
    id, merchant_id, reference, amount, currency, description, metadata, callback_url,
    status, outcome, channel, failure_code, failure_message, request_id,
    created_at, updated_at, completed_at, next_check_at, check_count)
SELECT
    -- UUIDv7: 48 bits of Unix milliseconds, version 7, pseudo-random bits, variant 10.
    (lpad(to_hex((extract(epoch FROM s.created_at) * 1000)::bigint), 12, '0')
        || '7' || substr(md5(%(tag)s || s.n), 1, 3)
        || '8' || substr(md5(s.n || %(tag)s), 1, 15))::uuid,
    %(merchant)s, %(tag)s || '-' || s.n, s.amount, s.currency, '', '{}'::jsonb, 'http://127.0.0.1:9/hook',
    'completed', CASE WHEN s.failed THEN 'failed' ELSE 'paid' END, s.channel,
    CASE WHEN s.failed THEN 'card_declined' END,
    CASE WHEN s.failed THEN 'The provider declined the payment: card_declined.' END,
    '', s.created_at, s.created_at + s.latency, s.created_at + s.latency, NULL, 0
FROM (
    SELECT
        g AS n,
        now() - (%(span)s * (g::float8 / %(total)s)) * interval '1 second' AS created_at,
        CASE WHEN g %% 50 = 0 THEN interval '1 second' * (5 + random() * 55)
             ELSE interval '1 millisecond' * (200 + random() * 2800) END AS latency,
        g %% 50 = 7 AS failed,
        (ARRAY['USD', 'EUR', 'GBP', 'JPY'])[1 + g %% 4] AS currency,
        (ARRAY['sandbox-a', 'sandbox-b', 'sandbox-a', 'sandbox-jp'])[1 + g %% 4] AS channel,
        100 + (g::bigint * 7919) %% 500000 AS amount
    FROM generate_series(%(start)s, %(stop)s) AS g
) AS s
"""

# The same orders with their history, in one statement through data-modifying CTEs.
_WITH_HISTORY = (
    "WITH o AS ("
    + _ORDERS
    + """ RETURNING id, channel, outcome, created_at, completed_at),
a AS (
    INSERT INTO gateway_chargeattempt (order_id, channel, provider, idempotency_key, status,
        provider_reference, http_status, error, failure_code, webhook_url, created_at, updated_at)
    SELECT id, channel, 'sandbox', id::text || ':' || channel, outcome, 'sbx_' || md5(id::text), 201, '',
        CASE WHEN outcome = 'failed' THEN 'card_declined' ELSE '' END,
        'http://127.0.0.1:8000/api/v1/gateway/webhooks/sandbox',
        created_at + interval '20 milliseconds', completed_at - interval '50 milliseconds'
    FROM o
),
d AS (
    INSERT INTO callbacks_callbackdelivery (order_id, event_type, webhook_id, status, attempts,
        next_attempt_at, last_error, created_at, delivered_at)
    SELECT id, 'order.' || outcome, 'msg_' || md5(id::text), 'delivered', 1, NULL, '',
        completed_at - interval '40 milliseconds', completed_at
    FROM o
    RETURNING id, delivered_at
)
INSERT INTO callbacks_callbackattempt (delivery_id, url, attempted_at, status_code, latency_ms, error,
    response_excerpt)
SELECT id, 'http://127.0.0.1:9/hook', delivered_at - interval '30 milliseconds', 200, 25, '', '{"ok": true}'
FROM d
"""
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--orders-only", action="store_true", help="no charge attempts or callbacks")
    args = parser.parse_args()
    sql = _ORDERS if args.orders_only else _WITH_HISTORY

    merchant = Merchant.objects.filter(name=MERCHANT).first() or merchant_create(name=MERCHANT).merchant
    tag = f"seed{int(time.time())}"  # references stay unique per merchant across runs
    params = {"merchant": merchant.pk, "tag": tag, "span": args.days * 86400, "total": args.count}
    started = time.monotonic()
    for start in range(1, args.count + 1, BATCH):
        stop = min(start + BATCH - 1, args.count)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, {**params, "start": start, "stop": stop})
        print(f"  {stop:>9,} orders  {time.monotonic() - started:6.1f} s", flush=True)
    with connection.cursor() as cursor:
        for table in TABLES:
            cursor.execute(f"ANALYZE {table}")
        cursor.execute("SELECT count(*) FROM orders_order")
        total = cursor.fetchone()[0]
    elapsed = time.monotonic() - started
    print(f"inserted {args.count:,} completed orders in {elapsed:.1f} s; the table holds {total:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
