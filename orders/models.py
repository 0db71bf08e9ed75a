"""Merchants, orders, refunds, their append-only transition logs, the event outbox, idempotency keys."""

import json

from django.db import models
from django.db.models import Q

from core.ids import uuid7


class OrderStatus(models.TextChoices):
    PENDING = "pending"
    ASSIGNED = "assigned"
    PROCESSING = "processing"
    PAID = "paid"
    FAILED = "failed"
    COMPLETED = "completed"


class Outcome(models.TextChoices):
    PAID = "paid"
    FAILED = "failed"


class Merchant(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    name = models.CharField(max_length=200)
    # The key is shown once; we keep a public lookup prefix and a SHA-256 of the whole key.
    api_key_prefix = models.CharField(max_length=32, unique=True)
    api_key_hash = models.CharField(max_length=64)
    # Webhook secrets are needed in clear to sign, so they are stored encrypted (core/crypto.py).
    webhook_secret_encrypted = models.TextField()
    # The previous secret keeps signing alongside the new one for an overlap after rotation.
    previous_webhook_secret_encrypted = models.TextField(blank=True, default="")
    previous_webhook_secret_expires_at = models.DateTimeField(null=True, blank=True)
    callback_url = models.URLField(max_length=2048, blank=True, default="")
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        # Admin actions, granted apart from the model's view/change (README, operators).
        permissions = [("rotate_merchant_key", "Can rotate a merchant's API key and webhook secret")]

    def __str__(self) -> str:
        return self.name


class Order(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    # No index of its own: order_merchant_created and the reference constraint lead with it (#15).
    merchant = models.ForeignKey(Merchant, on_delete=models.PROTECT, related_name="orders", db_index=False)
    reference = models.CharField(max_length=64)
    amount = models.BigIntegerField(help_text="In the currency's minor units.")
    currency = models.CharField(max_length=3)
    description = models.TextField(blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True)
    callback_url = models.URLField(max_length=2048, blank=True, default="")
    # The payer's payment method as a provider's token (Stripe: `pm_…`); NULL for providers that
    # need none. Allocation routes on it (SPEC 11); logs and the console show it masked only.
    payment_method = models.CharField(max_length=255, null=True, blank=True)
    # The provider's id for the charge (Stripe: the PaymentIntent `pi_…`), NULL until known.
    provider_reference = models.CharField(max_length=128, null=True, blank=True)
    status = models.CharField(max_length=16, choices=OrderStatus.choices, default=OrderStatus.PENDING)
    outcome = models.CharField(max_length=8, choices=Outcome.choices, null=True, blank=True)
    # The channel code, not a foreign key: orders/ does not depend on allocation/.
    channel = models.CharField(max_length=64, null=True, blank=True)
    failure_code = models.CharField(max_length=64, null=True, blank=True)
    failure_message = models.CharField(max_length=500, null=True, blank=True)
    request_id = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    # When the sweep should look at this order next; NULL once nothing more is expected.
    # Written by every transition in the same UPDATE, so the happy path pays nothing for it.
    next_check_at = models.DateTimeField(null=True, blank=True)
    check_count = models.PositiveSmallIntegerField(default=0)
    # The UTC day whose volume of `channel` holds this order's reservation: a refusal gives
    # back exactly that reservation, even when the refusal arrives after midnight.
    reserved_on = models.DateField(null=True, blank=True)
    # SPEC 10: the sum of the order's succeeded refunds, written with each refund's success.
    amount_refunded = models.BigIntegerField(default=0, db_default=0)
    # The sum of the order's refunds that have not failed (pending, processing, succeeded):
    # taken under the order's row lock when a refund is created, given back when one fails.
    # The CHECK below makes "never more than the amount" the database's rule, not ours alone.
    refund_held = models.BigIntegerField(default=0, db_default=0)

    class Meta:
        permissions = [
            ("requery_provider", "Can re-query an order's charge status at the provider"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(amount_refunded__gte=0)
                & Q(amount_refunded__lte=models.F("refund_held"))
                & Q(refund_held__lte=models.F("amount")),
                name="order_refunds_within_amount",
            ),
            models.UniqueConstraint(
                fields=["merchant", "reference"], name="order_reference_unique_per_merchant"
            ),
            models.CheckConstraint(
                condition=Q(amount__gte=1) & Q(amount__lte=10**12), name="order_amount_range"
            ),
        ]
        indexes = [
            models.Index(fields=["merchant", "-created_at", "-id"], name="order_merchant_created"),
            models.Index(
                fields=["next_check_at"], name="order_due_check", condition=Q(next_check_at__isnull=False)
            ),
            models.Index(
                fields=["status", "created_at"],
                name="order_open_by_status",
                condition=~Q(status="completed"),
            ),
            models.Index(fields=["created_at"], name="order_created"),
            # Operators' console: search by reference, completions and latency over the last hour.
            models.Index(fields=["reference"], name="order_reference"),
            models.Index(
                fields=["completed_at"], name="order_completed", condition=Q(completed_at__isnull=False)
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} {self.reference} ({self.status})"


class OrderTransition(models.Model):
    """Append-only: a database trigger refuses UPDATE and DELETE (migration 0002)."""

    # No database FK check on this hot append-only log (#15): rows are written only in the CTE
    # that changes the order they name, and orders are never deleted (PROTECT). Its index is
    # transition_order's.
    order = models.ForeignKey(
        Order, on_delete=models.PROTECT, related_name="transitions", db_constraint=False, db_index=False
    )
    from_status = models.CharField(max_length=16, null=True, blank=True)
    to_status = models.CharField(max_length=16)
    reason = models.CharField(max_length=200)
    channel = models.CharField(max_length=64, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["order", "id"], name="transition_order")]

    def __str__(self) -> str:
        return f"{self.from_status} -> {self.to_status}"


class RefundStatus(models.TextChoices):
    PENDING = "pending"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Refund(models.Model):
    """A refund of (part of) a paid order (SPEC 10); its status is written by orders/transitions.py only."""

    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="refunds")
    merchant = models.ForeignKey(Merchant, on_delete=models.PROTECT, related_name="refunds")
    amount = models.BigIntegerField(help_text="In the currency's minor units.")
    currency = models.CharField(max_length=3)
    status = models.CharField(max_length=16, choices=RefundStatus.choices, default=RefundStatus.PENDING)
    reason = models.CharField(max_length=500, null=True, blank=True)
    reference = models.CharField(max_length=64, null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    # The channel that charged the order: a refund goes there and nowhere else.
    channel = models.CharField(max_length=64, null=True, blank=True)
    failure_code = models.CharField(max_length=64, null=True, blank=True)
    failure_message = models.CharField(max_length=500, null=True, blank=True)
    request_id = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # As on orders: when the sweep should look at this refund next (send again, poll, callback).
    next_check_at = models.DateTimeField(null=True, blank=True)
    check_count = models.PositiveSmallIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["merchant", "reference"],
                condition=Q(reference__isnull=False),
                name="refund_reference_unique_per_merchant",
            ),
            models.CheckConstraint(condition=Q(amount__gte=1), name="refund_amount_positive"),
        ]
        indexes = [
            models.Index(fields=["order", "created_at", "id"], name="refund_order"),
            models.Index(
                fields=["next_check_at"], name="refund_due_check", condition=Q(next_check_at__isnull=False)
            ),
            models.Index(fields=["status", "created_at"], name="refund_status_created"),
            models.Index(fields=["created_at"], name="refund_created"),
        ]

    def __str__(self) -> str:
        return f"{self.id} {self.amount} {self.currency} ({self.status})"


class RefundTransition(models.Model):
    """Append-only like OrderTransition: a database trigger refuses UPDATE and DELETE."""

    refund = models.ForeignKey(Refund, on_delete=models.PROTECT, related_name="transitions")
    from_status = models.CharField(max_length=16, null=True, blank=True)
    to_status = models.CharField(max_length=16)
    reason = models.CharField(max_length=200)
    channel = models.CharField(max_length=64, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["refund", "id"], name="refund_transition_refund")]

    def __str__(self) -> str:
        return f"{self.from_status} -> {self.to_status}"


class IgnoredSignal(models.Model):
    """A late or duplicate signal that would have moved an order (or a refund) backwards."""

    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="ignored_signals")
    refund = models.ForeignKey(
        Refund, on_delete=models.PROTECT, related_name="ignored_signals", null=True, blank=True
    )
    status_at_signal = models.CharField(max_length=16)
    requested_status = models.CharField(max_length=16)
    reason = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        # Retention (orders.services.history_prune) deletes the oldest through it.
        indexes = [models.Index(fields=["created_at"], name="ignoredsignal_created")]

    def __str__(self) -> str:
        return f"{self.status_at_signal} -> {self.requested_status}: {self.reason[:80]}"


class OutboxEvent(models.Model):
    """An event written in the transaction of the change it announces; published after commit."""

    topic = models.CharField(max_length=64)
    order_id = models.UUIDField()
    payload = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)
    published_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["id"], name="outbox_unpublished", condition=Q(published_at__isnull=True)),
            models.Index(fields=["order_id"], name="outbox_order"),
            # Retention: published events, oldest first (orders.services.history_prune).
            models.Index(
                fields=["published_at"], name="outbox_published", condition=Q(published_at__isnull=False)
            ),
        ]


class IdempotencyKey(models.Model):
    class State(models.TextChoices):
        IN_FLIGHT = "in_flight"
        DONE = "done"

    # No index of its own: idempotency_key_unique leads with it.
    merchant = models.ForeignKey(Merchant, on_delete=models.CASCADE, db_index=False)
    key = models.CharField(max_length=255)
    request_hash = models.CharField(max_length=64)
    state = models.CharField(max_length=16, choices=State.choices, default=State.IN_FLIGHT)
    response_status = models.PositiveSmallIntegerField(null=True)
    # The first answer's body as JSON text, its keys in the order they were sent, so a replay is
    # byte for byte the same (SPEC 3: "the same status code and body"); jsonb sorts keys.
    response_text = models.TextField(null=True)
    # Answers stored before `response_text` existed (keys reordered). Read only when
    # `response_text` is empty; drop it once those keys are past IDEMPOTENCY_KEY_TTL_HOURS.
    response_body = models.JSONField(null=True)
    created_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["merchant", "key"], name="idempotency_key_unique")]
        indexes = [models.Index(fields=["created_at"], name="idempotency_created")]

    def stored_answer(self):
        """The body of the first answer, as it was sent."""
        if self.response_text is None:
            return self.response_body
        return json.loads(self.response_text)
