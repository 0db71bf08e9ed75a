"""Drop the foreign key's own index: another index leads with its column (#15). Written by hand
for the reason in orders/migrations/0010_drop_redundant_indexes.py.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("callbacks", "0005_history_without_fk_checks"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    [
                        "DROP INDEX IF EXISTS callbacks_callbackattempt_delivery_id_5ddc2d11",
                    ],
                    reverse_sql=[
                        "CREATE INDEX IF NOT EXISTS callbacks_callbackattempt_delivery_id_5ddc2d11 ON callbacks_callbackattempt (delivery_id)",
                    ],
                )
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="callbackattempt",
                    name="delivery",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="attempt_log",
                        to="callbacks.callbackdelivery",
                    ),
                ),
            ],
        ),
    ]
