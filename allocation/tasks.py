"""The allocate stage: order-created -> a channel, or failed."""

import logging

from celery import shared_task
from django.db import OperationalError

from allocation import services

logger = logging.getLogger(__name__)


@shared_task(
    name="allocation.allocate",
    autoretry_for=(OperationalError,),
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=5,
)
def allocate(event: dict) -> None:
    services.order_allocate(order_id=event["order_id"])
