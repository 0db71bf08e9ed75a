"""Operators' console for the gateway: charge attempts and provider webhooks, read-only."""

import json

from django.contrib import admin
from django.utils.html import format_html

from console.adminkit import (
    ChannelFilter,
    EstimatedCountPaginator,
    ProviderFilter,
    ReadOnlyAdmin,
    exact_or_order_id,
    order_link,
)
from gateway.models import ChargeAttempt, ProviderWebhook


@admin.register(ChargeAttempt)
class ChargeAttemptAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "order_display",
        "channel",
        "provider",
        "status",
        "provider_reference",
        "http_status",
        "error",
        "created_at",
    )
    list_filter = ("status", ChannelFilter, ProviderFilter, "created_at")
    ordering = ("-id",)
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    search_fields = ("=provider_reference",)
    search_help_text = "Exact provider reference or order id."

    @admin.display(description="order")
    def order_display(self, obj: ChargeAttempt) -> str:
        return order_link(obj.order_id)

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(exact_or_order_id(term, "provider_reference")), False


@admin.register(ProviderWebhook)
class ProviderWebhookAdmin(ReadOnlyAdmin):
    # What it said (status, failure code) beside what it was: the confirm stage settles a charge
    # or refund with the first word stored for its key, and this is where an operator reads it.
    list_display = (
        "id",
        "provider",
        "event_type",
        "status",
        "failure_code",
        "webhook_id",
        "order_display",
        "received_at",
    )
    list_filter = (ProviderFilter,)
    ordering = ("-id",)
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    search_fields = ("=webhook_id",)
    search_help_text = "Exact webhook id or order id."
    fields = (
        "provider",
        "webhook_id",
        "event_type",
        "order_display",
        "idempotency_key",
        "status",
        "failure_code",
        "received_at",
        "payload_display",
    )
    readonly_fields = ("order_display", "payload_display")

    @admin.display(description="order")
    def order_display(self, obj: ProviderWebhook) -> str:
        return order_link(obj.order_id) if obj.order_id else "—"

    @admin.display(description="payload")
    def payload_display(self, obj: ProviderWebhook) -> str:
        return format_html(
            "<pre style='margin:0'>{}</pre>", json.dumps(obj.payload, indent=2, sort_keys=True)
        )

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(exact_or_order_id(term, "webhook_id")), False
