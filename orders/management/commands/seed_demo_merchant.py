"""`manage.py seed_demo_merchant`: a demo merchant for `make run`, its key kept in .run/ (dev only)."""

import json
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from orders.models import Merchant
from orders.services import merchant_create

# Beside the stack's other run files: `.run/` of the directory it runs in (the Makefile's and the
# scripts'), not of the settings' real path, which a copy made of symlinks shares with its original.
DEMO_FILE = Path(".run") / "demo-merchant.json"


class Command(BaseCommand):
    help = "Create the demo merchant once and print its API key (kept in .run/demo-merchant.json)."

    def add_arguments(self, parser):
        parser.add_argument("--callback-url", default=f"{settings.SANDBOX_URL}/sandbox/callbacks")

    def handle(self, *args, callback_url: str, **options):
        creds = json.loads(DEMO_FILE.read_text()) if DEMO_FILE.exists() else None
        if creds is None or not Merchant.objects.filter(pk=creds["id"]).exists():
            made = merchant_create(name="demo", callback_url=callback_url)
            creds = {
                "id": str(made.merchant.id),
                "name": "demo",
                "api_key": made.api_key,
                "webhook_secret": made.webhook_secret,
            }
            DEMO_FILE.parent.mkdir(parents=True, exist_ok=True)
            DEMO_FILE.write_text(json.dumps(creds, indent=2))
            DEMO_FILE.chmod(0o600)
        self.stdout.write(f"demo merchant: {creds['id']}  API key: {creds['api_key']}")
