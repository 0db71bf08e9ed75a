from django.apps import AppConfig


class AllocationConfig(AppConfig):
    name = "allocation"
    verbose_name = "Allocation"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from orders import events

        events.subscribe(events.ORDER_CREATED, "allocation.allocate")
