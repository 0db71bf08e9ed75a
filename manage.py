#!/usr/bin/env python
"""Django's command-line utility."""

import os
import sys


def main() -> None:
    # Production unless told otherwise (see config/wsgi.py); the Makefile sets local.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
