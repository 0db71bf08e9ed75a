"""`make up` after a `kill -9` of a process's leader (found by a soak: gunicorn's master killed, its
workers went on serving and holding the port, the new master could not bind it and exited, and
the API stayed down until a second `make up`). scripts/stack.sh, run as it is, on a Procfile of
one stand-in: a master that forks a worker serving the port, as gunicorn does."""

import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The worker answers every request with its own pid; it never notices that its master died.
SERVER = textwrap.dedent(
    """
    import os, socket, sys, time
    host, port = os.environ["WEB_BIND"].split(":")
    child = os.fork()
    if child == 0:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, int(port)))
        except OSError:
            os._exit(1)
        listener.listen(16)
        while True:
            conn, _ = listener.accept()
            conn.recv(65536)
            body = str(os.getpid()).encode()
            conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
            conn.close()
    _, status = os.waitpid(child, 0)
    sys.exit(1)  # as gunicorn's master does when it cannot bind
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answering_pid(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
        return int(conn.recv(4096).split(b"\r\n\r\n", 1)[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead: its parent (here, nobody) has not reaped it yet
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


# A provider's stand-in that takes a while to listen (localstripe's Python start-up, say).
SLOW_STAND_IN = textwrap.dedent(
    """
    import os, socket, time
    host, port = os.environ["SANDBOX_BIND"].split(":")
    time.sleep(2)
    listener = socket.create_server((host, int(port)))
    while True:
        listener.accept()[0].close()
    """
)


@pytest.fixture
def make_stack(tmp_path):
    """`make_stack(procfile)`: scripts/stack.sh in a folder of its own, run with `stack(command)`."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "stack.sh", tmp_path / "scripts" / "stack.sh")
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "slow.py").write_text(SLOW_STAND_IN)
    env = {**os.environ, "WEB_BIND": f"127.0.0.1:{free_port()}", "SANDBOX_BIND": f"127.0.0.1:{free_port()}"}

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "scripts/stack.sh", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def make(procfile: str):
        (tmp_path / "Procfile").write_text(procfile)
        return run

    run.port = int(env["WEB_BIND"].rsplit(":", 1)[1])
    run.sandbox_port = int(env["SANDBOX_BIND"].rsplit(":", 1)[1])
    run.pid_file = tmp_path / ".run" / "pids" / "web.pid"
    yield make
    run("down")


@pytest.fixture
def stack(make_stack):
    return make_stack("web: exec python3 server.py\n")


def test_up_after_the_master_was_killed_stops_its_orphaned_workers_and_serves_again(stack):
    # given: the stack up, and its master killed -9; the orphaned worker still serves the port
    assert stack("up").returncode == 0
    master = int(stack.pid_file.read_text())
    orphan = answering_pid(stack.port)
    os.kill(master, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive(master) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answering_pid(stack.port) == orphan
    # when: the operator's `make up`
    done = stack("up")
    # then: the orphan is stopped, and a new master's worker serves the port
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stopping what is left of web" in done.stdout
    assert not alive(orphan)
    new_master = int(stack.pid_file.read_text())
    assert new_master != master and alive(new_master)
    assert answering_pid(stack.port) not in (orphan, master)


def test_up_is_done_only_once_the_providers_stand_ins_listen(make_stack):
    # given: a sandbox that listens 2 s after it starts, long after the web is ready
    stack = make_stack("web: exec python3 server.py\nsandbox: exec python3 slow.py\n")
    # when
    done = stack("up")
    # then: `up` has waited for it; the first charge would find it listening
    assert done.returncode == 0, done.stdout + done.stderr
    socket.create_connection(("127.0.0.1", stack.sandbox_port), timeout=1).close()
