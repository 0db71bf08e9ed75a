"""Refund callbacks share the delivery model: a delivery is about a subject (order or refund)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("callbacks", "0003_delivery_resend_permission"),
        ("orders", "0007_refunds"),
    ]

    operations = [
        migrations.AddField(
            model_name="callbackdelivery",
            name="refund",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="callback_deliveries",
                to="orders.refund",
            ),
        ),
        migrations.AddField(
            model_name="callbackdelivery", name="subject_id", field=models.UUIDField(null=True)
        ),
        migrations.RunSQL(
            "UPDATE callbacks_callbackdelivery SET subject_id = order_id", migrations.RunSQL.noop
        ),
        migrations.AlterField(model_name="callbackdelivery", name="subject_id", field=models.UUIDField()),
        migrations.RemoveConstraint(model_name="callbackdelivery", name="delivery_per_outcome"),
        migrations.AddConstraint(
            model_name="callbackdelivery",
            constraint=models.UniqueConstraint(
                fields=("subject_id", "event_type"), name="delivery_per_subject_outcome"
            ),
        ),
    ]
