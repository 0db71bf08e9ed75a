"""Drop the foreign keys' own indexes where another index leads with the same column (#15).

Written out by hand: Django's AlterField(db_index=False) drops every index it finds on the
column, which on gateway_chargeattempt included attempt_one_live_per_order (the partial unique
index that keeps one live charge attempt per order), and on orders it drops and re-adds the
merchant foreign key (a validating scan of the whole table). Here only the named indexes go;
the model state changes alongside.
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
