from django.apps import AppConfig


class CallbacksConfig(AppConfig):
    name = "callbacks"
    verbose_name = "Callbacks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from orders import events

        events.subscribe(
            events.ORDER_UPDATED, "callbacks.callback", when=lambda p: p.get("status") in ("paid", "failed")
        )
        events.subscribe(
            events.REFUND_UPDATED,
            "callbacks.refund_callback",
            when=lambda p: p.get("status") in ("succeeded", "failed"),
        )
