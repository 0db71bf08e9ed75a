"""The callback stage against a real local HTTP endpoint: claims, retries, exhaustion, resend."""

import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import connection
from django.utils import timezone
from standardwebhooks.webhooks import Webhook

from callbacks import services
from callbacks.models import CallbackAttempt, CallbackDelivery
from callbacks.selectors import callbacks_health
from orders.models import Merchant, Order, OrderTransition
from orders.transitions import order_transition
from tests.factories import OrderFactory, make_merchant, make_paid, make_paid_order


class Endpoint:
    def __init__(self, statuses: list[int], delay: float = 0.0) -> None:
        self.statuses = statuses
        self.received: list[dict] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay)
                endpoint.received.append({"headers": dict(self.headers.items()), "body": body.decode()})
                self.send_response(endpoint.statuses.pop(0) if endpoint.statuses else 200)
                self.end_headers()
                self.wfile.write(b"x" * 3000)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def endpoint():
    holder = {}

    def make(statuses, delay=0.0):
        holder["e"] = Endpoint(list(statuses), delay)
        return holder["e"]

    yield make
    if "e" in holder:
        holder["e"].close()


def make_due(order):
    CallbackDelivery.objects.filter(order=order).update(next_attempt_at="2000-01-01T00:00:00Z")


@pytest.mark.django_db
def test_delivered_callback_completes_the_order_signed(endpoint):
    e = endpoint([200])
    creds, order = make_paid_order(e.url)
    assert services.callback_deliver(order_id=order.pk) is True
    order.refresh_from_db()
    assert (order.status, order.outcome) == ("completed", "paid")
    body = Webhook(creds.webhook_secret).verify(e.received[0]["body"], e.received[0]["headers"])
    assert body["type"] == "order.paid"
    attempt = CallbackAttempt.objects.get(delivery__order=order)
    assert attempt.status_code == 200
    assert len(attempt.response_excerpt) == 1024


@pytest.mark.django_db
def test_failures_retry_on_the_stored_schedule_then_exhaust(endpoint, settings):
    settings.CALLBACK_RETRY_SCHEDULE = [1, 1]
    e = endpoint([500, 500, 500])
    _, order = make_paid_order(e.url)
    assert services.callback_deliver(order_id=order.pk) is False
    # not due yet: a second copy of the task makes no attempt
    assert services.callback_deliver(order_id=order.pk) is False
    assert len(e.received) == 1
    for _ in range(2):
        make_due(order)
        services.callback_deliver(order_id=order.pk)
    delivery = CallbackDelivery.objects.get(order=order)
    assert (delivery.status, delivery.attempts, delivery.next_attempt_at) == ("exhausted", 3, None)
    assert len({r["headers"]["webhook-id"] for r in e.received}) == 1
    assert Order.objects.get(pk=order.pk).status == "paid"
    # the operator's resend makes it due again with the same webhook-id
    services.callback_resend(delivery=delivery)
    e.statuses[:] = [200]
    services.callback_deliver(order_id=order.pk)
    assert Order.objects.get(pk=order.pk).status == "completed"
    assert len({r["headers"]["webhook-id"] for r in e.received}) == 1


@pytest.mark.django_db(transaction=True)
def test_two_copies_at_once_make_one_attempt(endpoint):
    e = endpoint([200], delay=0.3)
    _, order = make_paid_order(e.url)
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        try:
            services.callback_deliver(order_id=order.pk)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(e.received) == 1
    assert CallbackAttempt.objects.filter(delivery__order=order).count() == 1
    assert Order.objects.get(pk=order.pk).status == "completed"


@pytest.mark.django_db
def test_private_callback_url_refused_at_delivery_when_not_allowed(endpoint, settings):
    from callbacks.http import _session

    e = endpoint([200])
    # given: an order whose URL was accepted when it was set (say, before the address moved)
    _, order = make_paid_order(e.url)
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = False
    _session.cache_clear()
    try:
        services.callback_deliver(order_id=order.pk)
    finally:
        _session.cache_clear()
    assert e.received == []
    attempt = CallbackAttempt.objects.get(delivery__order=order)
    assert attempt.status_code is None
    assert attempt.error
    assert Order.objects.get(pk=order.pk).status == "paid"


def make_order_without_callback_url(outcome: str) -> Order:
    creds = make_merchant(callback_url="")
    order = OrderFactory(merchant=creds.merchant, callback_url="")
    if outcome == "paid":
        make_paid(order.pk)
    else:
        order_transition(order_id=order.pk, to="failed", seen_status="pending", reason="test")
    return Order.objects.get(pk=order.pk)


@pytest.mark.django_db
@pytest.mark.parametrize("outcome", ["paid", "failed"])
def test_an_order_with_no_callback_url_anywhere_completes_at_once_saying_why(outcome):
    # given an order with an outcome and no callback URL, neither its own nor its merchant's
    order = make_order_without_callback_url(outcome)
    # when the callback stage runs (twice, as a redelivery would)
    assert services.callback_deliver(order_id=order.pk) is False
    services.callback_deliver(order_id=order.pk)
    # then it is completed now, once, with the reason; nothing was attempted, nothing is exhausted
    order.refresh_from_db()
    assert (order.status, order.outcome) == ("completed", outcome)
    last = OrderTransition.objects.filter(order=order).latest("id")
    assert (last.from_status, last.to_status) == (outcome, "completed")
    assert last.reason == "no callback URL: nothing to deliver"
    assert OrderTransition.objects.filter(order=order, to_status="completed").count() == 1
    assert not CallbackDelivery.objects.filter(order=order).exists()
    assert not CallbackAttempt.objects.filter(delivery__order=order).exists()


@pytest.mark.django_db
def test_a_due_delivery_of_an_order_with_no_callback_url_stops_being_due():
    # given an operator's resend made before this order could be completed
    order = make_order_without_callback_url("paid")
    assert services.callback_resend_for_order(order_id=order.pk) == "scheduled"
    # when the callback stage runs
    services.callback_deliver(order_id=order.pk)
    # then the order is completed and the sweep has nothing left to hand out for it
    assert Order.objects.get(pk=order.pk).status == "completed"
    assert services.deliveries_due(batch=100) == []


@pytest.mark.django_db
def test_an_order_without_its_own_url_is_delivered_to_its_merchants(endpoint):
    # given a merchant whose callback URL was set after the order was taken without one
    e = endpoint([200])
    creds = make_merchant(callback_url="")
    order = OrderFactory(merchant=creds.merchant, callback_url="")
    make_paid(order.pk)
    Merchant.objects.filter(pk=creds.merchant.pk).update(callback_url=e.url)
    # when / then the merchant's URL is used
    assert services.callback_deliver(order_id=order.pk) is True
    assert len(e.received) == 1
    assert Order.objects.get(pk=order.pk).status == "completed"


@pytest.mark.django_db
def test_a_2xx_cut_off_by_the_total_timeout_is_not_counted_as_answered_2xx():
    # given three attempts in the last hour: a clean 2xx, a 2xx whose answer ran past the total
    # timeout (the status line came, the rest was dripped), and a 500
    now = timezone.now()
    delivery = CallbackDelivery.objects.create(
        order=OrderFactory(), event_type="order.paid", webhook_id="msg_1"
    )
    for status_code, error in [(200, ""), (200, "timeout: total 15 s exceeded"), (500, "")]:
        CallbackAttempt.objects.create(
            delivery=delivery, url="http://r.example/", attempted_at=now, status_code=status_code,
            latency_ms=5, error=error,
        )  # fmt: skip
    # when the console counts them
    health = callbacks_health(since=now - timedelta(hours=1))
    # then only the clean one answered 2xx
    assert (health.attempts, health.succeeded) == (3, 1)


@pytest.mark.django_db(transaction=True)
def test_an_attempt_that_fails_after_a_resent_one_delivered_leaves_the_delivery_delivered(settings):
    # given a receiver that holds its first request and then answers 500, and answers later ones
    # 200 at once; and no retry left after a failure (the last attempt)
    settings.CALLBACK_RETRY_SCHEDULE = []
    arrived, answer_first = threading.Event(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            first = not arrived.is_set()
            arrived.set()
            if first:
                answer_first.wait(30)
            self.send_response(500 if first else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _, order = make_paid_order(f"http://127.0.0.1:{server.server_port}/hook")

    def first_attempt():
        try:
            services.callback_deliver(order_id=order.pk)
        finally:
            connection.close()

    try:
        a = threading.Thread(target=first_attempt)
        a.start()
        assert arrived.wait(30)
        # when an operator resends while that attempt is in flight, and the resent one is delivered
        services.callback_resend(delivery=CallbackDelivery.objects.get(order=order))
        assert services.callback_deliver(order_id=order.pk) is True
        # and the first attempt's 500 comes back after
        answer_first.set()
        a.join(30)
    finally:
        answer_first.set()
        server.shutdown()
    # then the delivery stays delivered (before: the late failure made it exhausted, listed for an
    # operator to resend, with the order completed)
    delivery = CallbackDelivery.objects.get(order=order)
    assert (delivery.status, delivery.next_attempt_at, delivery.last_error) == ("delivered", None, "")
    assert Order.objects.get(pk=order.pk).status == "completed"
    # and both attempts are on the record, the late one with what it got
    assert sorted(
        CallbackAttempt.objects.filter(delivery=delivery).values_list("status_code", flat=True)
    ) == [
        200,
        500,
    ]
