from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from gateway.providers import sandbox, stripe  # noqa: F401  (register the adapters)
        from orders import events

        events.subscribe(events.CHANNEL_ALLOCATED, "gateway.charge")
        # A processing order re-announced by the sweep: ask the provider (PSync-like polling).
        events.subscribe(
            events.ORDER_UPDATED,
            "gateway.poll",
            when=lambda p: p.get("status") == "processing" and bool(p.get("redelivery")),
        )
