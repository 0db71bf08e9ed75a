"""The SSRF-hardened HTTP client for callbacks: no private networks, no redirects, bounded time and size."""

import functools
import socket
import threading
import time
from dataclasses import dataclass

import requests
from django.conf import settings
from requests_hardened import Config, Manager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from orders.urlsafety import UnsafeUrl, callback_url_check

EXCERPT_BYTES = 1024
ERROR_CHARS = 500


class _Watchdog:
    """Ends an attempt at its deadline by shutting its socket down, wherever the read is blocked.

    Socket timeouts bound each read, not the exchange: a receiver that drips a byte a second
    never trips them. Shutting the socket down from another thread makes the blocked read
    return at once, in the status line, the headers or the body alike.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = False
        self._timer: threading.Timer | None = None

    def watch(self, sock: socket.socket) -> None:
        self.cancel()
        self._timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._expire, [sock])
        self._timer.daemon = True
        self._timer.start()

    def _expire(self, sock: socket.socket) -> None:
        self.expired = True
        try:
            # The plain socket's shutdown, also for TLS: SSLSocket.shutdown would drop its SSL
            # object under the reading thread's feet.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: the read it would have ended is over

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


_current = threading.local()


class _WatchedConnectionMixin:
    """Hands the connection's socket to this thread's attempt watchdog before waiting for an answer."""

    def getresponse(self):
        watchdog = getattr(_current, "watchdog", None)
        if watchdog is not None and self.sock is not None:
            watchdog.watch(self.sock)
        return super().getresponse()


class _WatchedHTTPConnection(_WatchedConnectionMixin, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnectionMixin, HTTPSConnection):
    pass


class _WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


@functools.cache
def _session() -> requests.Session:
    # One pooled keep-alive session per process; the IP filter resolves and checks every connection.
    config = Config(
        ip_filter_enable=not settings.CALLBACK_ALLOW_PRIVATE_NETWORKS,
        ip_filter_allow_loopback_ips=False,
        never_redirect=True,
        default_timeout=(settings.CALLBACK_CONNECT_TIMEOUT, settings.CALLBACK_TOTAL_TIMEOUT),
        user_agent_override="payments-callbacks/1.0",
    )
    session = Manager(config).get_session()
    # Same adapters (and so the same IP filter), only their connections are watched.
    for adapter in session.adapters.values():
        adapter.poolmanager.pool_classes_by_scheme = {
            "http": _WatchedHTTPConnectionPool,
            "https": _WatchedHTTPSConnectionPool,
        }
    return session


def storable_text(data: bytes | str, limit: int) -> str:
    """What a peer sent, made safe for a PostgreSQL text column: valid UTF-8, no NUL, bounded."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    return text[:limit].replace("\x00", "\ufffd")


@dataclass(frozen=True)
class PostResult:
    status_code: int | None
    latency_ms: int
    error: str
    excerpt: str

    @property
    def ok(self) -> bool:
        return not self.error and self.status_code is not None and 200 <= self.status_code < 300


def _read_excerpt(response: requests.Response) -> bytes:
    """At most EXCERPT_BYTES of the body as sent (no decompression: a small gzip can be huge)."""
    chunks, size = [], 0
    while size < EXCERPT_BYTES:
        chunk = response.raw.read(EXCERPT_BYTES - size, decode_content=False)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def post_json(*, url: str, body: str, headers: dict[str, str]) -> PostResult:
    """One attempt, bounded: connect within CALLBACK_CONNECT_TIMEOUT, all of it within
    CALLBACK_TOTAL_TIMEOUT (status line, headers and the excerpt of the body included).
    Never raises for anything the receiver does; the error and excerpt are safe to store.
    """
    started = time.monotonic()
    total = settings.CALLBACK_TOTAL_TIMEOUT

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        callback_url_check(url, resolve=False)
    except UnsafeUrl as exc:
        return PostResult(None, elapsed(), storable_text(f"refused: {exc}", ERROR_CHARS), "")
    watchdog = _Watchdog(started + total)
    _current.watchdog = watchdog
    status_code, excerpt = None, b""
    try:
        with _session().post(
            url,
            data=body.encode(),
            headers={**headers, "Accept-Encoding": "identity"},
            stream=True,
            timeout=(settings.CALLBACK_CONNECT_TIMEOUT, total),
        ) as response:
            status_code = response.status_code
            excerpt = _read_excerpt(response)
    except (
        Exception
    ) as exc:  # anything the peer provokes (requests', urllib3's, http.client's) is a failed attempt
        error = f"{exc.__class__.__name__}: {exc}"
        if not watchdog.expired:
            return PostResult(status_code, elapsed(), storable_text(error, ERROR_CHARS), "")
    finally:
        watchdog.cancel()
        _current.watchdog = None
    text = storable_text(excerpt, EXCERPT_BYTES)
    if watchdog.expired:
        return PostResult(status_code, elapsed(), f"timeout: total {total:g} s exceeded", text)
    return PostResult(status_code, elapsed(), "", text)
