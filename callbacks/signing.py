"""Standard Webhooks signing for client callbacks (SPEC 7), with the standardwebhooks package."""

from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook


def signature_headers(
    *, secrets: list[str], msg_id: str, body: str, at: datetime | None = None
) -> dict[str, str]:
    """Headers for one message; several secrets give several space-separated signatures (rotation)."""
    at = at or datetime.now(tz=UTC)
    signatures = " ".join(Webhook(secret).sign(msg_id=msg_id, timestamp=at, data=body) for secret in secrets)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signatures,
        "content-type": "application/json",
    }
