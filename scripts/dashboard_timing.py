"""Time the operators' console against the configured database (seed it with seed_million.py first).

    DATABASE_URL=postgres://payments@127.0.0.1:55432/payments_million \\
        .venv/bin/python scripts/dashboard_timing.py [--runs 10]

Renders /admin/dashboard/ (and the big order lists) through Django's test client as a staff
user, in this process, as many times as asked after one warm-up, and prints wall time per
request (min / median / max) and the number of SQL queries each request made.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

import django

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402

from orders.models import Order  # noqa: E402


def _pages() -> list[tuple[str, str]]:
    newest = Order.objects.order_by("-created_at").values_list("id", "reference").first()
    pages = [
        ("dashboard", "/admin/dashboard/"),
        ("order list", "/admin/orders/order/"),
        ("order list, status=completed", "/admin/orders/order/?status__exact=completed"),
        ("order list, outcome=failed", "/admin/orders/order/?outcome__exact=failed"),
        ("order list, channel=sandbox-b", "/admin/orders/order/?channel=sandbox-b"),
        ("charge attempts list", "/admin/gateway/chargeattempt/"),
        ("callback deliveries, exhausted", "/admin/callbacks/callbackdelivery/?status__exact=exhausted"),
        ("channels list", "/admin/allocation/paymentchannel/"),
        ("/metrics", "/metrics"),
    ]
    if newest:
        order_id, reference = newest
        pages += [
            ("order search by reference", f"/admin/orders/order/?q={reference}"),
            ("order search by id", f"/admin/orders/order/?q={order_id}"),
            ("order page", f"/admin/orders/order/{order_id}/change/"),
        ]
    return pages


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--only-dashboard", action="store_true")
    args = parser.parse_args()

    user, _ = get_user_model().objects.get_or_create(
        username="console-timing", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(user)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM orders_order")
        orders = cursor.fetchone()[0]
    database = connection.settings_dict["NAME"]
    print(f"database {database}: {orders:,} orders; {args.runs} runs after one warm-up\n")
    print(f"{'page':<34} {'min':>8} {'median':>8} {'max':>8} {'queries':>8}")
    pages = _pages()[:1] if args.only_dashboard else _pages()
    for name, url in pages:
        response = client.get(url)
        assert response.status_code == 200, (url, response.status_code)
        timings = []
        for _ in range(args.runs):
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.get(url)
                if hasattr(response, "render") and not response.is_rendered:
                    response.render()
                timings.append(time.perf_counter() - started)
            assert response.status_code == 200, (url, response.status_code)

        def ms(value: float) -> str:
            return f"{value * 1000:.1f}ms"

        print(
            f"{name:<34} {ms(min(timings)):>8} {ms(statistics.median(timings)):>8} "
            f"{ms(max(timings)):>8} {len(queries):>8}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
