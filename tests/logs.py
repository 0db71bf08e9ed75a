"""Capturing what the console handler would print: the settings' JSON formatter and filter."""

import contextlib
import io
import logging
from collections.abc import Callable, Iterator

from django.conf import settings
from django.utils.module_loading import import_string

from core.logging import ContextFilter


@contextlib.contextmanager
def console_output(level: int) -> Iterator[Callable[[], str]]:
    """On the root logger at `level` for the block; yields a reader of everything written so far."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    formatter = settings.LOGGING["formatters"]["json"]
    handler.setFormatter(
        import_string(formatter["()"])(formatter["fmt"], rename_fields=formatter["rename_fields"])
    )
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield stream.getvalue
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
