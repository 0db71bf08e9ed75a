"""The allocate stage: order-created -> a channel, or failed."""

import logging

from allocation import services
from core.tasks import stage_task
from orders import events

logger = logging.getLogger(__name__)


@stage_task(events.ALLOCATE)
def allocate(event: dict) -> None:
    services.order_allocate(order_id=event["order_id"])
