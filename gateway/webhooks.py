"""Provider webhook endpoint: verify, store once, answer fast, hand off to the confirm task."""

import logging

from django.core.exceptions import RequestDataTooBig
from django.db import transaction
from django.http import HttpRequest, JsonResponse, UnreadablePostError
from django.views.decorators.csrf import csrf_exempt

from core.faults import fault_point
from core.middleware import error_response
from gateway import services
from gateway.providers.base import IgnoredWebhook, InvalidWebhook, MalformedWebhook, get_adapter
from gateway.services import Receipt

logger = logging.getLogger(__name__)


def _hand_off(event, provider: str) -> None:
    services.word_hand_off(
        kind=event.kind,
        order_id=event.order_id,
        idempotency_key=event.idempotency_key,
        status=event.status,
        failure_code=event.failure_code,
        webhook_id=event.webhook_id,
        channel=event.channel,
        provider=provider,
        provider_reference=event.provider_reference,
    )


@csrf_exempt
def provider_webhook(request: HttpRequest, provider: str) -> JsonResponse:
    # Every refusal is a JSON error and changes nothing: the body is only trusted once its
    # signature checks out, and only then does anything write to the database.
    if request.method != "POST":
        response = error_response(405, "method_not_allowed", "Provider webhooks are POSTed.")
        response["Allow"] = "POST"
        return response
    adapter = get_adapter(provider)
    if adapter is None:
        return error_response(404, "not_found", "Unknown provider.")
    try:
        body = request.body
    except (RequestDataTooBig, UnreadablePostError):
        return error_response(400, "invalid_body", "The webhook body could not be read.")
    headers = {key: value for key, value in request.headers.items()}
    try:
        event = adapter.parse_webhook(body=body, headers=headers)
    except IgnoredWebhook as exc:
        # Authentic, and nothing for us (another event type, a charge not ours): acknowledged, so
        # the provider does not retry it for days; nothing is stored.
        logger.info("webhook.ignored", extra={"provider": provider, "reason": str(exc)})
        return JsonResponse({"received": True, "duplicate": False, "ignored": True})
    except MalformedWebhook as exc:
        logger.warning("webhook.malformed", extra={"provider": provider, "reason": str(exc)})
        return error_response(400, "invalid_body", "The webhook body is not a readable provider event.")
    except InvalidWebhook as exc:
        logger.warning("webhook.rejected", extra={"provider": provider, "reason": str(exc)})
        return error_response(
            adapter.invalid_signature_status,
            "invalid_signature",
            "Webhook signature or timestamp is not valid.",
        )
    try:
        with transaction.atomic():
            receipt = services.webhook_receive(provider=provider, event=event)
            if receipt in (Receipt.NEW, Receipt.HELD):
                transaction.on_commit(lambda: fault_point("webhook.after_store"))
            if receipt == Receipt.NEW:
                # (a held word is handed on by the answer of the charge request still in flight)
                transaction.on_commit(lambda: _hand_off(event, provider))
    except services.WebhookChannelMismatch:
        # Signed by a channel that did not make this charge: it may speak only for its own.
        return error_response(
            403, "channel_mismatch", "The signing channel did not make the charge this webhook is about."
        )
    if receipt == Receipt.IGNORED:
        # Authentic, and about no attempt of ours, or another amount or charge than the one it
        # names: acknowledged, so the provider does not send it again for days.
        return JsonResponse({"received": True, "duplicate": False, "ignored": True})
    new = receipt != Receipt.DUPLICATE
    logger.info(
        "webhook.received",
        extra={
            "order_id": event.order_id,
            "provider": provider,
            "type": event.event_type,
            "duplicate": not new,
            "held": receipt == Receipt.HELD,
        },
    )
    return JsonResponse({"received": True, "duplicate": not new})
