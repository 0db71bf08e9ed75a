"""`manage.py create_merchant NAME [--callback-url URL]`: prints the merchant's credentials once."""

import json

from django.core.management.base import BaseCommand, CommandError

from core.errors import InvalidRequest
from orders.services import merchant_create


class Command(BaseCommand):
    help = "Create a merchant and print its id, API key and webhook secret as JSON (shown once)."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--callback-url", default="")

    def handle(self, *args, name: str, callback_url: str, **options):
        try:
            creds = merchant_create(name=name, callback_url=callback_url)
        except InvalidRequest as exc:
            raise CommandError(f"--callback-url: {exc.message}") from exc
        self.stdout.write(
            json.dumps(
                {
                    "id": str(creds.merchant.id),
                    "name": creds.merchant.name,
                    "api_key": creds.api_key,
                    "webhook_secret": creds.webhook_secret,
                }
            )
        )
