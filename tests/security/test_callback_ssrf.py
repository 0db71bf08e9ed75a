"""Callback URLs cannot reach into private networks (SPEC 6, 7): refused when the order is created,
refused again at delivery after DNS resolution (the attempt fails and is recorded), and redirects
are never followed. CALLBACK_ALLOW_PRIVATE_NETWORKS is off here, as in production.

No packet leaves loopback: a guard on socket.connect refuses (and records) any connection these
tests' code would open, so a regression in the filter fails the test instead of sending traffic.
Names are made to resolve where a test needs (socket.getaddrinfo stubbed for made-up names only),
and the guard can stand a local server in for a public address.
"""

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rest_framework.test import APIClient

from callbacks import http as callback_http
from callbacks.models import CallbackAttempt, CallbackDelivery
from callbacks.services import callback_deliver
from orders.models import Order
from tests.factories import OrderFactory, make_merchant, make_paid

PRIVATE = [
    "http://127.0.0.1:{port}/hook",
    "http://127.1:{port}/hook",
    "http://10.0.0.1/hook",
    "http://10.255.255.254:8080/hook",
    "http://192.168.1.1/hook",
    "http://172.16.0.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:{port}/hook",
    "http://[::ffff:127.0.0.1]:{port}/hook",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://2130706433:{port}/hook",
    "http://0.0.0.0:{port}/hook",
    "http://localhost:{port}/hook",
    "http://[fe80::1]/hook",
    "http://224.0.0.1/hook",
]
WITH_USERINFO = [
    "http://user:password@93.184.215.14/hook",
    "https://user@93.184.215.14/hook",
    "http://93.184.215.14@127.0.0.1:{port}/hook",
]


class Recorder:
    """A local endpoint that records requests; answers `status` (and a Location when told)."""

    def __init__(self, status: int = 200, location: str | None = None) -> None:
        self.hits: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.hits.append(self.path)
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    recorder = Recorder()
    yield recorder
    recorder.close()


@pytest.fixture
def private_networks_off(settings):
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = False
    callback_http._session.cache_clear()  # the session's IP filter is built from the setting
    yield
    callback_http._session.cache_clear()


@pytest.fixture
def private_networks_on(settings):
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = True
    callback_http._session.cache_clear()
    yield
    callback_http._session.cache_clear()


class ConnectGuard(list):
    """The connections refused or made to the receiver; `nat` maps a public (ip, port) to a local one."""

    def __init__(self) -> None:
        super().__init__()
        self.nat: dict[tuple[str, int], tuple[str, int]] = {}


@pytest.fixture
def connect_guard(monkeypatch, receiver):
    """Records every socket.connect to the receiver's port and refuses any non-loopback target."""
    attempts = ConnectGuard()
    real_connect = socket.socket.connect

    def guarded(sock, address):
        if isinstance(address, tuple) and tuple(address[:2]) in attempts.nat:
            return real_connect(sock, attempts.nat[tuple(address[:2])])
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(address, tuple) and address[1] == receiver.port:
            attempts.append(address)
        if isinstance(host, str) and not (host.startswith("127.") or host in ("::1", "localhost", "/")):
            attempts.append(address)
            raise ConnectionRefusedError(f"test guard: no traffic to {address!r}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


@pytest.fixture
def dns(monkeypatch):
    """Made-up names resolve to what a test says (several addresses allowed); others as usual."""
    records: dict[str, list[str]] = {}
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if host not in records:
            return real_getaddrinfo(host, port, family, type, proto, flags)
        port = int(port or 0)
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
            if ":" in ip
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in records[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return records


def create_order(api_key: str, callback_url: str):
    return APIClient(HTTP_AUTHORIZATION=f"Bearer {api_key}").post(
        "/api/v1/orders",
        {"amount": 1000, "currency": "USD", "reference": "r-1", "callback_url": callback_url},
        format="json",
        HTTP_IDEMPOTENCY_KEY="k-1",
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    "template", PRIVATE + WITH_USERINFO + ["ftp://93.184.215.14/x", "javascript:alert(1)"]
)
def test_a_private_or_credentialed_callback_url_is_refused_at_creation(
    private_networks_off, connect_guard, receiver, template
):
    url = template.format(port=receiver.port)
    response = create_order(make_merchant(callback_url="").api_key, url)
    assert response.status_code == 400, url
    assert "callback_url" in response.json()["error"]["fields"]
    assert Order.objects.count() == 0
    assert connect_guard == []


@pytest.mark.django_db
def test_a_public_callback_url_is_accepted_at_creation(private_networks_off, connect_guard, dns):
    dns["hooks.merchant.example"] = ["93.184.215.14"]
    api_key = make_merchant(callback_url="").api_key
    for n, url in enumerate(["https://93.184.215.14/hooks/pay", "https://hooks.merchant.example/pay"]):
        response = APIClient(HTTP_AUTHORIZATION=f"Bearer {api_key}").post(
            "/api/v1/orders",
            {"amount": 1000, "currency": "USD", "reference": f"r-{n}", "callback_url": url},
            format="json",
            HTTP_IDEMPOTENCY_KEY=f"k-{n}",
        )
        assert response.status_code == 201, url
        assert response.json()["callback_url"] == url
    assert connect_guard == []  # creation checks the address; it does not call it


@pytest.mark.django_db
@pytest.mark.parametrize(
    "addresses",
    [
        ["10.1.2.3"],
        ["127.0.0.1"],
        ["169.254.169.254"],
        ["192.168.0.10"],
        ["::1"],
        ["::ffff:127.0.0.1"],
        ["fd00::1"],
        ["93.184.215.14", "10.0.0.7"],  # one public record does not vouch for a private one
    ],
)
def test_a_name_resolving_to_a_private_address_is_refused_at_creation(
    private_networks_off, connect_guard, dns, addresses
):
    dns["hooks.merchant.example"] = addresses
    response = create_order(make_merchant(callback_url="").api_key, "https://hooks.merchant.example/pay")
    assert response.status_code == 400
    assert "callback_url" in response.json()["error"]["fields"]
    assert Order.objects.count() == 0
    assert connect_guard == []


def assert_refused_unsent(delivered, order, receiver, connect_guard, errors: tuple[str, ...]) -> None:
    """The delivery was refused before any connection: a failed attempt, the order still paid."""
    assert delivered is False
    assert receiver.hits == []
    assert connect_guard == []
    attempt = CallbackAttempt.objects.get(delivery__order=order)
    assert attempt.status_code is None
    assert attempt.error.startswith(errors), attempt.error
    assert Order.objects.get(pk=order.pk).status == "paid"


def paid_order_with(url: str) -> Order:
    # The URL was fine when stored (the rules or DNS changed since): delivery must check again.
    # Stored as it stands, past the creation rule, which would refuse it today.
    order = OrderFactory(merchant=make_merchant(callback_url="").merchant, callback_url=url)
    make_paid(order.pk)
    return Order.objects.get(pk=order.pk)


@pytest.mark.django_db
@pytest.mark.parametrize("template", PRIVATE + WITH_USERINFO)
def test_a_private_callback_url_is_refused_at_delivery_and_the_attempt_recorded(
    private_networks_off, connect_guard, receiver, template
):
    # given a paid order whose callback URL points into a private network
    url = template.format(port=receiver.port)
    order = paid_order_with(url)
    # when the callback is delivered
    delivered = callback_deliver(order_id=order.pk)
    # then nothing was sent, the attempt is recorded as failed, and the order waits for a retry;
    # refused by our URL check or by the client's address filter, not by the network
    assert_refused_unsent(delivered, order, receiver, connect_guard, ("refused:", "InvalidIPAddress"))
    delivery = CallbackDelivery.objects.get(order=order)
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    assert delivery.next_attempt_at is not None


@pytest.mark.django_db
@pytest.mark.parametrize("rebound_to", ["127.0.0.1", "10.0.0.8", "169.254.169.254", "::1"])
def test_a_name_that_resolves_privately_at_delivery_is_refused(
    private_networks_off, connect_guard, dns, receiver, rebound_to
):
    # given an order whose callback name resolved to a public address when it was created
    dns["hooks.merchant.example"] = ["93.184.215.14"]
    url = f"http://hooks.merchant.example:{receiver.port}/hook"
    response = create_order(make_merchant(callback_url=url).api_key, url)
    assert response.status_code == 201
    order = Order.objects.get(pk=response.json()["id"])
    make_paid(order.pk)
    # when the name now points into the private network (DNS rebinding) and the callback is due
    dns["hooks.merchant.example"] = [rebound_to]
    delivered = callback_deliver(order_id=order.pk)
    # then the address is refused after resolution: nothing sent, a failed attempt recorded
    assert_refused_unsent(delivered, order, receiver, connect_guard, ("InvalidIPAddress",))


@pytest.mark.django_db
def test_the_same_loopback_url_is_delivered_when_private_networks_are_allowed(private_networks_on, receiver):
    # the refusal above is the setting's doing, not a broken endpoint
    order = paid_order_with(f"http://127.0.0.1:{receiver.port}/hook")
    assert callback_deliver(order_id=order.pk) is True
    assert receiver.hits == ["/hook"]
    assert Order.objects.get(pk=order.pk).status == "completed"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "location", ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:{port}/internal"]
)
def test_a_public_endpoint_redirecting_into_the_private_network_is_not_followed(
    private_networks_off, connect_guard, dns, receiver, location
):
    # given a merchant endpoint on a public address (the local redirector stands in for it) that
    # answers 302 to an internal address; `receiver` stands in for the internal service
    redirector = Recorder(status=302, location=location.format(port=receiver.port))
    dns["hooks.merchant.example"] = ["93.184.215.14"]
    connect_guard.nat[("93.184.215.14", 80)] = ("127.0.0.1", redirector.port)
    try:
        order = paid_order_with("http://hooks.merchant.example/hook")
        # when
        delivered = callback_deliver(order_id=order.pk)
        # then the public endpoint got the callback, its redirect went nowhere, and the attempt failed
        assert delivered is False
        assert redirector.hits == ["/hook"]
        assert receiver.hits == []
        assert connect_guard == []
        attempt = CallbackAttempt.objects.get(delivery__order=order)
        assert (attempt.status_code, attempt.error) == (302, "")
        assert Order.objects.get(pk=order.pk).status == "paid"
    finally:
        redirector.close()


@pytest.mark.django_db
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed_and_counts_as_a_failed_attempt(private_networks_on, status):
    # given an endpoint that redirects to another (here: loopback standing in for an internal host)
    target = Recorder()
    redirector = Recorder(status=status, location=f"http://127.0.0.1:{target.port}/internal")
    try:
        order = paid_order_with(f"http://127.0.0.1:{redirector.port}/hook")
        # when
        delivered = callback_deliver(order_id=order.pk)
        # then the redirect's target never saw a request, and the attempt is a non-2xx failure
        assert delivered is False
        assert redirector.hits == ["/hook"]
        assert target.hits == []
        attempt = CallbackAttempt.objects.get(delivery__order=order)
        assert attempt.status_code == status
        assert Order.objects.get(pk=order.pk).status == "paid"
    finally:
        redirector.close()
        target.close()
