"""Production: secrets and servers must come from the environment; no defaults for them.

The entry points (manage.py, config/wsgi.py, config/celery_app.py) default to this module, so a
process started without DJANGO_SETTINGS_MODULE refuses to start here instead of running quietly
on the local settings; the Makefile, scripts/stack.sh and the tests name their module.
"""

from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured

from gateway.sandbox_server.secrets import DEFAULT_MASTER_SECRET

from .base import *  # noqa: F403
from .base import broker_settings, env

SECRET_KEY = env("SECRET_KEY")
DATABASES = {"default": env.db("DATABASE_URL")}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=600)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
REDIS_URL = env("REDIS_URL")
CACHE_URL = env("CACHE_URL", default=REDIS_URL)
CACHES["default"]["LOCATION"] = CACHE_URL  # noqa: F405
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL)
globals().update(
    broker_settings(
        CELERY_BROKER_URL,
        sentinel_master=CELERY_BROKER_SENTINEL_MASTER,  # noqa: F405
        visibility_timeout=CELERY_VISIBILITY_TIMEOUT,  # noqa: F405
        queues=SERVICE_QUEUES,  # noqa: F405
    )
)
DEBUG = False
# Part of every charge request (the provider's webhook address), stored with the attempt before
# the first send: it must be the same public address on every host, so it has no default here.
PUBLIC_BASE_URL = env("PUBLIC_BASE_URL")
# The host merchants and providers reach (PUBLIC_BASE_URL's) unless told otherwise; a request for
# another Host is a 400. The probes answer any Host (console/health.py ProbesMiddleware).
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=[urlsplit(PUBLIC_BASE_URL).hostname or ""])
# Every sandbox channel's webhook secret derives from this one; the public default would let
# anyone sign webhooks that settle charges.
SANDBOX_SECRET = env("SANDBOX_SECRET")
if SANDBOX_SECRET.strip() in ("", DEFAULT_MASTER_SECRET):
    raise ImproperlyConfigured("SANDBOX_SECRET must be set to a secret of your own in production.")
CALLBACK_ALLOW_PRIVATE_NETWORKS = env.bool("CALLBACK_ALLOW_PRIVATE_NETWORKS", default=False)

# HTTPS only. The probes stay reachable over plain HTTP from inside the network.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
# A client can send X-Forwarded-Proto itself: believed only behind a proxy that overwrites it.
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if TRUST_X_FORWARDED_PROTO else None  # noqa: F405
)

# Field encryption keys are their own secret: rotating SECRET_KEY must not re-key stored secrets.
FIELD_ENCRYPTION_KEYS = [key for key in env.list("FIELD_ENCRYPTION_KEY") if key]
FIELD_ENCRYPTION_KEY_REQUIRED = True
if not FIELD_ENCRYPTION_KEYS:
    raise ImproperlyConfigured("Set FIELD_ENCRYPTION_KEY (comma-separated Fernet keys)")
for _position, _key in enumerate(FIELD_ENCRYPTION_KEYS, start=1):
    try:
        Fernet(_key)
    except ValueError as exc:  # never echo the key itself
        raise ImproperlyConfigured(f"FIELD_ENCRYPTION_KEY: key {_position} is not a Fernet key") from exc

METRICS_REQUIRE_TOKEN = True
