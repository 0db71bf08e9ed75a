"""Hostile callback receivers (SPEC 9): a slow, huge or malformed answer costs one bounded, recorded
attempt, counts toward exhaustion, and never takes more than its merchant's share of the workers.

Each receiver is a raw socket on loopback speaking as much HTTP as it likes, served by threads in
the test process. A receiver that drips "forever" drips until the test ends; a safety cap closes
it after SAFETY_SECONDS, so a regression fails (wrong error) instead of hanging the suite.
"""

import socket
import threading
import time
from collections.abc import Callable

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from callbacks import http as callback_http
from callbacks.models import CallbackAttempt, CallbackDelivery
from callbacks.services import callback_deliver, deliveries_announce
from orders.models import Order, OrderTransition
from tests.factories import OrderFactory, make_paid, make_paid_order
from tests.peers import LoopbackServer, read_http_request

SAFETY_SECONDS = 60.0
DRIP_INTERVAL = 0.05
TIMEOUT_ERROR = "timeout: total 1 s exceeded"


class RawReceiver(LoopbackServer):
    """A loopback receiver that reads each request (unless told not to) and hands the socket to
    `answer(conn, stop)`."""

    def __init__(self, answer: Callable[[socket.socket, threading.Event], None], read: bool = True) -> None:
        self.answer = answer
        self.read = read
        self.requests: list[bytes] = []
        super().__init__()
        self.stop = self.done
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def handle(self, conn: socket.socket) -> None:
        if self.read:
            self.requests.append(read_http_request(conn).partition(b"\r\n\r\n")[0])
        self.answer(conn, self.stop)


def drip(conn: socket.socket, stop: threading.Event, data: bytes) -> None:
    """Send `data` now, then one byte every DRIP_INTERVAL until the test ends."""
    conn.sendall(data)
    started = time.monotonic()
    while not stop.wait(DRIP_INTERVAL) and time.monotonic() - started < SAFETY_SECONDS:
        conn.sendall(b"x")


@pytest.fixture
def receivers():
    made: list[RawReceiver] = []

    def make(answer, read: bool = True) -> RawReceiver:
        made.append(RawReceiver(answer, read))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
def small_bounds(settings):
    settings.CALLBACK_CONNECT_TIMEOUT = 1.0
    settings.CALLBACK_TOTAL_TIMEOUT = 1.0
    callback_http._session.cache_clear()  # its default timeouts are built from the settings
    yield
    callback_http._session.cache_clear()


def only_attempt(order) -> CallbackAttempt:
    return CallbackAttempt.objects.get(delivery__order=order)


def assert_waits_for_retry(order, attempts: int = 1) -> None:
    delivery = CallbackDelivery.objects.get(order=order)
    assert (delivery.status, delivery.attempts) == ("pending", attempts)
    assert delivery.next_attempt_at is not None
    assert Order.objects.get(pk=order.pk).status == "paid"


# --- slow receivers: the whole attempt is bounded by wall clock --------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "sent_first",
    [
        pytest.param(b"", id="nothing-then-drips-the-status-line"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Slow: ", id="slow-headers"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", id="dripping-body-after-200"),
    ],
)
def test_a_dripping_receiver_costs_one_bounded_failed_attempt(small_bounds, receivers, sent_first):
    # given a receiver that answers a byte every 50 ms, forever: no single read ever times out
    receiver = receivers(lambda conn, stop: drip(conn, stop, sent_first))
    _, order = make_paid_order(receiver.url)
    # when the callback is delivered (with a 1 s total bound)
    delivered = callback_deliver(order_id=order.pk)
    # then the call came back, the attempt is recorded as a timeout, and it counts toward exhaustion
    assert delivered is False
    assert len(receiver.requests) == 1
    attempt = only_attempt(order)
    assert attempt.error == TIMEOUT_ERROR
    assert CallbackDelivery.objects.get(order=order).last_error == TIMEOUT_ERROR
    assert_waits_for_retry(order)


@pytest.mark.django_db
def test_a_receiver_dripping_its_tls_handshake_is_bounded_by_the_total(small_bounds, receivers, settings):
    # given an https receiver that starts a 16 KiB TLS handshake record and drips it, and a
    # connect timeout (which bounds the handshake) longer than the total: the total must win
    settings.CALLBACK_CONNECT_TIMEOUT = 5.0
    receiver = receivers(lambda conn, stop: drip(conn, stop, b"\x16\x03\x03\x40\x00"), read=False)
    _, order = make_paid_order(receiver.url.replace("http://", "https://"))
    # when / then
    assert callback_deliver(order_id=order.pk) is False
    assert only_attempt(order).error == TIMEOUT_ERROR
    assert_waits_for_retry(order)


@pytest.mark.django_db
def test_a_dripping_receiver_exhausts_the_delivery_on_schedule(small_bounds, receivers, settings):
    # given one retry allowed and a receiver that never finishes its status line
    settings.CALLBACK_RETRY_SCHEDULE = [1]
    receiver = receivers(lambda conn, stop: drip(conn, stop, b"HTTP/1.1 2"))
    _, order = make_paid_order(receiver.url)
    # when both attempts are made
    callback_deliver(order_id=order.pk)
    CallbackDelivery.objects.filter(order=order).update(next_attempt_at="2000-01-01T00:00:00Z")
    callback_deliver(order_id=order.pk)
    # then both are recorded timeouts and the delivery is exhausted, for an operator to see
    errors = list(CallbackAttempt.objects.filter(delivery__order=order).values_list("error", flat=True))
    assert errors == [TIMEOUT_ERROR, TIMEOUT_ERROR]
    delivery = CallbackDelivery.objects.get(order=order)
    assert (delivery.status, delivery.attempts, delivery.next_attempt_at) == ("exhausted", 2, None)
    assert Order.objects.get(pk=order.pk).status == "paid"


@pytest.mark.django_db
def test_a_silent_receiver_is_bounded_too(small_bounds, receivers):
    # given a receiver that reads the request and never answers a byte
    receiver = receivers(lambda conn, stop: stop.wait(SAFETY_SECONDS))
    _, order = make_paid_order(receiver.url)
    # when / then: a failed attempt, recorded (a read timeout or the total bound, whichever first)
    assert callback_deliver(order_id=order.pk) is False
    assert only_attempt(order).error
    assert only_attempt(order).status_code is None
    assert_waits_for_retry(order)


def test_a_shorter_deadline_is_kept_while_a_longer_attempt_is_in_flight(receivers, settings):
    # given one attempt in flight to a dripping receiver with a 30 s total (another thread)
    first = receivers(lambda conn, stop: drip(conn, stop, b"HTTP/1.1 2"))
    settings.CALLBACK_CONNECT_TIMEOUT, settings.CALLBACK_TOTAL_TIMEOUT = 1.0, 30.0
    results = []
    longer = threading.Thread(
        target=lambda: results.append(callback_http.post_json(url=first.url, body="{}", headers={})),
        daemon=True,
    )
    longer.start()
    deadline = time.monotonic() + 10
    while not first.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.requests, "the first attempt never reached its receiver"
    # when a second attempt, with a 1 s total, meets a dripping receiver too
    second = receivers(lambda conn, stop: drip(conn, stop, b"HTTP/1.1 2"))
    settings.CALLBACK_TOTAL_TIMEOUT = 1.0
    ended = callback_http.post_json(url=second.url, body="{}", headers={})
    # then it ends at its own deadline, not the earlier attempt's: that one is still running
    assert ended.error == TIMEOUT_ERROR
    assert longer.is_alive()
    # and one thread watches both deadlines, none is started per attempt
    threads = threading.enumerate()
    assert [t.name for t in threads].count("http-deadline-reaper") == 1
    assert not [t for t in threads if isinstance(t, threading.Timer)]
    first.close()  # ends the first attempt: its receiver hangs up
    longer.join(10)
    assert not longer.is_alive() and results and not results[0].ok


# --- huge answers: bounded reads -----------------------------------------------------------------


def endless_body(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    block = b"A" * 65536
    started = time.monotonic()
    while not stop.is_set() and time.monotonic() - started < SAFETY_SECONDS:
        conn.sendall(block)


@pytest.mark.django_db
def test_an_endless_body_is_read_only_as_far_as_the_excerpt(receivers):
    # given a receiver that accepts and then streams body without end
    receiver = receivers(endless_body)
    _, order = make_paid_order(receiver.url)
    # when
    delivered = callback_deliver(order_id=order.pk)
    # then the 200 counts, and 1 KiB of the body is kept
    assert delivered is True
    attempt = only_attempt(order)
    assert (attempt.status_code, attempt.error, attempt.response_excerpt) == (200, "", "A" * 1024)
    assert Order.objects.get(pk=order.pk).status == "completed"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\n" + b"X-Big: y\r\n" * 5000 + b"\r\n", id="too-many-headers"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Big: " + b"y" * 200_000 + b"\r\n\r\n", id="huge-header"),
        pytest.param(b"HTTP/1.1 200 " + b"O" * 200_000 + b"\r\n\r\n", id="huge-status-line"),
    ],
)
def test_huge_headers_are_a_recorded_failed_attempt(receivers, head):
    receiver = receivers(lambda conn, stop: conn.sendall(head))
    _, order = make_paid_order(receiver.url)
    assert callback_deliver(order_id=order.pk) is False
    attempt = only_attempt(order)
    assert attempt.error
    assert len(attempt.error) <= 500
    assert_waits_for_retry(order)


# --- malformed bytes: stored safely ------------------------------------------------------------


def answer(raw: bytes):
    return lambda conn, stop: conn.sendall(raw)


@pytest.mark.django_db
def test_a_nul_bearing_accepted_answer_completes_the_order_with_a_safe_excerpt(receivers):
    # given a receiver that accepts with a body holding NUL bytes and invalid UTF-8
    body = b"ok\x00\x00accepted\xff\xfe\xc3("
    receiver = receivers(answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))
    _, order = make_paid_order(receiver.url)
    # when
    delivered = callback_deliver(order_id=order.pk)
    # then the delivery and the move to completed stand, and what the peer said is kept, made safe
    assert delivered is True
    assert Order.objects.get(pk=order.pk).status == "completed"
    attempt = only_attempt(order)
    assert attempt.status_code == 200
    assert "\x00" not in attempt.response_excerpt
    assert attempt.response_excerpt.startswith("ok\ufffd\ufffdaccepted")
    assert CallbackDelivery.objects.get(order=order).status == "delivered"


@pytest.mark.django_db
def test_a_nul_bearing_refusal_is_a_recorded_failed_attempt(receivers):
    body = b"\x00" * 2000
    receiver = receivers(answer(b"HTTP/1.1 500 Oops\x00\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))
    _, order = make_paid_order(receiver.url)
    assert callback_deliver(order_id=order.pk) is False
    attempt = only_attempt(order)
    assert attempt.status_code == 500
    assert attempt.response_excerpt == "\ufffd" * 1024
    assert_waits_for_retry(order)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"HTTP/1.1 2\x0000 OK\r\n\r\n", id="nul-in-status"),
        pytest.param(b"\x00\xff\xfe garbage \x00\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\x00\r\n", id="bad-chunk"),
        pytest.param(b"", id="hangs-up"),
    ],
)
def test_a_malformed_answer_is_a_recorded_failed_attempt(receivers, raw):
    receiver = receivers(answer(raw))
    _, order = make_paid_order(receiver.url)
    assert callback_deliver(order_id=order.pk) is False
    attempt = only_attempt(order)
    assert attempt.error
    assert "\x00" not in attempt.error + attempt.response_excerpt
    assert_waits_for_retry(order)


@pytest.mark.django_db
def test_an_answer_that_cannot_be_stored_becomes_a_recorded_failed_attempt(receivers):
    # given a receiver whose answer the database refuses to store (a constraint stands in for any
    # storage error after the claim; it is rolled back with the test)
    with connection.cursor() as cursor:
        cursor.execute(
            "ALTER TABLE callbacks_callbackattempt ADD CONSTRAINT test_refuse_poison"
            " CHECK (response_excerpt NOT LIKE '%%poison%%')"
        )
    receiver = receivers(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\npoison"))
    _, order = make_paid_order(receiver.url)
    # when
    delivered = callback_deliver(order_id=order.pk)
    # then no exception, no silent lease-and-resend: a failed attempt saying why, retried on schedule
    assert delivered is False
    attempt = only_attempt(order)
    assert attempt.status_code == 200
    assert attempt.error.startswith("could not record the answer: IntegrityError"), attempt.error
    assert_waits_for_retry(order)


# --- redirects: never followed ------------------------------------------------------------------


@pytest.mark.django_db
def test_a_redirecting_receiver_is_not_followed(receivers):
    # given a receiver that redirects to itself (a loop) and then keeps talking
    holder: dict[str, RawReceiver] = {}

    def redirect(conn, stop):
        conn.sendall(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:%d/again\r\n"
            b"Content-Length: 0\r\n\r\n" % holder["r"].port
        )

    holder["r"] = receivers(redirect)
    _, order = make_paid_order(holder["r"].url)
    # when
    delivered = callback_deliver(order_id=order.pk)
    # then one request only, a failed attempt with the redirect's status
    assert delivered is False
    assert len(holder["r"].requests) == 1
    assert holder["r"].requests[0].startswith(b"POST /hook ")
    attempt = only_attempt(order)
    assert (attempt.status_code, attempt.error) == (307, "")
    assert_waits_for_retry(order)


# --- capacity: one receiver gets its share, not the workers ------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def deliver_in_background(order_id, results: dict, name: str) -> threading.Thread:
    """callback_deliver in a thread of its own (so on a connection of its own); its answer goes
    into `results[name]`."""

    def run():
        try:
            results[name] = callback_deliver(order_id=order_id)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_a_slow_receiver_holds_no_more_than_its_merchants_share_of_workers(receivers, settings):
    # given one slot per merchant, and merchant A's receiver holding its first callback open
    settings.CALLBACK_RECEIVER_CONCURRENCY = 1
    settings.CALLBACK_RECEIVER_BUSY_SECONDS = 3600  # a deferred delivery stays not due in this test
    release = threading.Event()

    def held_open(conn, stop):
        release.wait(SAFETY_SECONDS)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    slow = receivers(held_open)
    fast = receivers(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    creds_a, first = make_paid_order(slow.url)
    second = OrderFactory(merchant=creds_a.merchant, callback_url=slow.url)
    make_paid(second.pk)
    _, other = make_paid_order(fast.url)

    worker = deliver_in_background(first.pk, {}, "first")
    try:
        wait_until(lambda: len(slow.requests) == 1)
        # when a second callback of the same merchant and one of another merchant come up
        second_delivered = callback_deliver(order_id=second.pk)
        other_delivered = callback_deliver(order_id=other.pk)
        # (and the waiting one, due again and queued by the sweep while the slot is still held,
        # waits again)
        CallbackDelivery.objects.filter(order=second).update(
            next_attempt_at="2000-01-01T00:00:00Z", announced_at=timezone.now()
        )
        second_again = callback_deliver(order_id=second.pk)
    finally:
        release.set()
        worker.join()
    # then the other merchant was served; the same merchant's second callback waits its turn,
    # without a request and without spending an attempt
    assert other_delivered is True
    assert (second_delivered, second_again) == (False, False)
    assert len(slow.requests) == 1
    waiting = CallbackDelivery.objects.get(order=second)
    assert (waiting.status, waiting.attempts) == ("pending", 0)
    assert waiting.next_attempt_at > timezone.now()
    assert not CallbackAttempt.objects.filter(delivery=waiting).exists()
    assert Order.objects.get(pk=first.pk).status == "completed"
    # and once the slot is free, its turn comes: the sweep queues it as soon as it is due (the
    # push-back took the sweep's message; before, it waited a whole lease to be queued again)
    CallbackDelivery.objects.filter(pk=waiting.pk).update(next_attempt_at="2000-01-01T00:00:00Z")
    assert (str(second.pk), None) in deliveries_announce(batch=100)
    assert callback_deliver(order_id=second.pk) is True
    assert len(slow.requests) == 2
    assert OrderTransition.objects.filter(order_id=second.pk, to_status="completed").count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_healthy_receivers_burst_waits_a_moment_for_a_slot_instead_of_being_pushed_back(
    receivers, settings
):
    # given one slot per merchant, held by a callback whose answer comes when we say so
    settings.CALLBACK_RECEIVER_CONCURRENCY = 1
    settings.CALLBACK_RECEIVER_WAIT_SECONDS = SAFETY_SECONDS
    release = threading.Event()

    def answers_when_released(conn, stop):
        release.wait(SAFETY_SECONDS)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    receiver = receivers(answers_when_released)
    creds, first = make_paid_order(receiver.url)
    second = OrderFactory(merchant=creds.merchant, callback_url=receiver.url)
    make_paid(second.pk)
    results: dict[str, bool] = {}
    holder = deliver_in_background(first.pk, results, "first")
    wait_until(lambda: len(receiver.requests) == 1)
    # when the merchant's next callback comes up while the slot is taken
    waiter = deliver_in_background(second.pk, results, "second")
    with connection.cursor() as cursor:  # it queues for the slot (pg_locks is read live)
        wait_until(
            lambda: (
                cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                or cursor.fetchone()[0] >= 1
            )
        )
    release.set()
    holder.join()
    waiter.join()
    # then it was sent as soon as the slot was free, not pushed back by seconds
    assert results == {"first": True, "second": True}
    assert len(receiver.requests) == 2
    assert Order.objects.get(pk=second.pk).status == "completed"


OK_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
ERROR_500 = b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"


def first_fails_then(then: Callable[[socket.socket, threading.Event], None]):
    """A receiver that answers its first request 500 and every later one with `then`."""
    seen = []

    def script(conn, stop):
        seen.append(1)
        if len(seen) == 1:
            conn.sendall(ERROR_500)
        else:
            then(conn, stop)

    return script


def due_again(order) -> None:
    CallbackDelivery.objects.filter(order=order).update(next_attempt_at="2000-01-01T00:00:00Z")


@pytest.mark.django_db(transaction=True)
def test_struggling_receivers_share_a_few_workers_and_never_wait_for_a_slot(receivers, settings):
    # given one slot per merchant, one slot shared by all struggling receivers, and a wait for a
    # merchant's slot long enough to hang this test if it were taken
    settings.CALLBACK_RECEIVER_CONCURRENCY = 1
    settings.CALLBACK_STRUGGLING_CONCURRENCY = 1
    settings.CALLBACK_RECEIVER_WAIT_SECONDS = SAFETY_SECONDS
    settings.CALLBACK_RECEIVER_BUSY_SECONDS = 3600  # a deferred delivery stays not due in this test
    release = threading.Event()

    def held_open(conn, stop):
        release.wait(SAFETY_SECONDS)
        conn.sendall(OK_200)

    # merchants A and B whose receivers failed their first callback (500): both are struggling now
    hanging = receivers(first_fails_then(held_open))
    recovered = receivers(first_fails_then(lambda conn, stop: conn.sendall(OK_200)))
    healthy = receivers(answer(OK_200))
    creds_a, a1 = make_paid_order(hanging.url)
    a2 = OrderFactory(merchant=creds_a.merchant, callback_url=hanging.url)
    make_paid(a2.pk)
    _, b1 = make_paid_order(recovered.url)
    _, c1 = make_paid_order(healthy.url)
    assert callback_deliver(order_id=a1.pk) is False
    assert callback_deliver(order_id=b1.pk) is False
    # when A's retry hangs in the one shared slot
    due_again(a1)
    results: dict[str, bool] = {}
    worker = deliver_in_background(a1.pk, results, "a1")
    try:
        wait_until(lambda: len(hanging.requests) == 2)
        due_again(b1)
        with CaptureQueriesContext(connection) as queries:
            # B's retry and A's next callback (its merchant slot taken too) come up meanwhile
            b1_delivered = callback_deliver(order_id=b1.pk)
            a2_delivered = callback_deliver(order_id=a2.pk)
            # and a merchant whose receiver never failed
            c1_delivered = callback_deliver(order_id=c1.pk)
    finally:
        release.set()
        worker.join()
    # then the struggling ones were deferred at once: no request, no attempt spent, no wait for
    # a slot (before, B's retry ran beside A's, and A's next callback waited for A's slot)
    assert (b1_delivered, a2_delivered) == (False, False)
    assert (len(recovered.requests), len(hanging.requests)) == (1, 2)
    assert [d.attempts for d in CallbackDelivery.objects.filter(order__in=[b1, a2]).order_by("attempts")] == [
        0,
        1,
    ]
    assert not [q["sql"] for q in queries.captured_queries if "pg_advisory_lock(" in q["sql"]]
    # while the healthy merchant was served, and A's retry went through once answered
    assert c1_delivered is True and results == {"a1": True}
    # and a success ends the struggle: B's next retry runs as before
    due_again(b1)
    assert callback_deliver(order_id=b1.pk) is True
    assert Order.objects.get(pk=b1.pk).status == "completed"


# --- the worker's environment stays out of a merchant's callback ---------------------------------


@pytest.mark.django_db
def test_a_callback_takes_no_credentials_or_proxy_from_the_workers_environment(
    receivers, tmp_path, monkeypatch
):
    # given a .netrc with credentials for the receiver's host, and a proxy that nothing answers
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login ops password secret-from-netrc\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    callback_http._session.cache_clear()
    receiver = receivers(lambda conn, stop: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    _, order = make_paid_order(receiver.url)
    # when the callback is delivered
    delivered = callback_deliver(order_id=order.pk)
    # then it went straight to the receiver, with no Authorization header
    assert delivered is True
    (request,) = receiver.requests
    assert b"authorization:" not in request.lower()
    assert request.startswith(b"POST /hook ")
    callback_http._session.cache_clear()
