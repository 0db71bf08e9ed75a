"""Drop the foreign key's own index: another index leads with its column (#15). Written by hand
for the reason in orders/migrations/0010_drop_redundant_indexes.py. Not AlterField: here it would
also drop attempt_one_live_per_order, the partial unique index behind one live charge attempt.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("gateway", "0006_history_without_fk_checks"),
        ("orders", "0010_drop_redundant_indexes"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    [
                        "DROP INDEX IF EXISTS gateway_chargeattempt_order_id_a6a7571b",
                    ],
                    reverse_sql=[
                        "CREATE INDEX IF NOT EXISTS gateway_chargeattempt_order_id_a6a7571b ON gateway_chargeattempt (order_id)",
                    ],
                )
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="chargeattempt",
                    name="order",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="charge_attempts",
                        to="orders.order",
                    ),
                ),
            ],
        ),
    ]
