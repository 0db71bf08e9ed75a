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
        ("orders", "0009_history_without_fk_checks"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    [
                        "DROP INDEX IF EXISTS orders_idempotencykey_merchant_id_f39bb5db",
                        "DROP INDEX IF EXISTS orders_order_merchant_id_ab634f2d",
                        "DROP INDEX IF EXISTS orders_ordertransition_order_id_c16d2934",
                    ],
                    reverse_sql=[
                        "CREATE INDEX IF NOT EXISTS orders_idempotencykey_merchant_id_f39bb5db ON orders_idempotencykey (merchant_id)",
                        "CREATE INDEX IF NOT EXISTS orders_order_merchant_id_ab634f2d ON orders_order (merchant_id)",
                        "CREATE INDEX IF NOT EXISTS orders_ordertransition_order_id_c16d2934 ON orders_ordertransition (order_id)",
                    ],
                )
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="idempotencykey",
                    name="merchant",
                    field=models.ForeignKey(
                        db_index=False, on_delete=django.db.models.deletion.CASCADE, to="orders.merchant"
                    ),
                ),
                migrations.AlterField(
                    model_name="order",
                    name="merchant",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="orders",
                        to="orders.merchant",
                    ),
                ),
                migrations.AlterField(
                    model_name="ordertransition",
                    name="order",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="transitions",
                        to="orders.order",
                    ),
                ),
            ],
        ),
    ]
