"""Scripted TCP peers on 127.0.0.1 for tests of our HTTP clients against hostile servers: each
accepted connection is handed to a script in a thread of its own."""

import socket
import threading


class LoopbackServer:
    """Accepts connections on 127.0.0.1 (a free port) until closed; `handle(conn)` serves each one
    in its own thread. `done` is set by close(), for scripts that wait on the test."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.05)
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handle(conn)
            except OSError:
                pass  # the client hung up first: that is the point of most of these tests

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self, timeout: float = 30.0) -> None:
        self.done.set()
        self.server.close()
        self.thread.join(timeout=timeout)


def read_http_request(conn: socket.socket) -> bytes:
    """One HTTP request off `conn`: its head and its Content-Length body (what arrived of them)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body
