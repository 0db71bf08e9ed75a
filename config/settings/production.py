"""Production: secrets and servers must come from the environment; no defaults for them."""

from django.core.exceptions import ImproperlyConfigured

from gateway.sandbox_server.secrets import DEFAULT_MASTER_SECRET

from .base import *  # noqa: F403
from .base import env

SECRET_KEY = env("SECRET_KEY")
DATABASES = {"default": env.db("DATABASE_URL")}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=600)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
REDIS_URL = env("REDIS_URL")
CACHES["default"]["LOCATION"] = REDIS_URL  # noqa: F405
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL)
DEBUG = False
# Part of every charge request (the provider's webhook address), stored with the attempt before
# the first send: it must be the same public address on every host, so it has no default here.
PUBLIC_BASE_URL = env("PUBLIC_BASE_URL")
# Every sandbox channel's webhook secret derives from this one; the public default would let
# anyone sign webhooks that settle charges.
SANDBOX_SECRET = env("SANDBOX_SECRET")
if SANDBOX_SECRET.strip() in ("", DEFAULT_MASTER_SECRET):
    raise ImproperlyConfigured("SANDBOX_SECRET must be set to a secret of your own in production.")
CALLBACK_ALLOW_PRIVATE_NETWORKS = env.bool("CALLBACK_ALLOW_PRIVATE_NETWORKS", default=False)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
