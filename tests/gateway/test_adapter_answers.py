"""The sandbox adapter's sorting of answers, against a real HTTP peer in this process (SPEC 5, 9).

Each case scripts what a peer on 127.0.0.1 does with the charge request: the status, headers and
body it answers, or a connection refused, a handshake that never completes, silence, a reset or
garbage after the request arrived. Only an explicit "nothing was charged" may fail over (REJECTED);
whatever may hide a charge is UNKNOWN.
"""

import json
import socket
import struct
import time
from collections.abc import Callable

import pytest

from allocation.models import PaymentChannel
from gateway.providers.base import ChargeOutcome, ChargeRequest, ProviderError, RefundRequest
from gateway.providers.sandbox import MAX_ANSWER_BYTES, SandboxAdapter
from tests.peers import LoopbackServer, read_http_request

ACCEPTED, REJECTED, UNKNOWN = ChargeOutcome.ACCEPTED, ChargeOutcome.REJECTED, ChargeOutcome.UNKNOWN
TIMEOUT = 0.5  # connect and read timeouts of the adapter under test: short, so the silent cases end
DEADLINE = 30.0  # how long a peer thread may wait for the test before it gives up


class Peer(LoopbackServer):
    """A peer that hands each connection to `script(peer, conn)`; `requests` records what arrived."""

    def __init__(self, script: Callable[["Peer", socket.socket], None]) -> None:
        self.script = script
        self.requests: list[bytes] = []
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def handle(self, conn: socket.socket) -> None:
        self.script(self, conn)

    def read_request(self, conn: socket.socket) -> bytes:
        """The whole request (head and Content-Length body), recorded once it has arrived."""
        conn.settimeout(DEADLINE)
        request = read_http_request(conn)
        if b"\r\n\r\n" in request:
            self.requests.append(request)
        return request


def answer(status: int, body: bytes | str = b"", headers: dict | None = None):
    """A peer that answers the request with this status line, headers and body."""
    payload = body.encode() if isinstance(body, str) else body

    def script(peer: Peer, conn: socket.socket) -> None:
        peer.read_request(conn)
        lines = [f"HTTP/1.1 {status} Whatever", "Connection: close"]
        all_headers = {
            "Content-Type": "application/json",
            "Content-Length": str(len(payload)),
            **(headers or {}),
        }
        lines += [f"{name}: {value}" for name, value in all_headers.items() if value is not None]
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)

    return script


def raw(data: bytes):
    """A peer that answers the request with these bytes, whatever they are, then closes."""

    def script(peer: Peer, conn: socket.socket) -> None:
        peer.read_request(conn)
        conn.sendall(data)

    return script


def silent(peer: Peer, conn: socket.socket) -> None:
    """Reads the request and never answers: the adapter's read timeout fires after sending."""
    peer.read_request(conn)
    peer.done.wait(DEADLINE)


def reset(peer: Peer, conn: socket.socket) -> None:
    """Reads the request, then resets the connection (RST, not FIN)."""
    peer.read_request(conn)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def hang_up(peer: Peer, conn: socket.socket) -> None:
    """Reads the request and closes without a word."""
    peer.read_request(conn)


def drip(status: int):
    """Answers the head at once, then the body a byte at a time, each byte well inside the read timeout."""

    def script(peer: Peer, conn: socket.socket) -> None:
        peer.read_request(conn)
        conn.sendall(f"HTTP/1.1 {status} OK\r\nContent-Length: 100000\r\n\r\n".encode() + b'{"id":"ch_1"')
        # Gives up after DEADLINE, so an adapter that waits for the whole body fails, not hangs.
        give_up = time.monotonic() + DEADLINE
        while not peer.done.wait(TIMEOUT / 5) and time.monotonic() < give_up:
            conn.sendall(b" ")

    return script


def drip_head(start: bytes):
    """Answers `start` at once, then the rest of the status line or headers a byte at a time, each
    byte well inside the read timeout: no per-read timeout ever fires, only a deadline on the whole
    exchange ends it (the peer gives up after DEADLINE, so a client without one is slow, not hung)."""

    def script(peer: Peer, conn: socket.socket) -> None:
        peer.read_request(conn)
        conn.sendall(start)
        give_up = time.monotonic() + DEADLINE
        while not peer.done.wait(TIMEOUT / 5) and time.monotonic() < give_up:
            conn.sendall(b"x")

    return script


# A provider dripping the head of its answer: the exchange's deadline cuts it, and says so (before
# the deadline existed, the call waited as long as the peer dripped: every gateway worker at once).
HEAD_DRIPS = {
    "status line dripped": drip_head(b"HTTP/1.1 2"),
    "headers dripped": drip_head(b"HTTP/1.1 201 Created\r\nX-Slow: "),
}
CUT_BY_THE_DEADLINE = "no whole answer within"


def endless(status: int):
    """Answers a chunked body that does not end: 8 MiB, then silence with the connection open.

    The peer stops at 8 MiB so that an adapter without a bound fails this test (a read timeout
    mid-body) instead of eating the machine's memory.
    """

    def script(peer: Peer, conn: socket.socket) -> None:
        peer.read_request(conn)
        conn.sendall(f"HTTP/1.1 {status} OK\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b'{"id":"ch_1","pad":"' + b"x" * 16000
        sent = 0
        while not peer.done.is_set() and sent < 8 * 1024 * 1024:
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            chunk = b"x" * 16000
        peer.done.wait(DEADLINE)

    return script


def error(code: str) -> str:
    return json.dumps({"error": {"code": code, "message": "m"}})


# name: (peer script, expected outcome, expected http status)
ANSWERS = {
    # the provider took it
    "201 with an id": (answer(201, '{"id":"ch_1","status":"pending"}'), ACCEPTED, 201),
    "200 replay with an id": (answer(200, '{"id":"ch_1","status":"paid"}'), ACCEPTED, 200),
    # an explicit "nothing was charged"
    "503 channel_unavailable": (answer(503, error("channel_unavailable")), REJECTED, 503),
    "400 invalid_request (validated before processing)": (
        answer(400, error("invalid_request")),
        REJECTED,
        400,
    ),
    "400 invalid_json (validated before processing)": (answer(400, error("invalid_json")), REJECTED, 400),
    "400 missing_idempotency_key": (answer(400, error("missing_idempotency_key")), REJECTED, 400),
    # answers that do not say nothing was charged
    "400 with another code": (answer(400, error("amount_too_large")), UNKNOWN, 400),
    "400 without a body (a proxy's)": (answer(400, "<html>Bad Request</html>"), UNKNOWN, 400),
    "401": (answer(401, error("unauthorized")), UNKNOWN, 401),
    "403": (answer(403, error("forbidden")), UNKNOWN, 403),
    "404": (answer(404, error("not_found")), UNKNOWN, 404),
    "409 in flight": (answer(409, error("request_in_flight")), UNKNOWN, 409),
    "422 idempotency_key_reused": (answer(422, error("idempotency_key_reused")), UNKNOWN, 422),
    "429 with Retry-After": (answer(429, error("rate_limited"), {"Retry-After": "1"}), UNKNOWN, 429),
    "500": (answer(500, error("internal_error")), UNKNOWN, 500),
    "502 from a proxy": (answer(502, "<html>Bad Gateway</html>"), UNKNOWN, 502),
    "503 with another code": (answer(503, error("overloaded")), UNKNOWN, 503),
    "503 without a body": (answer(503, ""), UNKNOWN, 503),
    "504": (answer(504, ""), UNKNOWN, 504),
    "307 redirect (never followed)": (
        answer(307, "", {"Location": "http://127.0.0.1:9/v1/charges"}),
        UNKNOWN,
        307,
    ),
    # 2xx that does not show a charge
    "201 without an id": (answer(201, '{"status":"pending"}'), UNKNOWN, 201),
    "201 with an empty id": (answer(201, '{"id":""}'), UNKNOWN, 201),
    "201 with an id that is a number": (answer(201, '{"id":42}'), UNKNOWN, 201),
    "201 with an id that holds NUL": (answer(201, '{"id":"ch_\\u0000"}'), UNKNOWN, 201),
    "201 with an id of 10,000 characters": (answer(201, '{"id":"%s"}' % ("c" * 10000)), UNKNOWN, 201),
    "201 with a list": (answer(201, '["ch_1"]'), UNKNOWN, 201),
    "201 not JSON": (answer(201, "ch_1"), UNKNOWN, 201),
    "201 not UTF-8": (answer(201, b'{"id":"ch_\xff"}'), UNKNOWN, 201),
    "201 nested 100,000 deep": (answer(201, "[" * 100000), UNKNOWN, 201),
    "201 over the size bound": (
        answer(201, '{"id":"ch_1","pad":"%s"}' % ("x" * MAX_ANSWER_BYTES)),
        UNKNOWN,
        201,
    ),
    "201 declaring 10 GB": (answer(201, '{"id":"ch_1"}', {"Content-Length": str(10**10)}), UNKNOWN, 201),
    "201 endless chunked body": (endless(201), UNKNOWN, 201),
    "201 body dripped a byte at a time": (drip(201), UNKNOWN, 201),
    "201 body cut short": (answer(201, '{"id":"ch_1"}', {"Content-Length": "500"}), UNKNOWN, 201),
    "503 channel_unavailable cut short": (
        answer(503, error("channel_unavailable"), {"Content-Length": "500"}),
        UNKNOWN,
        503,
    ),
    "503 channel_unavailable over the size bound": (
        answer(503, error("channel_unavailable")[:-1] + ',"pad":"%s"}' % ("x" * MAX_ANSWER_BYTES)),
        UNKNOWN,
        503,
    ),
    "503 error code that is not a string": (
        answer(503, '{"error":{"code":["channel_unavailable"]}}'),
        UNKNOWN,
        503,
    ),
    "503 error that is a string": (answer(503, '{"error":"channel_unavailable"}'), UNKNOWN, 503),
    # no status line at all, after the request arrived
    "read timeout after sending": (silent, UNKNOWN, None),
    "connection reset after sending": (reset, UNKNOWN, None),
    "closed without an answer": (hang_up, UNKNOWN, None),
    "garbage instead of a status line": (raw(b"NOT HTTP AT ALL\r\n\r\n"), UNKNOWN, None),
    "a status code out of range": (raw(b"HTTP/1.1 999999 Odd\r\nContent-Length: 0\r\n\r\n"), UNKNOWN, None),
    # "\xb2" is "²" in Latin-1, as HTTP headers are read: str.isdigit() says yes, int() says no;
    # a length that is not a number is not a bound, and the body is read to its end as without one
    "201 declaring a Content-Length of a superscript two": (
        raw(b'HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: \xb2\r\n\r\n{"id":"ch_1"}'),
        ACCEPTED,
        201,
    ),
}


@pytest.fixture
def adapter(settings):
    settings.GATEWAY_CONNECT_TIMEOUT = TIMEOUT
    settings.GATEWAY_READ_TIMEOUT = TIMEOUT
    return SandboxAdapter()


@pytest.fixture
def closed_port(settings):
    """The adapter pointed at a port that is bound but not listening: the handshake is refused."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    settings.SANDBOX_URL = f"http://127.0.0.1:{closed.getsockname()[1]}"
    yield
    closed.close()


@pytest.fixture
def peers():
    started: list[Peer] = []

    def start(script) -> Peer:
        peer = Peer(script)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.close()


CHANNEL = PaymentChannel(code="sandbox-a", provider="sandbox")


def through(peers, settings, script, send) -> tuple[bytes, object]:
    """Point the adapter at a peer running `script`, send, and return what arrived (once) and the result."""
    peer = peers(script)
    settings.SANDBOX_URL = peer.url
    result = send()
    assert len(peer.requests) == 1
    return peer.requests[0], result


def charge(adapter: SandboxAdapter):
    request = ChargeRequest(
        order_id="01a22a48-b737-786c-a84c-0b2d41ca6738",
        amount=1050,
        currency="USD",
        idempotency_key="01a22a48-b737-786c-a84c-0b2d41ca6738:sandbox-a",
        webhook_url="http://127.0.0.1:8000/api/v1/gateway/webhooks/sandbox",
    )
    return adapter.charge(channel=CHANNEL, request=request)


@pytest.mark.parametrize("name", list(HEAD_DRIPS))
def test_a_charge_answer_dripping_its_head_is_cut_by_the_deadline_and_unknown(adapter, peers, settings, name):
    request, result = through(peers, settings, HEAD_DRIPS[name], lambda: charge(adapter))
    assert b"Idempotency-Key: " in request
    # may have been charged: never a failover, and the error says the exchange ran out of time
    assert (result.outcome, result.http_status) == (UNKNOWN, None), result
    assert CUT_BY_THE_DEADLINE in result.error, result


@pytest.mark.parametrize("name", list(HEAD_DRIPS))
def test_a_refund_or_status_answer_dripping_its_head_is_cut_by_the_deadline(adapter, peers, settings, name):
    _, result = through(peers, settings, HEAD_DRIPS[name], lambda: refund(adapter))
    assert (result.outcome, result.retry) == (UNKNOWN, False) and CUT_BY_THE_DEADLINE in result.error
    peer = peers(HEAD_DRIPS[name])
    settings.SANDBOX_URL = peer.url
    with pytest.raises(ProviderError, match=CUT_BY_THE_DEADLINE):
        adapter.fetch_status(channel=CHANNEL, idempotency_key=KEY)


def test_a_channel_with_an_api_base_of_its_own_is_called_there(adapter, peers, settings):
    # given a sandbox channel an operator pointed elsewhere (the console offers it for every
    # provider), and the default sandbox address pointing at nothing that answers
    peer = peers(answer(201, '{"id":"ch_1","status":"pending"}'))
    settings.SANDBOX_URL = "http://127.0.0.1:9"
    channel = PaymentChannel(code="sandbox-a", provider="sandbox", api_base=peer.url + "/")
    # when a charge, a status query and a refund go out
    request = ChargeRequest(
        order_id="01a22a48-b737-786c-a84c-0b2d41ca6738",
        amount=1050,
        currency="USD",
        idempotency_key=KEY,
        webhook_url="http://127.0.0.1:8000/api/v1/gateway/webhooks/sandbox",
    )
    result = adapter.charge(channel=channel, request=request)
    # then they reach the channel's own base (before: SANDBOX_URL, whatever the channel said)
    assert (result.outcome, result.provider_reference) == (ACCEPTED, "ch_1")
    assert peer.requests[0].startswith(b"POST /v1/charges ")


@pytest.mark.parametrize("name", list(ANSWERS))
def test_a_charge_answer_is_sorted_by_what_it_says_about_the_money(adapter, peers, settings, name):
    script, outcome, http_status = ANSWERS[name]
    # when the request reaches the peer
    request, result = through(peers, settings, script, lambda: charge(adapter))
    # then its answer is sorted as the table says
    assert b"Idempotency-Key: 01a22a48-b737-786c-a84c-0b2d41ca6738:sandbox-a" in request
    assert (result.outcome, result.http_status) == (outcome, http_status), result
    if outcome == ACCEPTED:
        assert result.provider_reference == "ch_1"
    # what we store of a peer's words is short and printable
    assert len(result.error) <= 500 and "\x00" not in result.error


def test_a_refused_connection_is_rejected_nothing_was_sent(adapter, closed_port):
    result = charge(adapter)
    assert result.outcome == REJECTED
    assert result.error.startswith("not sent")


def refund(adapter: SandboxAdapter):
    request = RefundRequest(
        refund_id="01a22a48-b737-786c-a84c-0b2d41ca6739",
        order_id="01a22a48-b737-786c-a84c-0b2d41ca6738",
        amount=500,
        currency="USD",
        idempotency_key="refund:01a22a48-b737-786c-a84c-0b2d41ca6739",
        charge_idempotency_key="01a22a48-b737-786c-a84c-0b2d41ca6738:sandbox-a",
        webhook_url="http://127.0.0.1:8000/api/v1/gateway/webhooks/sandbox",
    )
    return adapter.refund(channel=CHANNEL, request=request)


def test_a_refund_never_sent_is_rejected_and_asked_again_later(adapter, closed_port):
    result = refund(adapter)
    # then: nothing refunded, and the same refund goes again on the same channel (never a failover)
    assert (result.outcome, result.retry, result.http_status) == (REJECTED, True, None)
    assert result.error.startswith("not sent")


# The refund goes through the charge's transport: whatever may hide a refund is UNKNOWN, and an
# UNKNOWN refund is never sent again blindly (it waits for the webhook or the status poll).
REFUND_NO_ANSWER = {
    name: ANSWERS[name]
    for name in (
        "read timeout after sending",
        "connection reset after sending",
        "garbage instead of a status line",
        "201 over the size bound",
        "201 body dripped a byte at a time",
        "201 body cut short",
    )
}


@pytest.mark.parametrize("name", list(REFUND_NO_ANSWER))
def test_a_refund_without_a_readable_answer_is_unknown_and_not_retried(adapter, peers, settings, name):
    script, _, http_status = REFUND_NO_ANSWER[name]
    # when the refund reaches the peer under its own key
    request, result = through(peers, settings, script, lambda: refund(adapter))
    assert b"POST /v1/refunds " in request
    assert b"Idempotency-Key: refund:01a22a48-b737-786c-a84c-0b2d41ca6739" in request
    # then what it did is not known
    assert (result.outcome, result.retry, result.http_status) == (UNKNOWN, False, http_status), result


def test_a_connect_timeout_is_rejected_nothing_was_sent(adapter, settings):
    # given: a listening socket that never accepts, its backlog filled, so handshakes go unanswered
    server = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(64):
            filler = socket.socket()
            filler.settimeout(TIMEOUT)
            fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.fail("the backlog never filled")
        settings.SANDBOX_URL = f"http://127.0.0.1:{port}"
        # when
        result = charge(adapter)
    finally:
        for filler in fillers:
            filler.close()
        server.close()
    # then
    assert result.outcome == REJECTED
    assert result.error == "not sent: ConnectTimeout"


def test_a_kept_alive_connection_serves_the_next_charge(adapter, peers, settings):
    # The bounded read must leave a fully read connection in the pool, not close it each time.
    connections = []

    def keep_alive(peer: Peer, conn: socket.socket) -> None:
        connections.append(conn)
        body = b'{"id":"ch_1"}'
        for _ in range(2):
            peer.read_request(conn)
            conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        peer.done.wait(DEADLINE)

    peer = peers(keep_alive)
    settings.SANDBOX_URL = peer.url
    assert [charge(adapter).outcome for _ in range(2)] == [ACCEPTED, ACCEPTED]
    assert (len(peer.requests), len(connections)) == (2, 1)


# --- status queries: an answer we cannot read is a clean ProviderError, never a guess ----------------

KEY = "01a22a48-b737-786c-a84c-0b2d41ca6738:sandbox-a"

# name: (peer script, expected (status, failure_code, provider_reference) or ProviderError)
STATUS_ANSWERS = {
    "paid": (
        answer(200, json.dumps({"id": "ch_1", "status": "paid", "idempotency_key": KEY})),
        ("paid", "", "ch_1"),
    ),
    "failed with a code": (
        answer(200, '{"id":"ch_1","status":"failed","failure_code":"card_declined"}'),
        ("failed", "card_declined", "ch_1"),
    ),
    "pending": (answer(200, '{"id":"ch_1","status":"pending"}'), ("pending", "", "ch_1")),
    "a status we do not know": (answer(200, '{"id":"ch_1","status":"refunded"}'), ("pending", "", "ch_1")),
    "a status that is a list": (answer(200, '{"id":"ch_1","status":["paid"]}'), ("pending", "", "ch_1")),
    "no status": (answer(200, '{"id":"ch_1"}'), ("pending", "", "ch_1")),
    "failure code with NUL": (
        answer(200, '{"id":"ch_1","status":"failed","failure_code":"x\\u0000"}'),
        ("failed", "", "ch_1"),
    ),
    "404 not_found": (answer(404, error("not_found")), ("not_found", "", "")),
    "about another charge": (
        answer(200, '{"id":"ch_2","status":"paid","idempotency_key":"other"}'),
        ProviderError,
    ),
    "404 from a proxy": (answer(404, "<html>Not Found</html>"), ProviderError),
    "500": (answer(500, error("internal_error")), ProviderError),
    "429": (answer(429, error("rate_limited")), ProviderError),
    "200 not JSON": (answer(200, "paid"), ProviderError),
    "200 a list": (answer(200, '["paid"]'), ProviderError),
    "200 not UTF-8": (answer(200, b'{"status":"paid\xff"}'), ProviderError),
    "200 nested 100,000 deep": (answer(200, "[" * 100000), ProviderError),
    "200 over the size bound": (
        answer(200, '{"status":"paid","pad":"%s"}' % ("x" * MAX_ANSWER_BYTES)),
        ProviderError,
    ),
    "200 endless chunked body": (endless(200), ProviderError),
    "200 dripped": (drip(200), ProviderError),
    "302 redirect": (answer(302, "", {"Location": "http://127.0.0.1:9/"}), ProviderError),
    "read timeout": (silent, ProviderError),
    "connection reset": (reset, ProviderError),
    "garbage status line": (raw(b"\x00\x01\x02\r\n\r\n"), ProviderError),
}


@pytest.mark.parametrize("name", list(STATUS_ANSWERS))
def test_a_status_answer_is_read_or_refused_cleanly(adapter, peers, settings, name):
    script, expected = STATUS_ANSWERS[name]
    peer = peers(script)
    settings.SANDBOX_URL = peer.url
    if expected is ProviderError:
        with pytest.raises(ProviderError):
            adapter.fetch_status(channel=CHANNEL, idempotency_key=KEY)
    else:
        status = adapter.fetch_status(channel=CHANNEL, idempotency_key=KEY)
        assert (status.status, status.failure_code, status.provider_reference) == expected
    assert len(peer.requests) == 1


def test_a_status_query_to_a_closed_port_is_a_provider_error(adapter, closed_port):
    with pytest.raises(ProviderError):
        adapter.fetch_status(channel=CHANNEL, idempotency_key=KEY)
