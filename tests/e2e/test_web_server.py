"""The API's web server against clients that are slow or speak broken HTTP, over real sockets to
the stack's gunicorn (core/http_server.py; the stack reads requests with a 2 s deadline).

Gunicorn answers a request it cannot parse itself, before Django: those answers are the API's JSON
errors too, and never a 5xx. And a client that sends half a request and waits holds a web thread
only until the read deadline: a few of them used to hold every thread of the API for as long as
they liked, and the API answered no one.
"""

import json
import socket
import time

import pytest
import requests

from orders.models import Order
from tests.e2e.conftest import WEB
from tests.factories import make_merchant

pytestmark = [pytest.mark.e2e]

HOST, PORT = WEB.split(":")
# The stack's web: 2 workers x 2 threads (tests/e2e/conftest.py). More slow clients than that.
SLOW_CLIENTS = 6
# Far beyond the 2 s read deadline: a connection still open then is held for good.
PATIENCE = 30


def exchange(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the answer until the server closes: status, headers, body."""
    with socket.create_connection((HOST, int(PORT)), timeout=PATIENCE) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in header_lines)}
    if headers.get("transfer-encoding") == "chunked":
        body = dechunked(body)
    return int(status_line.split()[1]), headers, body


def dechunked(data: bytes) -> bytes:
    body = b""
    while True:
        size, _, data = data.partition(b"\r\n")
        if int(size, 16) == 0:
            return body
        body, data = body + data[: int(size, 16)], data[int(size, 16) + 2 :]


def api_request(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}", "Connection: close", *headers]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


@pytest.mark.parametrize(
    "request_bytes, status, code",
    [
        # A cursor over gunicorn's request line limit (4094 bytes).
        (api_request("GET", "/api/v1/orders?cursor=" + "a" * 5000), 414, "uri_too_long"),
        (api_request("GET", "/api/v1/orders", "X-Padding: " + "a" * 9000), 431, "headers_too_large"),
        (api_request("GET", "/api/v1/orders", "Bad Header: x"), 400, "bad_request"),
        (api_request("G@T", "/api/v1/orders"), 400, "bad_request"),
        (api_request("GET", "/api/v1/orders", "Content-Length: many"), 400, "bad_request"),
    ],
    ids=["request-line-too-long", "header-too-large", "header-name", "method", "content-length"],
)
def test_requests_gunicorn_rejects_are_answered_in_json(stack, request_bytes, status, code):
    got_status, headers, body = exchange(request_bytes)
    assert (got_status, headers["content-type"]) == (status, "application/json")
    error = json.loads(body)["error"]
    assert (error["code"], error["fields"]) == (code, {})


def test_an_unknown_transfer_coding_is_a_400_and_creates_nothing(live):
    creds = make_merchant()
    status, headers, body = exchange(
        api_request(
            "POST", "/api/v1/orders", f"Authorization: Bearer {creds.api_key}", "Idempotency-Key: te-1",
            "Content-Type: application/json", "Transfer-Encoding: zstd",
            body=b'{"amount": 1050, "currency": "USD", "reference": "te-1"}',
        )
    )  # fmt: skip
    # Gunicorn's own answer would be 501: no input may earn a 5xx.
    assert (status, headers["content-type"]) == (400, "application/json")
    assert b"bad_request" in body
    assert not Order.objects.filter(merchant_id=creds.merchant.id).exists()


def test_clients_that_send_half_a_request_do_not_hold_the_api(live):
    slow = []
    for _ in range(SLOW_CLIENTS):
        sock = socket.create_connection((HOST, int(PORT)), timeout=PATIENCE)
        sock.sendall(f"GET /api/v1/orders HTTP/1.1\r\nHost: {HOST}\r\nX-Half: ".encode())
        slow.append(sock)
    try:
        time.sleep(0.5)  # let the web's threads take them up
        # Every thread was taken by a slow client; the API answers once the deadline frees them.
        assert requests.get(f"http://{WEB}/healthz", timeout=PATIENCE).status_code == 200
        for sock in slow:
            assert sock.recv(1024) == b"", "the server closes a connection whose request never came"
    finally:
        for sock in slow:
            sock.close()


def test_a_body_that_never_arrives_is_a_408_and_leaves_the_key_free(live):
    creds = make_merchant()
    full = b'{"amount": 1050, "currency": "USD", "reference": "slow-1"}'
    auth = (
        f"Authorization: Bearer {creds.api_key}",
        "Idempotency-Key: slow-1",
        "Content-Type: application/json",
    )
    status, headers, body = exchange(
        api_request("POST", "/api/v1/orders", *auth, f"Content-Length: {len(full)}", body=full[:20])
    )
    assert (status, headers["content-type"]) == (408, "application/json")
    assert b"request_timeout" in body
    assert not Order.objects.filter(merchant_id=creds.merchant.id).exists()
    # Nothing was recorded for the key: sent whole, the same request creates the order.
    status, _, body = exchange(
        api_request("POST", "/api/v1/orders", *auth, f"Content-Length: {len(full)}", body=full)
    )
    assert status == 201, body
    assert Order.objects.filter(merchant_id=creds.merchant.id, reference="slow-1").count() == 1


def test_connections_that_send_nothing_hold_no_thread(live):
    # Gunicorn's own worker gives each new connection a thread that waits up to 5 s for its first
    # bytes, in arrival order: 40 silent ones would hold the stack's 4 threads for ~50 s, and a
    # request behind them would wait that long. Here they wait in the poller, holding nothing.
    silent = [socket.create_connection((HOST, int(PORT)), timeout=PATIENCE) for _ in range(40)]
    try:
        time.sleep(0.5)
        assert requests.get(f"http://{WEB}/healthz", timeout=PATIENCE).status_code == 200
    finally:
        for sock in silent:
            sock.close()


def chunked(body: bytes, size: int = 1000) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def test_a_chunked_body_is_read_and_held_to_the_same_limit(live):
    # Django reads a body only as far as Content-Length says: a chunked create used to arrive
    # empty ("amount is required"), and a chunked body of any size passed the 413 check.
    creds = make_merchant()
    auth = (
        f"Authorization: Bearer {creds.api_key}",
        "Content-Type: application/json",
        "Transfer-Encoding: chunked",
    )
    body = (
        b'{"amount": 1050, "currency": "USD", "reference": "chunked-1", "description": "' + b"d" * 900 + b'"}'
    )
    status, _, answer = exchange(
        api_request("POST", "/api/v1/orders", *auth, "Idempotency-Key: chunked-1", body=chunked(body, 100))
    )
    assert status == 201, answer
    assert Order.objects.get(merchant_id=creds.merchant.id).reference == "chunked-1"

    huge = b'{"description": "' + b"d" * 70_000 + b'"}'
    status, headers, answer = exchange(
        api_request("POST", "/api/v1/orders", *auth, "Idempotency-Key: chunked-2", body=chunked(huge))
    )
    assert (status, headers["content-type"]) == (413, "application/json")
    assert json.loads(answer)["error"]["code"] == "payload_too_large"

    status, headers, answer = exchange(
        api_request(
            "POST", "/api/v1/orders", *auth, "Idempotency-Key: chunked-3", body=b"zz\r\n{}\r\n0\r\n\r\n"
        )
    )
    assert (status, headers["content-type"]) == (400, "application/json")
    assert Order.objects.filter(merchant_id=creds.merchant.id).count() == 1
