"""Client callback deliveries (one per order outcome or refund outcome, one stable webhook-id each)
and their attempts. Order and refund callbacks share the one delivery model and its machinery."""

from django.db import models
from django.db.models import Q
from django.db.models.functions import Coalesce

from orders.models import Order, Refund


class CallbackDelivery(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        EXHAUSTED = "exhausted"

    # No database FK check (#15): created by the callback stage for an order it read.
    order = models.ForeignKey(
        Order, on_delete=models.PROTECT, related_name="callback_deliveries", db_constraint=False
    )
    # Set for a refund's callback (refund.succeeded / refund.failed); the order is the refund's.
    refund = models.ForeignKey(
        Refund, on_delete=models.PROTECT, related_name="callback_deliveries", null=True, blank=True
    )
    event_type = models.CharField(max_length=32)
    webhook_id = models.CharField(max_length=64, unique=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    # When the next attempt is due; while an attempt runs, the end of its lease.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    # When the sweep last queued the due attempt (cleared when its message is taken: an attempt's
    # claim, a busy receiver's push-back; and by an operator's resend): queued again only a lease
    # later (its message lost with Redis), not at every pass while it waits its turn.
    announced_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "callback deliveries"
        permissions = [("resend_callback", "Can resend client callbacks")]
        constraints = [
            # One delivery per subject (the refund's id for a refund's callback, else the order's)
            # and event type; rows written before refunds existed need no change.
            models.UniqueConstraint(
                Coalesce("refund", "order"), "event_type", name="delivery_per_subject_outcome"
            )
        ]
        indexes = [
            models.Index(fields=["next_attempt_at"], name="delivery_due", condition=Q(status="pending")),
            models.Index(
                fields=["status", "created_at"], name="delivery_exhausted", condition=Q(status="exhausted")
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.webhook_id} ({self.status})"


class CallbackAttempt(models.Model):
    # Append-only history written with its delivery's UPDATE in one statement; no FK check (#15).
    delivery = models.ForeignKey(
        CallbackDelivery,
        on_delete=models.CASCADE,
        related_name="attempt_log",
        db_constraint=False,
        db_index=False,  # attempt_delivery leads with it
    )
    url = models.CharField(max_length=2048)
    attempted_at = models.DateTimeField()
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    latency_ms = models.PositiveIntegerField()
    error = models.CharField(max_length=500, blank=True, default="")
    response_excerpt = models.TextField(blank=True, default="", help_text="First 1 KiB of the answer.")

    class Meta:
        indexes = [
            models.Index(fields=["delivery", "attempted_at"], name="attempt_delivery"),
            # Callback health over the last hour (dashboard).
            models.Index(fields=["attempted_at"], name="callback_attempted"),
        ]
