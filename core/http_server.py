"""What the API's gunicorn does beyond its defaults: a deadline on reading a request, and its own
error answers in the API's JSON shape. Self-contained (no Django): it runs in gunicorn's master
and in its workers' main threads, outside any request.

A deadline on reading. Gunicorn's threaded worker hands a new connection to a thread at once,
which waits up to 5 s for its first bytes, then reads the request head and, through the
application, the body, from a blocking socket with no timeout: a client that sends half a header
and waits holds the thread for as long as it likes, and a handful of such clients (or a few dozen
that send nothing) hold every thread of the API. `ThreadWorker` gives a connection a thread only
once its first bytes arrive, and each request `WEB_REQUEST_READ_SECONDS` (default 10) from its
first byte to its last: a head not complete by then closes the connection; a body not complete by then
raises `ClientTooSlow` in the application, which answers 408 (core.middleware). Writing an answer
has a timeout of its own per send, so a client that does not read cannot hold a thread either.
Slow clients are bounded, not banished: a production deployment still belongs behind a buffering
proxy (README, "Deployment").

JSON error answers. A request gunicorn cannot parse (a request line over its limit, a malformed
header, a transfer coding it does not know) never reaches Django: gunicorn answers it itself, in
HTML. `install()` makes those answers the same `{"error": {"code", "message", "fields"}}` as every
other error of the API (SPEC 3), and answers a transfer coding it does not know with 400 rather than
501: the fault is the client's, and no input may earn a 5xx.
"""

import errno
import json
import logging
import os
import selectors
import socket
import time
from functools import partial
from http import HTTPStatus

from gunicorn import util
from gunicorn.workers import gthread

from core.http_codes import ERROR_CODES, error_body

READ_SECONDS = float(os.environ.get("WEB_REQUEST_READ_SECONDS") or 10)
SEND_SECONDS = float(os.environ.get("WEB_RESPONSE_SEND_SECONDS") or 30)


class ClientTooSlow(TimeoutError):
    """The client did not send its request (head and body) within READ_SECONDS."""


class _DeadlineSocket:
    """A client socket whose reads share one deadline per request.

    Gunicorn puts a connection's socket in blocking mode each time a thread takes it up for a
    request; that is when the deadline starts. Every read then waits at most until the deadline
    (or a shorter timeout gunicorn sets itself, when it drains a body or closes), every send at
    most SEND_SECONDS. Everything else is the socket's own.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._deadline = None
        self._timeout = None  # a timeout gunicorn set explicitly, None when it set none

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)
        self._timeout = None
        self._deadline = time.monotonic() + READ_SECONDS if flag else None

    def settimeout(self, value) -> None:
        self._sock.settimeout(value)
        self._timeout = value

    def gettimeout(self):
        # Blocking, the timeout gunicorn set (None: it set none, the deadline still applies).
        return self._sock.gettimeout() if self._deadline is None else self._timeout

    def recv(self, size: int, *flags) -> bytes:
        if self._deadline is None:  # non-blocking: the poller's business
            return self._sock.recv(size, *flags)
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise ClientTooSlow(f"request not received within {READ_SECONDS:g} s")
        self._sock.settimeout(remaining if self._timeout is None else min(remaining, self._timeout))
        try:
            return self._sock.recv(size, *flags)
        except TimeoutError:
            if self._timeout is not None:
                raise  # gunicorn's own timeout (drain, graceful close): it handles it
            raise ClientTooSlow(f"request not received within {READ_SECONDS:g} s") from None

    def _send(self, method, *args):
        if self._deadline is not None:
            self._sock.settimeout(SEND_SECONDS)
        try:
            return method(*args)
        finally:
            if self._deadline is not None:
                self._sock.settimeout(self._timeout)

    def send(self, data, *flags) -> int:
        return self._send(self._sock.send, data, *flags)

    def sendall(self, data, *flags) -> None:
        return self._send(self._sock.sendall, data, *flags)

    def sendfile(self, file, offset=0, count=None):
        return self._send(self._sock.sendfile, file, offset, count)


class _SlowClientLogFilter(logging.Filter):
    """A client too slow to send its request head is a warning line, not a traceback: gunicorn
    logs any socket error of a request with `exception()`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ClientTooSlow):
            record.msg, record.args = "Closed a connection: %s", (record.exc_info[1],)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


class ThreadWorker(gthread.ThreadWorker):
    """Gunicorn's threaded worker: a thread only for a connection that has sent something, and
    then a read deadline per request."""

    def init_process(self) -> None:
        self.log.error_log.addFilter(_SlowClientLogFilter())
        super().init_process()

    def accept(self, listener) -> None:
        """gthread.ThreadWorker.accept (gunicorn 27): the client socket wrapped, and parked in the
        poller until it is readable."""
        try:
            client_sock, client_addr = listener.accept()
            self.nr_conns += 1
            client_sock.setblocking(True)
            if self.cfg.is_ssl:  # TLS wraps the raw socket: terminate TLS in front instead
                self.enqueue_req(gthread.TConn(self.cfg, client_sock, client_addr, listener.getsockname()))
                return
            conn = gthread.TConn(self.cfg, _DeadlineSocket(client_sock), client_addr, listener.getsockname())
            # No thread until the client's first bytes arrive (gunicorn hands a new connection to
            # a thread at once, which then waits up to 5 s for them): the connection waits in the
            # poller, as gunicorn's own deferred ones do, and closes after `keepalive` seconds.
            conn.timeout = time.monotonic() + self.cfg.keepalive
            self.pending_conns.append(conn)
            waiting = partial(self.on_pending_socket_readable, conn)
            self.poller.register(conn.sock, selectors.EVENT_READ, waiting)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise


# --- gunicorn's own error answers -------------------------------------------------------------

# Gunicorn answers an unknown Transfer-Encoding with 501; to the client it is a bad request.
_STATUS_FOR_CLIENT = {501: 400}
# Gunicorn's message may quote the request line or a header back; enough of it to debug by.
_MESSAGE_LIMIT = 200


def error_bytes(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer (the connection closes after it) for one of gunicorn's errors."""
    status = _STATUS_FOR_CLIENT.get(status, status)
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        pass
    code = ERROR_CODES.get(status, "bad_request")
    body = json.dumps(error_body(code, (message or reason)[:_MESSAGE_LIMIT])).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def write_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """Drop-in for `gunicorn.util.write_error` (same arguments, same non-blocking write)."""
    util.write_nonblock(sock, error_bytes(status_int, reason, mesg))


def install() -> None:
    """Route gunicorn's error answers through `write_error`: its workers call `util.write_error`
    through the module, so setting it in the master before the workers fork covers every worker."""
    util.write_error = write_error
