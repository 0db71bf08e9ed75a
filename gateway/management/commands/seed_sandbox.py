"""`manage.py seed_sandbox`: the sandbox channels of SPEC 2 and `stripe-test` (SPEC 11) on
localstripe, created or reset (idempotent)."""

import requests
from django.conf import settings
from django.core.management.base import BaseCommand
from django.urls import reverse

from allocation.models import PaymentChannel
from allocation.selectors import channel_cache_clear
from core import crypto
from gateway.providers.sandbox import sandbox_channel_secret
from gateway.providers.stripe import LOCALSTRIPE_WEBHOOK_EVENTS, localstripe_endpoint_secret

STRIPE_TEST = "stripe-test"

# localstripe takes any key that looks like a secret key; a live channel gets its own in the console.
LOCALSTRIPE_API_KEY = "sk_test_localstripe"

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
    help = "Create the sandbox channels and stripe-test (on localstripe); safe to run again."

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
        self._stripe_test()
        channel_cache_clear()

    def _stripe_test(self) -> None:
        secret = localstripe_endpoint_secret(STRIPE_TEST, settings.SANDBOX_SECRET)
        channel, created = PaymentChannel.objects.update_or_create(
            code=STRIPE_TEST,
            defaults={
                "provider": "stripe",
                "currencies": ["USD", "EUR"],
                "priority": 1,
                "fee_bps": 290,
                "fee_fixed": 30,
                "weight": 1,
                "enabled": True,
                "api_base": settings.LOCALSTRIPE_URL,
                "api_key_encrypted": crypto.encrypt(LOCALSTRIPE_API_KEY),
                "webhook_secret_encrypted": crypto.encrypt(secret),
            },
        )
        self.stdout.write(
            f"{'created' if created else 'updated'} {channel.code} -> {settings.LOCALSTRIPE_URL}"
        )
        # localstripe keeps webhook endpoints in memory: the launcher registers ours when it starts
        # (gateway/sandbox_server/localstripe.py); registering here too covers one started before.
        url = settings.PUBLIC_BASE_URL + reverse("provider-webhook", kwargs={"provider": "stripe"})
        try:
            response = requests.post(
                f"{settings.LOCALSTRIPE_URL}/_config/webhooks/{STRIPE_TEST}",
                json={"url": url, "secret": secret, "events": LOCALSTRIPE_WEBHOOK_EVENTS},
                timeout=2,
                allow_redirects=False,
            )
            registered = response.status_code == 200
        except requests.RequestException:
            registered = False
        self.stdout.write(
            f"registered webhook endpoint {url} at localstripe"
            if registered
            else f"localstripe is not running yet: it registers {url} itself when it starts"
        )
