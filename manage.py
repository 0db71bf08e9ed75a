#!/usr/bin/env python
"""Django's command-line utility."""

import os
import sys
from pathlib import Path


def default_settings() -> str:
    """Production unless told otherwise (see config/wsgi.py), with one exception: in a checkout
    whose embedded stack exists (`.run/pg`, made by `make run`, `make up` and `make test`) and an
    environment that names no settings and holds no SECRET_KEY, the local settings, so that
    `.venv/bin/python manage.py create_merchant NAME` works as SPEC 2 and the README write it.
    A production host has no `.run/pg`, and there production's settings refuse to start without
    their environment, as before.
    """
    embedded = Path(__file__).resolve().parent / ".run" / "pg"
    if not os.environ.get("SECRET_KEY") and os.path.lexists(embedded):
        return "config.settings.local"
    return "config.settings.production"


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", default_settings())
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
