"""Gunicorn settings for the API (web) process; sizes come from the environment."""

import os

from core import http_server

bind = os.environ.get("WEB_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_WORKERS") or 3)
threads = int(os.environ.get("WEB_THREADS") or 2)
# gthread with a read deadline per request (core/http_server.py), also for one thread.
worker_class = "core.http_server.ThreadWorker"
keepalive = 30
timeout = 60
graceful_timeout = 15
accesslog = os.environ.get("WEB_ACCESS_LOG") or None
errorlog = "-"
proc_name = "payments-web"
# Gunicorn's per-user control socket would collide with the sandbox's gunicorn; we do not use it.
control_socket_disable = True
# Requests gunicorn rejects before Django sees them are answered in the API's JSON error shape.
http_server.install()


def on_starting(server) -> None:
    """Forget metrics files of processes that no longer exist (a previous run of the stack).

    `make up` empties the directory when it starts the stack from nothing; under `make run` the
    processes start together, so only files whose process is gone are removed here.
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path or not os.path.isdir(path):
        return
    for name in os.listdir(path):
        pid = name.rsplit("_", 1)[-1].removesuffix(".db")
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            os.remove(os.path.join(path, name))
        except PermissionError:
            pass  # alive, another user's


def child_exit(server, worker) -> None:
    """Drop a dead worker's live gauge files (prometheus-client multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
