"""WSGI entry point for gunicorn."""

import os

from django.core.wsgi import get_wsgi_application

# Production unless told otherwise: its settings refuse to start without their secrets,
# where the local ones would run quietly on development defaults (`make run` sets local).
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")

application = get_wsgi_application()
