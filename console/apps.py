from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    """The operators' console: every ModelAdmin, the dashboard, /metrics and the health probes.

    It may import every app; no app imports it (import-linter contract in pyproject.toml).
    """

    name = "console"
    verbose_name = "Operators' console"
    default_auto_field = "django.db.models.BigAutoField"
