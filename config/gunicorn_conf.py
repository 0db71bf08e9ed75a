"""Gunicorn settings for the API (web) process; sizes come from the environment."""

import os

bind = os.environ.get("WEB_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_WORKERS") or 3)
threads = int(os.environ.get("WEB_THREADS") or 2)
worker_class = "gthread" if threads > 1 else "sync"
keepalive = 30
timeout = 60
graceful_timeout = 15
accesslog = os.environ.get("WEB_ACCESS_LOG") or None
errorlog = "-"
proc_name = "payments-web"
# Gunicorn's per-user control socket would collide with the sandbox's gunicorn; we do not use it.
control_socket_disable = True
