"""Gunicorn settings for the sandbox provider (gthread workers, each with its own webhook dispatcher)."""

import logging
import os

bind = os.environ.get("SANDBOX_BIND", "127.0.0.1:8001")
worker_class = "gthread"
workers = int(os.environ.get("SANDBOX_WORKERS") or 2)
# Threads, not processes, carry concurrency: a held "62" response sleeps in one thread without a DB
# connection, and the pool size in app.start_background follows this number through the environment.
threads = int(os.environ.get("SANDBOX_THREADS") or 16)
os.environ.setdefault("SANDBOX_THREADS", str(threads))
keepalive = 30  # the gateway keeps connections open through a requests.Session
timeout = 60
graceful_timeout = 15
accesslog = os.environ.get("SANDBOX_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("SANDBOX_LOG_LEVEL", "info")
proc_name = "payments-sandbox"
# Gunicorn's control socket defaults to one path per user; the project's Django gunicorn would fight
# over it, and the sandbox has no use for runtime control.
control_socket_disable = True


def post_worker_init(worker) -> None:
    """Open the pool and start the dispatcher after the fork, so nothing is shared with the master."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=os.environ.get("SANDBOX_LOG_LEVEL", "info").upper(),
            format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
        )
    from gateway.sandbox_server.app import start_background

    start_background()


def worker_exit(server, worker) -> None:
    """Hand back unsent webhooks and record outcomes before the worker goes."""
    from gateway.sandbox_server.app import stop_background

    stop_background()
