"""A deadline on a whole HTTP exchange made with requests: connect, TLS, status line, headers, body.

requests' timeouts bound each socket read, not the exchange: a peer that drips a byte a second
never trips them, and a worker waits on it for as long as the peer likes. Inside `deadline(s)`,
every connection of a `watched` session is shut down at the deadline, wherever a read is blocked,
and the blocked call returns with an error at once. Used by the callbacks' client (a merchant's
receiver) and the provider adapters (a gateway's answer): peers on the network, never trusted.
"""

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


class _Reaper:
    """The one thread per process that ends attempts at their deadlines.

    A thread per exchange (threading.Timer) cost 0.27-0.30 ms of CPU per callback to start and
    cancel, a fifth of the attempt's own client work. Here an attempt only pushes its deadline
    onto a heap; the thread sleeps until the earliest one, expires what is due and drops what
    finished meanwhile, all in one wake. It is started on first use in each process (a prefork
    child does not inherit its parent's threads). A finished attempt leaves the heap when it
    reaches the head: at most one total timeout's worth of them wait there.
    """

    def __init__(self) -> None:
        self._pid: int | None = None
        self._starting = threading.Lock()
        # A forked child starts its own thread on first use, with a lock no parent thread holds.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pid, self._starting = None, threading.Lock()

    def _start(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Watchdog]] = []
        self._seq = itertools.count()
        self._pid = os.getpid()
        threading.Thread(target=self._run, name="http-deadline-reaper", daemon=True).start()

    def add(self, deadline: float, watchdog: "_Watchdog") -> None:
        if self._pid != os.getpid():
            with self._starting:
                if self._pid != os.getpid():
                    self._start()
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), watchdog))
            if self._heap[0][2] is watchdog:  # earlier than what the thread sleeps until
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][2].done):
                    heapq.heappop(self._heap)[2].expire()
                self._cond.wait(self._heap[0][0] - now if self._heap else None)


_reaper = _Reaper()


class _Watchdog:
    """Ends an attempt at its deadline by shutting its sockets down, wherever a read is blocked.

    Socket timeouts bound each read, not the exchange: a receiver that drips a byte a second
    never trips them. Shutting a socket down from another thread (the reaper's) makes the blocked
    read (TLS handshake, status line, headers or body) return at once. Each watched socket is held
    as a duplicate descriptor of our own, so the shutdown reaches it even after TLS wrapping
    detached the original object, and can never hit a descriptor the process has since reused.
    """

    def __init__(self, deadline: float) -> None:
        self.expired = False
        self.done = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        _reaper.add(deadline, self)

    def watch(self, sock: socket.socket) -> None:
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        with self._lock:
            if self.done:
                dup.close()
                return
            self._socks.append(dup)
            if self.expired:
                self._shutdown(dup)

    def expire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.expired = True
            for sock in self._socks:
                self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more: the read it would have ended is over

    def cancel(self) -> None:
        with self._lock:
            self.done = True
            for sock in self._socks:
                sock.close()
            self._socks.clear()


_current = threading.local()


def _watch(sock: socket.socket | None) -> None:
    watchdog = getattr(_current, "watchdog", None)
    if watchdog is not None and sock is not None:
        watchdog.watch(sock)


class _WatchedConnectionMixin:
    """Hands each socket to this thread's attempt watchdog: a new one as soon as it is connected
    (before any TLS handshake), a pooled one when it is used again."""

    def _new_conn(self):
        sock = super()._new_conn()
        _watch(sock)
        return sock

    def getresponse(self):
        _watch(self.sock)
        return super().getresponse()


class _WatchedHTTPConnection(_WatchedConnectionMixin, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnectionMixin, HTTPSConnection):
    pass


class _WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


def watched(session: requests.Session) -> requests.Session:
    """`session` with its adapters' connections handed to the calling thread's deadline (its
    adapters and their other settings, an IP filter among them, stay as they are)."""
    for adapter in session.adapters.values():
        adapter.poolmanager.pool_classes_by_scheme = {
            "http": _WatchedHTTPConnectionPool,
            "https": _WatchedHTTPSConnectionPool,
        }
    return session


@contextmanager
def deadline(seconds: float) -> Iterator[_Watchdog]:
    """Requests of watched sessions made inside end by `seconds` from now; `.expired` says
    afterwards whether the deadline cut one short."""
    watchdog = _Watchdog(time.monotonic() + seconds)
    _current.watchdog = watchdog
    try:
        yield watchdog
    finally:
        watchdog.cancel()
        _current.watchdog = None
