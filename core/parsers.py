"""Request body parsing: DRF's JSON parser, with over-deep nesting answered as bad JSON."""

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError as exc:
            # json raises RecursionError, not ValueError, for deeply nested input: a 400, not a 500.
            raise ParseError("JSON parse error - nested too deeply.") from exc
