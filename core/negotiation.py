"""Content negotiation with DRF's rules, but an unknown `?format=` is a 406 that says what there is.

DRF's own raises Django's Http404 for a format no renderer of the view has (`?format=xml`): a
"not found" for a resource that exists, and, raised inside the view, not an APIException.
"""

from rest_framework import exceptions
from rest_framework.negotiation import DefaultContentNegotiation


class ContentNegotiation(DefaultContentNegotiation):
    def filter_renderers(self, renderers, format):
        kept = [renderer for renderer in renderers if renderer.format == format]
        if not kept:
            # The asked-for value is not echoed: it is whatever the query string held.
            offered = ", ".join(sorted({renderer.format for renderer in renderers}))
            raise exceptions.NotAcceptable(f"Unknown format; this resource is answered as: {offered}.")
        return kept
