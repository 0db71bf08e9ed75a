"""Refund callbacks share the delivery model: a delivery is about a subject, the refund when it
has one, else the order; one delivery per subject and event type."""

import django.db.models.deletion
import django.db.models.functions.comparison
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
        migrations.RemoveConstraint(model_name="callbackdelivery", name="delivery_per_outcome"),
        migrations.AddConstraint(
            model_name="callbackdelivery",
            constraint=models.UniqueConstraint(
                django.db.models.functions.comparison.Coalesce("refund", "order"),
                models.F("event_type"),
                name="delivery_per_subject_outcome",
            ),
        ),
    ]
