"""Idempotency keys keep their first answer as sent (text), so a replay is byte for byte the same.

The answer was jsonb, which stores an object's keys sorted by length and name: a replayed order
came back with its fields in another order than the first answer. A nullable column without a
default is added without rewriting the table; `response_body` stays, read only for the answers
stored before this migration, until those keys are pruned.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("orders", "0010_drop_redundant_indexes"),
    ]

    operations = [
        migrations.AddField(
            model_name="idempotencykey",
            name="response_text",
            field=models.TextField(null=True),
        ),
    ]
