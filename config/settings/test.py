"""pytest: the local settings, with the waits of the pipeline in seconds."""

from .local import *  # noqa: F403
from .local import env

API_RATE_LIMIT_PER_SECOND = env.int("API_RATE_LIMIT_PER_SECOND", default=10000)
CALLBACK_RETRY_SCHEDULE = env.list("CALLBACK_RETRY_SCHEDULE", cast=float, default=[0.5, 0.5, 1, 1, 2])
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
