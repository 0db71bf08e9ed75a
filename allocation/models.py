"""Payment channels and their daily volume reservations (SPEC 4)."""

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q


class PaymentChannel(models.Model):
    code = models.SlugField(max_length=64, unique=True)
    provider = models.CharField(max_length=32, default="sandbox")
    currencies = ArrayField(models.CharField(max_length=3), default=list)
    min_amount = models.BigIntegerField(default=1)
    max_amount = models.BigIntegerField(null=True, blank=True)
    fee_bps = models.PositiveIntegerField(default=0, help_text="Fee in basis points of the amount.")
    fee_fixed = models.BigIntegerField(default=0, help_text="Fixed fee in minor units.")
    priority = models.PositiveSmallIntegerField(default=1, help_text="Lower is tried first.")
    weight = models.PositiveIntegerField(default=1, help_text="Share among channels of equal priority.")
    daily_cap = models.BigIntegerField(
        null=True, blank=True, help_text="Minor units per UTC day, all currencies summed; empty: no cap."
    )
    enabled = models.BooleanField(default=True)
    circuit_open_until = models.DateTimeField(null=True, blank=True)
    # The provider's webhook signing secret for this channel, encrypted (core/crypto.py).
    webhook_secret_encrypted = models.TextField(blank=True, default="")
    # Providers reached with a key of the channel's own (Stripe: `sk_…`), encrypted like the secret.
    api_key_encrypted = models.TextField(blank=True, default="")
    # Where the provider's API is for this channel (Stripe: empty means STRIPE_API_BASE).
    api_base = models.URLField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("priority", "code")
        permissions = [
            ("manage_paymentchannel", "Can enable and disable payment channels and close their circuits")
        ]

    def __str__(self) -> str:
        return self.code


class ChannelDailyVolume(models.Model):
    # No index of its own: channel_day_unique leads with it.
    channel = models.ForeignKey(
        PaymentChannel, on_delete=models.CASCADE, related_name="daily_volumes", db_index=False
    )
    day = models.DateField()
    reserved = models.BigIntegerField(default=0)
    orders = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["channel", "day"], name="channel_day_unique"),
            models.CheckConstraint(condition=Q(reserved__gte=0), name="channel_volume_non_negative"),
        ]
