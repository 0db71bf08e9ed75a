"""`manage.py seed_sandbox`: the three sandbox channels of SPEC 2, created or reset (idempotent)."""

from django.conf import settings
from django.core.management.base import BaseCommand

from allocation.models import PaymentChannel
from core import crypto
from gateway.providers.sandbox import sandbox_channel_secret

CHANNELS = (
    {
        "code": "sandbox-a",
        "currencies": ["USD", "EUR", "GBP"],
        "priority": 1,
        "fee_bps": 290,
        "fee_fixed": 30,
    },
    {
        "code": "sandbox-b",
        "currencies": ["USD", "EUR", "GBP"],
        "priority": 2,
        "fee_bps": 250,
        "fee_fixed": 25,
    },
    {"code": "sandbox-jp", "currencies": ["JPY"], "priority": 1, "fee_bps": 360, "fee_fixed": 0},
)


class Command(BaseCommand):
    help = "Create the sandbox channels (sandbox-a, sandbox-b, sandbox-jp); safe to run again."

    def handle(self, *args, **options):
        for spec in CHANNELS:
            secret = sandbox_channel_secret(spec["code"], settings.SANDBOX_SECRET)
            channel, created = PaymentChannel.objects.update_or_create(
                code=spec["code"],
                defaults={
                    "provider": "sandbox",
                    "currencies": spec["currencies"],
                    "priority": spec["priority"],
                    "fee_bps": spec["fee_bps"],
                    "fee_fixed": spec["fee_fixed"],
                    "weight": 1,
                    "enabled": True,
                    "webhook_secret_encrypted": crypto.encrypt(secret),
                },
            )
            self.stdout.write(f"{'created' if created else 'updated'} {channel.code}")
