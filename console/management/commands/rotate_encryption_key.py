"""`manage.py rotate_encryption_key [--check]`: every stored secret under the first FIELD_ENCRYPTION_KEY.

The step between putting a new key first and dropping the old one (README "Rotating
FIELD_ENCRYPTION_KEY"). Prints one JSON object with counts per column, never a secret; exits 1
when a secret is unreadable with every key, or, with --check, when one still needs an older key.
"""

import json
import logging

from django.core.management.base import BaseCommand, CommandError

from allocation.services import channel_secrets_reencrypt
from orders.services import merchant_secrets_reencrypt

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Re-encrypt every stored webhook secret and API key under the first FIELD_ENCRYPTION_KEY, "
        "so the keys after it can be dropped. --check writes nothing and exits 1 while any still "
        "needs an older key."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--check", action="store_true", help="write nothing; exit 1 if a secret still needs an older key"
        )

    def handle(self, *args, check: bool, **options):
        columns = {**merchant_secrets_reencrypt(check=check), **channel_secrets_reencrypt(check=check)}
        moved = "not_current" if check else "rotated"
        report = {
            "check": check,
            "columns": {
                name: {"current": found.current, moved: found.rotated, "unreadable": found.unreadable}
                for name, found in columns.items()
            },
            "current": sum(found.current for found in columns.values()),
            moved: sum(found.rotated for found in columns.values()),
            "unreadable": sum(len(found.unreadable) for found in columns.values()),
        }
        counts = ("check", "current", moved, "unreadable")
        logger.info("secrets.reencrypted", extra={key: report[key] for key in counts})
        self.stdout.write(json.dumps(report))
        if report["unreadable"]:
            raise CommandError(
                f"{report['unreadable']} stored secrets are unreadable with every FIELD_ENCRYPTION_KEY "
                "(rows listed under 'unreadable'): put back the key they were written with, or set them "
                "again in the console."
            )
        if check and report["not_current"]:
            raise CommandError(
                f"{report['not_current']} stored secrets still need an older key: run rotate_encryption_key "
                "without --check before dropping it."
            )
