"""Domain errors of the orders service: services raise these; the API layer maps them to HTTP."""


class DomainError(Exception):
    """A refusal a client can act on: a machine-readable code, a message, optional field errors."""

    code = "error"

    def __init__(self, message: str, fields: dict | None = None, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields
        if code:
            self.code = code


class NotFound(DomainError):
    code = "not_found"


class Conflict(DomainError):
    code = "conflict"


class InvalidRequest(DomainError):
    code = "invalid_request"


class Unprocessable(DomainError):
    code = "unprocessable"


class IdempotencyKeyInUse(Conflict):
    code = "idempotency_key_in_use"


class IdempotencyKeyReused(Unprocessable):
    code = "idempotency_key_reused"


class DuplicateReference(Conflict):
    code = "duplicate_reference"


class OrderNotRefundable(Conflict):
    code = "order_not_refundable"


class AmountExceedsRefundable(InvalidRequest):
    code = "amount_exceeds_refundable"
