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
