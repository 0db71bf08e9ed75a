# A column with a constant default: PostgreSQL adds it without rewriting the table. Rows stored
# before name no reference, and are checked as they always were (by their attempt's, on arrival).

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("gateway", "0008_provider_webhook_word"),
    ]

    operations = [
        migrations.AddField(
            model_name="providerwebhook",
            name="provider_reference",
            field=models.CharField(blank=True, default="", max_length=128),
        ),
    ]
