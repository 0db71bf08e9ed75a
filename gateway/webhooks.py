"""Provider webhook endpoint: verify, store once, answer fast, hand off to the confirm task."""

import logging

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from config.celery_app import app as celery_app
from config.faults import fault_point
from config.middleware import error_response
from gateway import services
from gateway.providers.base import InvalidWebhook, get_adapter

logger = logging.getLogger(__name__)


def _hand_off(event) -> None:
    try:
        celery_app.send_task(
            "gateway.confirm",
            args=[
                {
                    "order_id": event.order_id,
                    "idempotency_key": event.idempotency_key,
                    "status": event.status,
                    "failure_code": event.failure_code,
                    "webhook_id": event.webhook_id,
                }
            ],
        )
    except Exception as exc:  # broker down: the stored webhook stays, status polling settles the order
        logger.warning("webhook.handoff_failed", extra={"order_id": event.order_id, "error": repr(exc)})


@csrf_exempt
@require_POST
def provider_webhook(request: HttpRequest, provider: str) -> JsonResponse:
    adapter = get_adapter(provider)
    if adapter is None:
        return error_response(404, "not_found", f"Unknown provider {provider!r}.")
    headers = {key: value for key, value in request.headers.items()}
    try:
        event = adapter.parse_webhook(body=request.body, headers=headers)
    except InvalidWebhook as exc:
        logger.warning("webhook.rejected", extra={"provider": provider, "reason": str(exc)})
        return error_response(401, "invalid_signature", "Webhook signature or timestamp is not valid.")
    with transaction.atomic():
        new = services.webhook_receive(provider=provider, event=event)
        if new:
            transaction.on_commit(lambda: fault_point("webhook.after_store"))
            transaction.on_commit(lambda: _hand_off(event))
    logger.info(
        "webhook.received",
        extra={
            "order_id": event.order_id,
            "provider": provider,
            "type": event.event_type,
            "duplicate": not new,
        },
    )
    return JsonResponse({"received": True, "duplicate": not new})
