"""Settings shared by every environment; values come from the environment (django-environ)."""

from pathlib import Path

import environ

from config.broker import broker_settings

BASE_DIR = Path(__file__).resolve().parent.parent.parent
env = environ.Env()

SECRET_KEY = env("SECRET_KEY", default="dev-insecure-secret-key-change-me")
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "testserver"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "orders.apps.OrdersConfig",
    "allocation.apps.AllocationConfig",
    "gateway.apps.GatewayConfig",
    "callbacks.apps.CallbacksConfig",
    "console.apps.ConsoleConfig",
]

MIDDLEWARE = [
    "console.health.ProbesMiddleware",
    "core.middleware.RequestIdMiddleware",
    "core.middleware.BodySizeLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "core.middleware.ConsoleGarbageMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# The embedded servers' ports (scripts/services.sh): moving them moves these defaults too, so one
# PG_PORT / REDIS_PORT moves a whole local stack (`make run`), not only its servers.
LOCAL_PG_PORT = env.int("PG_PORT", default=55432)
LOCAL_REDIS_PORT = env.int("REDIS_PORT", default=56379)

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"postgres://payments@127.0.0.1:{LOCAL_PG_PORT}/payments"),
}
# Persistent connections: a new PostgreSQL connection per request costs more than the request.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=600)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# The per-order statements are prepared by name once per connection (core/prepared.py). A process
# behind a transaction-mode pooler (PgBouncer) must turn this off: its next transaction may land on
# a server connection that never saw the PREPARE (README, "PostgreSQL connections").
PREPARED_STATEMENTS = env.bool("PREPARED_STATEMENTS", default=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env("REDIS_URL", default=f"redis://127.0.0.1:{LOCAL_REDIS_PORT}/0")
# Rate limits, circuit breakers and the cache (orders/redis_client.py, CACHES): soft state, on a
# Redis of their own when CACHE_URL names one, else on REDIS_URL (a plain redis:// URL, also under
# a sentinel:// or amqp:// broker: losing it costs counts and cached values, never an order).
CACHE_URL = env("CACHE_URL", default=REDIS_URL)
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": CACHE_URL,
        "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
    }
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = env("STATIC_ROOT", default=None)
# Admin and API docs assets served by the app itself (whitenoise), from the finders in dev.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = False

# Bodies larger than this answer 413 (SPEC 3).
MAX_REQUEST_BODY_BYTES = 64 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BODY_BYTES

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["orders.authentication.MerchantKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["orders.authentication.IsMerchant"],
    "DEFAULT_THROTTLE_CLASSES": ["orders.throttling.MerchantKeyRateThrottle"],
    "DEFAULT_PARSER_CLASSES": ["core.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "core.negotiation.ContentNegotiation",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "core.exception_handlers.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
}
# Requests per second per API key, fixed one-second window (see orders/throttling.py).
API_RATE_LIMIT_PER_SECOND = env.int("API_RATE_LIMIT_PER_SECOND", default=100)

SPECTACULAR_SETTINGS = {
    "TITLE": "Payment orders API",
    "DESCRIPTION": (
        "Submit payment orders, read them back, follow their lifecycle, refund them.\n\n"
        "**Callbacks.** When an order is `paid` or `failed`, its `callback_url` (else the"
        ' merchant\'s) gets a `POST` of `{"type": "order.paid" | "order.failed", "data":'
        " <Order>}`; a refund's is `refund.succeeded` / `refund.failed` with the Refund."
        " `data.status` is the outcome; the order becomes `completed` once the receiver answers"
        " 2xx within 15 s. Signed as Standard Webhooks: `webhook-id` (the same on every retry:"
        " deduplicate by it), `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of"
        ' "{id}.{timestamp}.{body}">`, keyed with the decoded `whsec_` secret; verify with the'
        " official `standardwebhooks` library (`Webhook(secret).verify(body, headers)`). Anything"
        " else is retried with backoff for more than 24 h, then left to an operator: list"
        " `?status=paid` / `?status=failed` to reconcile orders whose callback was not taken."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI served from our own static files: no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Celery (SPEC 9): the broker only carries work; PostgreSQL is the record.
# The broker is chosen by its URL alone (SPEC 12, config/broker.py): redis://, rediss://,
# sentinel://h1:p;sentinel://h2:p (master CELERY_BROKER_SENTINEL_MASTER), amqp:// (RabbitMQ).
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_BROKER_SENTINEL_MASTER = env("CELERY_BROKER_SENTINEL_MASTER", default="mymaster")
CELERY_VISIBILITY_TIMEOUT = env.int("CELERY_VISIBILITY_TIMEOUT", default=300)
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# The web process must not hang on a dead Redis: the outbox relay publishes later.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2}
# Celery 5.6+ closes the DB connection around every task unless told to reuse it.
CELERY_DB_REUSE_MAX = env.int("CELERY_DB_REUSE_MAX", default=1_000_000)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Celery's consumer, except that a Redis restart under load does not kill the worker.
CELERY_WORKER_CONSUMER = "config.celery_worker:Consumer"
CELERY_TASK_DEFAULT_QUEUE = "orders"
SERVICE_QUEUES = ("orders", "allocation", "gateway", "callbacks")
# CELERY_BROKER_TRANSPORT(_OPTIONS), CELERY_TASK_QUEUES, ...: what the broker's kind asks for.
globals().update(
    broker_settings(
        CELERY_BROKER_URL,
        sentinel_master=CELERY_BROKER_SENTINEL_MASTER,
        visibility_timeout=CELERY_VISIBILITY_TIMEOUT,
        queues=SERVICE_QUEUES,
    )
)
# A task named "<app>.<name>" runs on the queue of its app.
CELERY_TASK_ROUTES = {f"{name}.*": {"queue": name} for name in SERVICE_QUEUES}
CELERY_TASK_TIME_LIMIT = 120
CELERY_TASK_SOFT_TIME_LIMIT = 100

# --- Beat: the outbox relay and the recovery sweeps (SPEC 8).
# Beat may run on several machines; one schedules at a time, holding a PostgreSQL advisory lock
# (core/beat.py). A session lock: via PgBouncer in transaction mode, BEAT_LOCK_DATABASE_URL
# must name PostgreSQL itself. Standbys try every BEAT_LOCK_RETRY_SECONDS; a holder that vanished
# without closing its socket loses the lock after about BEAT_LOCK_KEEPALIVE_SECONDS.
CELERY_BEAT_SCHEDULER = "core.beat:LockedScheduler"
BEAT_LOCK_DATABASE_URL = env("BEAT_LOCK_DATABASE_URL", default="")
BEAT_LOCK_RETRY_SECONDS = env.float("BEAT_LOCK_RETRY_SECONDS", default=5.0)
BEAT_LOCK_KEEPALIVE_SECONDS = env.float("BEAT_LOCK_KEEPALIVE_SECONDS", default=30.0)
BEAT_INTERVAL_SECONDS = env.float("BEAT_INTERVAL_SECONDS", default=5.0)
CELERY_BEAT_SCHEDULE = {
    "outbox-relay": {"task": "orders.relay_outbox", "schedule": BEAT_INTERVAL_SECONDS},
    "sweep-orders": {"task": "orders.sweep_orders", "schedule": BEAT_INTERVAL_SECONDS},
    "sweep-callbacks": {"task": "callbacks.sweep_deliveries", "schedule": BEAT_INTERVAL_SECONDS},
    "sweep-refunds": {"task": "orders.sweep_refunds", "schedule": BEAT_INTERVAL_SECONDS},
    "prune-idempotency-keys": {"task": "orders.prune_idempotency_keys", "schedule": 3600.0},
    # Retention (SPEC 12): one entry; orders.prune_history asks the other services in turn.
    "prune-history": {
        "task": "orders.prune_history",
        "schedule": env.float("RETENTION_INTERVAL_SECONDS", default=300.0),
    },
}
# History-only rows older than this are deleted: published outbox events, ignored signals,
# provider webhooks, callback attempts. Orders, charge attempts, deliveries, transitions stay.
RETENTION_DAYS = env.float("RETENTION_DAYS", default=30)
# Per table and pass: at most MAX_BATCHES short transactions of BATCH rows (about 40 ms each on
# a 2M-row outbox). The default budget, 500,000 rows per table per 5 minutes (1,666 rows/s), keeps
# up with 5 outbox events per order up to about 330 orders/s; past that, see docs/scaling.md.
RETENTION_BATCH = env.int("RETENTION_BATCH", default=5000)
RETENTION_MAX_BATCHES = env.int("RETENTION_MAX_BATCHES", default=100)
RETENTION_TASKS = ("gateway.prune_history", "callbacks.prune_history")

# --- Pipeline timings. Production waits minutes; local and test settings shorten them.
OUTBOX_RELAY_AGE_SECONDS = env.float("OUTBOX_RELAY_AGE_SECONDS", default=10.0)
OUTBOX_RELAY_BATCH = env.int("OUTBOX_RELAY_BATCH", default=500)
SWEEP_BATCH = env.int("SWEEP_BATCH", default=200)
# How long an order may sit in a stage before the sweep acts on it.
STAGE_TIMEOUT_SECONDS = {
    "pending": env.float("PENDING_TIMEOUT_SECONDS", default=60.0),
    "assigned": env.float("ASSIGNED_TIMEOUT_SECONDS", default=60.0),
    # processing: first status poll (PSync-like), then POLL_INTERVAL_SECONDS growing.
    "processing": env.float("POLL_FIRST_SECONDS", default=60.0),
    # paid/failed: the callback task should have run; the sweep makes sure it does.
    "paid": env.float("CALLBACK_GRACE_SECONDS", default=60.0),
    "failed": env.float("CALLBACK_GRACE_SECONDS", default=60.0),
}
POLL_INTERVAL_SECONDS = env.float("POLL_INTERVAL_SECONDS", default=180.0)
POLL_MAX_COUNT = env.int("POLL_MAX_COUNT", default=20)
# The sweep's backoff doubles per re-announcement of the same order, up to this many seconds.
SWEEP_MAX_BACKOFF_SECONDS = env.float("SWEEP_MAX_BACKOFF_SECONDS", default=3600.0)
# A queue holding this many messages is behind: the sweeps put off re-announcing into it (the
# order's own message is most likely among them) instead of deepening it. 0: never hold off.
SWEEP_HOLD_QUEUE_DEPTH = env.int("SWEEP_HOLD_QUEUE_DEPTH", default=500)
IDEMPOTENCY_KEY_TTL_HOURS = env.int("IDEMPOTENCY_KEY_TTL_HOURS", default=48)
# An in-flight idempotency key older than this belongs to a request that died.
IDEMPOTENCY_IN_FLIGHT_TIMEOUT_SECONDS = env.float("IDEMPOTENCY_IN_FLIGHT_TIMEOUT_SECONDS", default=60.0)

# --- Gateway
# Where providers send webhooks. Unset, the web's own address (WEB_BIND, a wildcard read as
# loopback), so a second stack moved by its ports alone gets its own webhooks, not the first's.
_web_host, _, _web_port = env("WEB_BIND", default="127.0.0.1:8000").rpartition(":")
if not _web_port.isdigit() or _web_host.startswith("unix"):
    _web_host, _web_port = "127.0.0.1", "8000"
if _web_host in ("", "0.0.0.0", "[::]"):  # noqa: S104 - a wildcard bind, read as loopback
    _web_host = "127.0.0.1"
PUBLIC_BASE_URL = env("PUBLIC_BASE_URL", default=f"http://{_web_host}:{_web_port}")
SANDBOX_URL = env("SANDBOX_URL", default="http://127.0.0.1:8001")
SANDBOX_SECRET = env("SANDBOX_SECRET", default="sandbox-dev-secret")
# Stripe channels (SPEC 11): the API a channel without an `api_base` of its own talks to.
STRIPE_API_BASE = env("STRIPE_API_BASE", default="https://api.stripe.com")
# The localstripe of `make run`/`up` and the tests, which `seed_sandbox` points `stripe-test` at.
LOCALSTRIPE_URL = env("LOCALSTRIPE_URL", default="http://127.0.0.1:8420")
GATEWAY_CONNECT_TIMEOUT = env.float("GATEWAY_CONNECT_TIMEOUT", default=3.0)
GATEWAY_READ_TIMEOUT = env.float("GATEWAY_READ_TIMEOUT", default=10.0)
# The breaker opens when, within one window, at least THRESHOLD charges failed and they were at
# least RATIO of the channel's answers; after the cool-down it lets one trial charge through.
CIRCUIT_FAILURE_THRESHOLD = env.int("CIRCUIT_FAILURE_THRESHOLD", default=10)
CIRCUIT_FAILURE_RATIO = env.float("CIRCUIT_FAILURE_RATIO", default=0.5)
CIRCUIT_WINDOW_SECONDS = env.int("CIRCUIT_WINDOW_SECONDS", default=60)
CIRCUIT_COOLDOWN_SECONDS = env.int("CIRCUIT_COOLDOWN_SECONDS", default=30)
# A refund the provider refused as unavailable (nothing refunded) is sent again on the same channel
# after REFUND_RETRY_SECONDS, doubling up to REFUND_RETRY_MAX_SECONDS, at most REFUND_MAX_SENDS
# times; then it fails with channel_unavailable (nothing was refunded).
REFUND_RETRY_SECONDS = env.float("REFUND_RETRY_SECONDS", default=5.0)
REFUND_RETRY_MAX_SECONDS = env.float("REFUND_RETRY_MAX_SECONDS", default=600.0)
REFUND_MAX_SENDS = env.int("REFUND_MAX_SENDS", default=12)
# How long an order whose only fitting channels are cooling down waits for them (from its
# creation) before it fails with channel_unavailable.
CHANNEL_WAIT_SECONDS = env.float("CHANNEL_WAIT_SECONDS", default=300.0)

# --- Callbacks (SPEC 6): Standard Webhooks' schedule, in seconds.
CALLBACK_RETRY_SCHEDULE = env.list(
    "CALLBACK_RETRY_SCHEDULE",
    cast=float,
    default=[5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400],
)
CALLBACK_CONNECT_TIMEOUT = env.float("CALLBACK_CONNECT_TIMEOUT", default=5.0)
CALLBACK_TOTAL_TIMEOUT = env.float("CALLBACK_TOTAL_TIMEOUT", default=15.0)
CALLBACK_ALLOW_PRIVATE_NETWORKS = env.bool("CALLBACK_ALLOW_PRIVATE_NETWORKS", default=False)

LOG_LEVEL = env("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "context": {"()": "core.logging.ContextFilter"},
        "client_fault_line": {"()": "core.logging.ClientFaultLine"},
        "server_errors_only": {"()": "core.logging.ServerErrorsOnly"},
    },
    "formatters": {
        "json": {
            "()": "core.logging.UtcJsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger", "message": "event"},
        }
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json", "filters": ["context"]}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "celery": {"level": "WARNING"},
        # The library logs request bodies (payment methods) at DEBUG and every request at INFO.
        "stripe": {"level": "WARNING"},
        "gunicorn.access": {"level": "WARNING"},
        # A request for a Host not in ALLOWED_HOSTS (a JSON 400): one line, no traceback.
        "django.security.DisallowedHost": {"filters": ["client_fault_line"]},
        # 4xx answers are logged by RequestIdMiddleware, with the request and order ids.
        "django.request": {"filters": ["server_errors_only"]},
    },
}

# Callback delivery bounds
# (CALLBACK_CONNECT_TIMEOUT and CALLBACK_TOTAL_TIMEOUT above bound one attempt by wall clock.)
# How many callback attempts to one merchant's receivers may run at once, across all workers:
# a slow receiver holds at most this many worker slots; the others serve everyone else.
CALLBACK_RECEIVER_CONCURRENCY = env.int("CALLBACK_RECEIVER_CONCURRENCY", default=2)
# When a merchant's slots are all taken, its due callback waits this long (x1 to 1.5), unspent.
CALLBACK_RECEIVER_BUSY_SECONDS = env.float("CALLBACK_RECEIVER_BUSY_SECONDS", default=5.0)
# Before that, a worker waits this long for one of the slots: a healthy receiver frees one within
# milliseconds, so a burst of one merchant's callbacks is not pushed back by seconds.
CALLBACK_RECEIVER_WAIT_SECONDS = env.float("CALLBACK_RECEIVER_WAIT_SECONDS", default=0.5)
# A receiver whose last attempt failed (a timeout, a refusal, a non-2xx) is "struggling" until one
# succeeds, or this long after its last failure: its callbacks share, with every other struggling
# receiver's, this many attempts at once across all workers (keep it below the callbacks workers'
# concurrency, so the rest always serve healthy receivers), and no longer wait for a slot.
CALLBACK_STRUGGLING_CONCURRENCY = env.int("CALLBACK_STRUGGLING_CONCURRENCY", default=2)
CALLBACK_STRUGGLING_SECONDS = env.int("CALLBACK_STRUGGLING_SECONDS", default=600)

# API hardening
# Every error under /api/ in the JSON shape, whichever view answered (SPEC 3); right after the
# request id, so it also rewrites the answers of the middleware below it.
MIDDLEWARE.insert(
    MIDDLEWARE.index("core.middleware.RequestIdMiddleware") + 1, "core.middleware.ApiJsonErrorsMiddleware"
)
# Keys for secrets we must keep recoverable (webhook secrets), core/crypto.py: comma-separated
# Fernet keys, the first encrypts and all decrypt, so keys rotate. Empty: a development key
# derived from SECRET_KEY; production requires them (config/settings/production.py).
FIELD_ENCRYPTION_KEYS = env.list("FIELD_ENCRYPTION_KEY", default=[])
FIELD_ENCRYPTION_KEY_REQUIRED = False
# X-Forwarded-Proto says "https" only when a proxy we run sets it and drops the client's own.
TRUST_X_FORWARDED_PROTO = env.bool("TRUST_X_FORWARDED_PROTO", default=False)
# /metrics (SPEC 3): needs `Authorization: Bearer <METRICS_TOKEN>` when a token is set or the
# settings require one (production, where no token means nobody reads it).
METRICS_TOKEN = env("METRICS_TOKEN", default="")
METRICS_REQUIRE_TOKEN = False
# A scrape's database counts are reused for this long: scrapers and dashboards polling at once
# cost one query each per interval, not one each per scrape.
METRICS_DB_CACHE_SECONDS = env.float("METRICS_DB_CACHE_SECONDS", default=5.0)
# Requests without valid credentials per client IP and second (bad or missing API keys, provider
# webhooks that fail verification, admin login posts); over it: 429 (core/middleware.py).
UNAUTHENTICATED_RATE_LIMIT_PER_SECOND = env.int("UNAUTHENTICATED_RATE_LIMIT_PER_SECOND", default=20)
MIDDLEWARE.insert(
    MIDDLEWARE.index("core.middleware.ApiJsonErrorsMiddleware") + 1,
    "core.middleware.UnauthenticatedRateLimitMiddleware",
)
# The client IP is REMOTE_ADDR, or behind this many proxies of ours the X-Forwarded-For entry
# they added (counted from the right: entries further left are the client's own claims).
TRUSTED_PROXY_COUNT = env.int("TRUSTED_PROXY_COUNT", default=0)
# The callback URL check at order creation resolves the host in the request thread: bounded.
CALLBACK_URL_RESOLVE_TIMEOUT_SECONDS = env.float("CALLBACK_URL_RESOLVE_TIMEOUT_SECONDS", default=2.0)
# The provider webhook endpoint and the probes are plain Django views: described by hand.
SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"] = [
    "drf_spectacular.hooks.postprocess_schema_enums",
    "config.openapi.add_plain_django_paths",
    "config.openapi.declare_response_headers",
]
