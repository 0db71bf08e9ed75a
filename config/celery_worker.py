"""The worker's broker consumer: Celery's own, made to survive a Redis restart under load.

Celery 5.7.0 with kombu 5.7.0 (Redis transport): when the broker connection drops while the
worker holds unacknowledged messages, the consumer first collect()s the broken connection (the
transport forgets its client) and then close()s it; closing the channel tries to put the unacked
messages back, needs a Redis client for that, and fails with AttributeError ("'NoneType' object
has no attribute 'hostname'"). That error is not a connection error, so the worker treats it as
unrecoverable and exits: one Redis blip under load and every busy worker is gone for good.

Here that error is logged and the reconnect goes on as Celery intends. Nothing is lost by
it: the messages stay in Redis's unacked set and come back after the visibility timeout, and
PostgreSQL's sweeps re-announce any order the wait would otherwise hold up.
"""

import logging

from celery.worker.consumer import Consumer as CeleryConsumer

logger = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The same AttributeError comes out of acking a message of the dead connection when its
        # task finishes after the reconnect began. Counted as a connection error, it is logged
        # ("Couldn't ack") instead of stopping the worker; the message is redelivered later and
        # the stage tasks are idempotent.
        self.connection_errors = (*self.connection_errors, AttributeError)

    def on_connection_error_after_connected(self, exc) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as error:
            logger.warning(
                "worker.broker_close_failed",
                extra={"error": repr(error), "connection_error": repr(exc)},
            )
