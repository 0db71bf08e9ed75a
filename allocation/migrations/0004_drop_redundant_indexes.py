"""Drop the foreign key's own index: another index leads with its column (#15). Written by hand
for the reason in orders/migrations/0010_drop_redundant_indexes.py.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("allocation", "0003_paymentchannel_api_key_api_base"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    [
                        "DROP INDEX IF EXISTS allocation_channeldailyvolume_channel_id_07100264",
                    ],
                    reverse_sql=[
                        "CREATE INDEX IF NOT EXISTS allocation_channeldailyvolume_channel_id_07100264 ON allocation_channeldailyvolume (channel_id)",
                    ],
                )
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="channeldailyvolume",
                    name="channel",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="daily_volumes",
                        to="allocation.paymentchannel",
                    ),
                ),
            ],
        ),
    ]
