"""Operators' console for client callbacks: deliveries with their attempts; resend in bulk.

Resending needs `callbacks.resend_callback` (the same permission as the order page's button).
"""

from django.contrib import admin, messages

from callbacks.models import CallbackAttempt, CallbackDelivery
from callbacks.services import callback_resend
from console.adminkit import (
    EstimatedCountPaginator,
    ReadOnlyAdmin,
    ReadOnlyInline,
    audit,
    exact_or_order_id,
    order_link,
)

RESEND_MAX = 1000


class EventTypeFilter(admin.SimpleListFilter):
    """Fixed choices: a DISTINCT over every delivery would read the whole table."""

    title = "event type"
    parameter_name = "event_type"

    def lookups(self, request, model_admin):
        return [("order.paid", "order.paid"), ("order.failed", "order.failed")]

    def queryset(self, request, queryset):
        return queryset.filter(event_type=self.value()) if self.value() else queryset


class CallbackAttemptInline(ReadOnlyInline):
    model = CallbackAttempt
    fields = ("attempted_at", "url", "status_code", "latency_ms", "error", "response_excerpt")
    ordering = ("-attempted_at", "-id")
    verbose_name_plural = "attempts (newest first)"


@admin.register(CallbackDelivery)
class CallbackDeliveryAdmin(ReadOnlyAdmin):
    list_display = (
        "webhook_id",
        "order_display",
        "event_type",
        "status",
        "attempts",
        "next_attempt_at",
        "last_error",
        "created_at",
        "delivered_at",
    )
    list_filter = ("status", EventTypeFilter)
    # The primary key, not created_at: no index on created_at here, and ids grow with time.
    ordering = ("-id",)
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    search_fields = ("=webhook_id",)
    search_help_text = "Exact webhook id or order id."
    actions = ("resend",)
    inlines = (CallbackAttemptInline,)
    fields = (
        "order_display",
        "event_type",
        "webhook_id",
        "status",
        "attempts",
        "next_attempt_at",
        "last_error",
        "created_at",
        "delivered_at",
    )
    readonly_fields = ("order_display",)

    @admin.display(description="order")
    def order_display(self, obj: CallbackDelivery) -> str:
        return order_link(obj.order_id)

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(exact_or_order_id(term, "webhook_id")), False

    def has_resend_callback_permission(self, request) -> bool:
        return request.user.has_perm("callbacks.resend_callback")

    @admin.action(description="Resend (make due now, same webhook-id)", permissions=["resend_callback"])
    def resend(self, request, queryset):
        deliveries = list(queryset.exclude(status=CallbackDelivery.Status.DELIVERED)[: RESEND_MAX + 1])
        if len(deliveries) > RESEND_MAX:
            self.message_user(request, f"Select at most {RESEND_MAX} deliveries at a time.", messages.ERROR)
            return
        for delivery in deliveries:
            callback_resend(delivery=delivery)
            audit(self, request, delivery, "Resent by operator.", action="callback_resend")
        skipped = queryset.filter(status=CallbackDelivery.Status.DELIVERED).count()
        note = f"; {skipped} already delivered, left alone" if skipped else ""
        self.message_user(request, f"{len(deliveries)} delivery(ies) made due{note}.", messages.SUCCESS)
