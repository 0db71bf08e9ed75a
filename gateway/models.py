"""Charge attempts (one per order and channel, keyed before the HTTP call), refund attempts (one per
refund, on the channel that charged) and provider webhooks."""

from django.db import models
from django.db.models import Q

from orders.models import Order, Refund


class ChargeAttempt(models.Model):
    class Status(models.TextChoices):
        SENDING = "sending"  # claimed, request about to go or gone: outcome not yet known to us
        ACCEPTED = "accepted"  # the provider took it; the result comes by webhook or poll
        REJECTED = "rejected"  # definitively refused, nothing charged
        UNKNOWN = "unknown"  # timeout or 5xx after sending: maybe charged
        PAID = "paid"
        FAILED = "failed"

    # No database FK check (#15): written only by the stage that holds the order; orders are
    # never deleted. No index of its own: attempt_order leads with it.
    order = models.ForeignKey(
        Order, on_delete=models.PROTECT, related_name="charge_attempts", db_constraint=False, db_index=False
    )
    channel = models.CharField(max_length=64)
    provider = models.CharField(max_length=32)
    idempotency_key = models.CharField(max_length=128, unique=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.SENDING)
    provider_reference = models.CharField(max_length=128, blank=True, default="")
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True, default="")
    failure_code = models.CharField(max_length=64, blank=True, default="")
    # Every fact the charge request is built from is stored with the key before the first send,
    # so a retry from any host sends the identical request (the provider compares them).
    webhook_url = models.CharField(max_length=500, blank=True, default="")
    # While a copy of the charge task holds the lease, no other copy sends this attempt.
    lease_until = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            # At most one charge per order: every attempt but refused ones (nothing charged) is
            # live, and an order has at most one live attempt, whatever races or crashes.
            models.UniqueConstraint(
                fields=["order"], condition=~Q(status="rejected"), name="attempt_one_live_per_order"
            ),
        ]
        indexes = [
            models.Index(fields=["order", "created_at"], name="attempt_order"),
            models.Index(fields=["provider_reference"], name="attempt_provider_ref"),
            # Success rate per channel over the last hour (admin, dashboard).
            models.Index(fields=["created_at"], name="attempt_created"),
        ]

    def __str__(self) -> str:
        return f"{self.channel} {self.status}"


class RefundAttempt(models.Model):
    """A refund's request to the provider: its own key and every fact of the request, stored before
    the first send, so every retry from every host is identical; never another channel."""

    class Status(models.TextChoices):
        SENDING = "sending"  # not yet taken by the provider (never sent, in flight, or told to retry)
        ACCEPTED = "accepted"
        UNKNOWN = "unknown"  # timeout or 5xx after sending: maybe refunded
        REJECTED = "rejected"  # refused for good: nothing refunded
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    refund = models.OneToOneField(Refund, on_delete=models.PROTECT, related_name="attempt")
    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="refund_attempts")
    channel = models.CharField(max_length=64)
    provider = models.CharField(max_length=32)
    idempotency_key = models.CharField(max_length=128, unique=True)
    charge_idempotency_key = models.CharField(max_length=128)
    webhook_url = models.CharField(max_length=500, blank=True, default="")
    amount = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.SENDING)
    sends = models.PositiveIntegerField(default=0)
    provider_reference = models.CharField(max_length=128, blank=True, default="")
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True, default="")
    failure_code = models.CharField(max_length=64, blank=True, default="")
    lease_until = models.DateTimeField(null=True, blank=True)
    # After a 503 (nothing refunded): no copy sends again before this (the provider's backoff).
    retry_after = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            models.Index(fields=["order", "created_at"], name="refund_attempt_order"),
            # The console finds a refund by the id its provider gives it (what a provider quotes).
            models.Index(
                fields=["provider_reference"],
                name="refund_attempt_provider_ref",
                condition=~Q(provider_reference=""),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.channel} {self.status}"


class ProviderWebhook(models.Model):
    """Every verified provider webhook, once: the unique id makes duplicates no-ops."""

    provider = models.CharField(max_length=32)
    webhook_id = models.CharField(max_length=128)
    # Set only from a lookup of the order in the same INSERT; no database FK check (#15).
    order = models.ForeignKey(
        Order, on_delete=models.PROTECT, related_name="provider_webhooks", null=True, db_constraint=False
    )
    event_type = models.CharField(max_length=64)
    # The word it carries, as its adapter read it: the charge's or refund's key, and paid /
    # failed (charges) or succeeded / failed (refunds). The first one stored for a key is the
    # provider's word on it, whatever order the confirm stage sees them in (services.first_word).
    idempotency_key = models.CharField(max_length=128, default="", blank=True)
    status = models.CharField(max_length=16, default="", blank=True)
    failure_code = models.CharField(max_length=64, default="", blank=True)
    # The provider's id of the charge or refund the word is about, when it names one: a word held
    # while our request was in flight is checked against the id our answer names (services).
    provider_reference = models.CharField(max_length=128, default="", blank=True)
    payload = models.JSONField()
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["provider", "webhook_id"], name="provider_webhook_unique"),
        ]
        # Retention (gateway.services.webhooks_prune) deletes the oldest through it.
        indexes = [models.Index(fields=["received_at"], name="providerwebhook_received")]
