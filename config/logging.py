"""Log context: a request id and order id that follow an order from the API into every task."""

import contextvars
import logging
import uuid

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
order_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("order_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


class ContextFilter(logging.Filter):
    """Adds the current request and order ids to every record that does not carry its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "order_id", None) is None:
            order_id = order_id_var.get()
            if order_id is not None:
                record.order_id = order_id
        return True
