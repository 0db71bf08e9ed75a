"""Fault injection for the fault tests: `fault_point(name)` kills this process at a named point, once.

Inert unless the process was started with `FAULT_POINTS` (comma-separated names) in its
environment: production never sets it, and the check is then one set lookup. A listed point
fires when `FAULT_DIR` holds no `<name>.fired` marker yet: the process that creates the marker
(O_EXCL, so exactly one process wins, whichever runs the point first) writes its pid and the
time into it and SIGKILLs itself. A test (re)arms a point by removing the marker, which needs
no restart of the processes that carry the point. Without `FAULT_DIR` a point fires once per
process.
"""

import os
import signal
import time

ARMED_POINTS = frozenset(
    name.strip() for name in os.environ.get("FAULT_POINTS", "").split(",") if name.strip()
)
FAULT_DIR = os.environ.get("FAULT_DIR", "")
_fired_here: set[str] = set()


def marker_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.fired")


def fault_point(name: str) -> None:
    """SIGKILL the current process here if `name` is armed and has not fired yet."""
    if name not in ARMED_POINTS:
        return
    if FAULT_DIR:
        try:
            fd = os.open(marker_path(FAULT_DIR, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()} {time.time():.6f}\n".encode())
        os.fsync(fd)
        os.close(fd)
    else:
        if name in _fired_here:
            return
        _fired_here.add(name)
    os.kill(os.getpid(), signal.SIGKILL)
