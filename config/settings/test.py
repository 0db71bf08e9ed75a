"""pytest: the local settings, with the waits of the pipeline in seconds."""

import os
import re
import sys

from .local import *  # noqa: F403
from .local import broker_settings, env

API_RATE_LIMIT_PER_SECOND = env.int("API_RATE_LIMIT_PER_SECOND", default=10000)
UNAUTHENTICATED_RATE_LIMIT_PER_SECOND = env.int("UNAUTHENTICATED_RATE_LIMIT_PER_SECOND", default=10000)
# Tests read /metrics right after what they count; the cache has a test of its own.
METRICS_DB_CACHE_SECONDS = env.float("METRICS_DB_CACHE_SECONDS", default=0.0)
CALLBACK_RETRY_SCHEDULE = env.list("CALLBACK_RETRY_SCHEDULE", cast=float, default=[0.5, 0.5, 1, 1, 2])
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Tests use their own Redis database, so a running dev stack's queues are left alone.
REDIS_URL = env("TEST_REDIS_URL", default=f"redis://127.0.0.1:{LOCAL_REDIS_PORT}/1")  # noqa: F405
# `make test` runs two pytest workers (pytest-xdist): each gets the next Redis database, as it
# gets a database of its own from pytest-django. Only the pytest process itself shifts: the
# stacks it starts are handed the shifted URL (TEST_REDIS_URL) and must not shift it again.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if "pytest" in sys.modules and _XDIST_WORKER.startswith("gw"):
    REDIS_URL = re.sub(
        r"/(\d+)$", lambda m: f"/{int(m.group(1)) + int(_XDIST_WORKER[2:])}", REDIS_URL.rstrip("/")
    )
CACHE_URL = env("TEST_CACHE_URL", default=REDIS_URL)
CACHES["default"]["LOCATION"] = CACHE_URL  # noqa: F405
# TEST_CELERY_BROKER_URL: tests/scale runs stacks on Sentinel and RabbitMQ brokers of their own.
CELERY_BROKER_URL = env("TEST_CELERY_BROKER_URL", default=REDIS_URL)
globals().update(
    broker_settings(
        CELERY_BROKER_URL,
        sentinel_master=CELERY_BROKER_SENTINEL_MASTER,  # noqa: F405
        visibility_timeout=CELERY_VISIBILITY_TIMEOUT,  # noqa: F405
        queues=SERVICE_QUEUES,  # noqa: F405
    )
)
SANDBOX_URL = env("SANDBOX_URL", default="http://127.0.0.1:18001")
PUBLIC_BASE_URL = env("PUBLIC_BASE_URL", default="http://127.0.0.1:18000")
# The e2e stack's localstripe: a port of its own per suite (tests/e2e/conftest.py), so parallel
# suites and a running dev stack on 8420 never share one.
LOCALSTRIPE_URL = env(
    "LOCALSTRIPE_URL", default=f"http://127.0.0.1:{env.int('E2E_PORT_BASE', default=18000) + 3}"
)
