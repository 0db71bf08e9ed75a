"""Operator writes on merchants from the console (the API's writes stay in services.py)."""

import logging

from orders.models import Merchant
from orders.services import callback_url_validate

logger = logging.getLogger(__name__)


def merchant_update(*, merchant: Merchant, name: str, callback_url: str, is_active: bool) -> Merchant:
    """Change what an operator may change: never keys or secrets (those rotate, see services.py)."""
    callback_url_validate(callback_url)
    merchant.name = name
    merchant.callback_url = callback_url
    merchant.is_active = is_active
    merchant.save(update_fields=["name", "callback_url", "is_active"])
    logger.info(
        "merchant.updated",
        extra={"merchant": str(merchant.id), "is_active": is_active, "callback_url": callback_url},
    )
    return merchant
