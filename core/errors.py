"""Domain errors: what services raise when a rule of the domain says no.

Services never speak HTTP; the API layer maps these classes to statuses in one place
(core/exception_handlers.py). Each error carries a machine-readable `code` (SPEC 3's error
codes), a message for people and, optionally, the fields at fault.
"""


class DomainError(Exception):
    """A request the domain refuses, with a stable code for clients."""

    def __init__(self, code: str, message: str, fields: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields


class InvalidRequest(DomainError):
    """The request breaks a rule of the domain (a 400 over HTTP)."""


class NotFound(DomainError):
    """No such thing, or not the caller's (a 404 over HTTP)."""


class Conflict(DomainError):
    """The request clashes with the current state (a 409 over HTTP)."""


class Unprocessable(DomainError):
    """The request is well formed but cannot be processed as sent (a 422 over HTTP)."""
