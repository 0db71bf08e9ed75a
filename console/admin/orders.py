"""Operators' console for orders and merchants: read-only pages, writes only through actions.

Actions call the owning service and leave an audit trail in Django's LogEntry (who, when,
what: the object's History page and the admin's "Recent actions"), plus a structured log line.
Each action needs a permission of its own (the pages are read-only, so no model "change"
permission applies): `callbacks.resend_callback`, `orders.requery_provider`,
`orders.rotate_merchant_key`. New keys and secrets are shown on the action's own response page,
never in a message (the messages cookie is signed, not encrypted).
The order list is built for a million rows: no full COUNT(*), no per-row query, every filter
and the search answered by an index.
"""

import json
import uuid
from collections import Counter

from django import forms
from django.contrib import admin, messages
from django.db.models import Q
from django.http import HttpResponseRedirect
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from callbacks.models import CallbackDelivery
from callbacks.selectors import callback_attempts_for_order
from callbacks.services import callback_resend_for_order
from console.admin.refunds import REFUND_PERMISSION, RefundInline, order_refund_view
from console.admin.signals import IgnoredSignalInline
from console.adminkit import (
    REQUERY_MAX,
    ChannelFilter,
    EstimatedCountPaginator,
    GuardedActionsAdmin,
    ReadOnlyAdmin,
    ReadOnlyInline,
    RequeryBudget,
    age,
    audit,
    exact_or_order_id,
    requery_detail,
    shown_once_response,
    ts,
)
from core.errors import InvalidRequest
from gateway.models import ChargeAttempt
from gateway.selectors import order_ids_by_provider_reference
from gateway.services import order_poll
from orders import payment_methods
from orders.models import Merchant, Order, OrderStatus, OrderTransition
from orders.money import money_format
from orders.operations import merchant_update
from orders.services import (
    callback_url_validate,
    merchant_create,
    merchant_rotate_api_key,
    merchant_rotate_webhook_secret,
    order_resume,
)

# One action runs in the operator's request: bound its work (and REQUERY_MAX, in adminkit).
RESEND_MAX = 500

STATUS_COLOURS = {
    OrderStatus.PENDING: "#6c757d",
    OrderStatus.ASSIGNED: "#0d6efd",
    OrderStatus.PROCESSING: "#6f42c1",
    OrderStatus.PAID: "#198754",
    OrderStatus.FAILED: "#dc3545",
    OrderStatus.COMPLETED: "#146c43",
}


def status_badge(status: str) -> str:
    return format_html(
        '<span style="background:{};color:#fff;border-radius:3px;padding:1px 6px;white-space:nowrap">'
        "{}</span>",
        STATUS_COLOURS.get(status, "#6c757d"),
        status,
    )


# The console's look: its own name, and the whole width for wide lists (no app sidebar).
admin.site.site_header = "Payments console"
admin.site.site_title = "Payments console"
admin.site.index_title = "Operations"
admin.site.enable_nav_sidebar = False


# --- orders ------------------------------------------------------------------------------------


class TransitionInline(ReadOnlyInline):
    model = OrderTransition
    fields = ("at", "from_status", "to_status", "channel", "reason")
    ordering = ("-id",)
    verbose_name_plural = "transitions (newest first)"

    @admin.display(description="at (UTC)")
    def at(self, obj: OrderTransition) -> str:
        return ts(obj.created_at)


class ChargeAttemptInline(ReadOnlyInline):
    model = ChargeAttempt
    fields = (
        "at",
        "channel",
        "provider",
        "status",
        "provider_reference",
        "http_status",
        "failure_code",
        "error",
    )
    ordering = ("-created_at", "-id")
    show_change_link = True
    verbose_name_plural = "charge attempts (newest first)"

    @admin.display(description="at (UTC)")
    def at(self, obj: ChargeAttempt) -> str:
        return ts(obj.created_at)


class CallbackDeliveryInline(ReadOnlyInline):
    model = CallbackDelivery
    fields = ("event_type", "webhook_id", "status", "attempts", "next_attempt", "last_error", "delivered")
    ordering = ("-id",)
    show_change_link = True
    verbose_name_plural = "callback deliveries"

    @admin.display(description="next attempt (UTC)")
    def next_attempt(self, obj: CallbackDelivery) -> str:
        return ts(obj.next_attempt_at)

    @admin.display(description="delivered (UTC)")
    def delivered(self, obj: CallbackDelivery) -> str:
        return ts(obj.delivered_at)


@admin.register(Order)
class OrderAdmin(ReadOnlyAdmin):
    list_display = (
        "reference",
        "order_id",
        "merchant",
        "amount_display",
        "status_display",
        "outcome",
        "channel",
        "created",
        "age_display",
    )
    list_display_links = ("reference",)
    list_filter = ("status", "outcome", ChannelFilter, "merchant", "created_at")
    list_select_related = ("merchant",)
    list_per_page = 50
    ordering = ("-created_at", "-id")
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    search_fields = ("=id",)  # shows the box; get_search_results does the work
    search_help_text = "Exact order id, reference or provider reference."
    actions = ("resend_callback", "requery_provider")
    inlines = (
        TransitionInline,
        ChargeAttemptInline,
        RefundInline,
        CallbackDeliveryInline,
        IgnoredSignalInline,
    )
    readonly_fields = (
        "amount_display",
        "amount_refunded_display",
        "status_display",
        "payment_method_display",
        "metadata_display",
        "callback_attempts",
        "created",
        "updated",
        "completed",
        "next_check",
    )

    def get_urls(self):
        refund = self.admin_site.admin_view(
            lambda request, object_id: order_refund_view(self, request, object_id)
        )
        return [path("<path:object_id>/refund/", refund, name="orders_order_refund"), *super().get_urls()]

    def get_fieldsets(self, request, obj=None):
        order = (
            "id",
            "merchant",
            "reference",
            "amount_display",
            "amount_refunded_display",
            "status_display",
            "outcome",
            "channel",
            "payment_method_display",
            "provider_reference",
        )
        timeline = ("created", "updated", "completed", "next_check", "check_count", "request_id")
        fieldsets = [(None, {"fields": order})]
        if obj is not None and (obj.failure_code or obj.failure_message):
            fieldsets.append(("Failure", {"fields": ("failure_code", "failure_message")}))
        fieldsets += [
            ("Client", {"fields": ("callback_url", "description", "metadata_display")}),
            ("Timeline (UTC)", {"fields": timeline}),
            ("Callback attempts (newest first)", {"fields": ("callback_attempts",)}),
        ]
        return fieldsets

    @admin.display(description="payment method")
    def payment_method_display(self, obj: Order) -> str:
        # The payer's token is never shown in full (SPEC 11).
        return payment_methods.mask(obj.payment_method) or "—"

    @admin.display(description="id")
    def order_id(self, obj: Order) -> str:
        return format_html('<code style="font-size:11px">{}</code>', obj.pk)

    @admin.display(description="amount", ordering="amount")
    def amount_display(self, obj: Order) -> str:
        return money_format(amount=obj.amount, currency=obj.currency)

    @admin.display(description="amount refunded")
    def amount_refunded_display(self, obj: Order) -> str:
        # in the amount's own terms ("25.00 USD"), not in minor units beside it
        return money_format(amount=obj.amount_refunded, currency=obj.currency)

    @admin.display(description="status", ordering="status")
    def status_display(self, obj: Order) -> str:
        return status_badge(obj.status)

    @admin.display(description="created (UTC)", ordering="created_at")
    def created(self, obj: Order) -> str:
        return ts(obj.created_at)

    @admin.display(description="updated")
    def updated(self, obj: Order) -> str:
        return ts(obj.updated_at)

    @admin.display(description="completed")
    def completed(self, obj: Order) -> str:
        return ts(obj.completed_at)

    @admin.display(description="next check")
    def next_check(self, obj: Order) -> str:
        return ts(obj.next_check_at) if obj.next_check_at else "— (nothing more expected)"

    @admin.display(description="age", ordering="created_at")
    def age_display(self, obj: Order) -> str:
        return age(obj.created_at)

    @admin.display(description="metadata")
    def metadata_display(self, obj: Order) -> str:
        return format_html(
            "<pre style='margin:0'>{}</pre>", json.dumps(obj.metadata, indent=2, sort_keys=True)
        )

    @admin.display(description="attempts")
    def callback_attempts(self, obj: Order) -> str:
        attempts = callback_attempts_for_order(order_id=obj.pk)
        if not attempts:
            return "none yet"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td><td><code>{}</code></td></tr>",
            (
                (
                    ts(a.attempted_at),
                    a.delivery.event_type,
                    a.status_code if a.status_code is not None else "—",
                    a.latency_ms,
                    a.error or "",
                    a.response_excerpt[:200],
                )
                for a in attempts
            ),
        )
        return format_html(
            "<table><thead><tr><th>at</th><th>event</th><th>status</th><th>latency</th><th>error</th>"
            "<th>answer (excerpt)</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    def get_search_results(self, request, queryset, search_term):
        """Exact matches only, each through an index: id (pk), reference, provider reference."""
        term = search_term.strip()
        if not term:
            return queryset, False
        match = exact_or_order_id(term[:64], "reference", order_field="pk")
        order_ids = order_ids_by_provider_reference(reference=term[:128])
        if order_ids:
            match |= Q(pk__in=order_ids)
        return queryset.filter(match), False

    # One permission per capability, declared by the app that owns it: resending a callback is the
    # same power here and on the deliveries page.
    def has_resend_callback_permission(self, request) -> bool:
        return request.user.has_perm("callbacks.resend_callback")

    def has_requery_provider_permission(self, request) -> bool:
        return request.user.has_perm("orders.requery_provider")

    def change_view(self, request, object_id, form_url="", extra_context=None):
        """The page's buttons only for those who may press them (the action checks again)."""
        extra_context = {
            **(extra_context or {}),
            "can_resend_callback": self.has_resend_callback_permission(request),
            "can_requery_provider": self.has_requery_provider_permission(request),
            "can_refund": request.user.has_perm(REFUND_PERMISSION),
            # The refund form's Idempotency-Key, fresh with every drawing of the page.
            "refund_key": uuid.uuid4().hex,
        }
        return super().change_view(request, object_id, form_url, extra_context)

    def _back_to_order(self, request, queryset):
        """Actions started from an order's page return to it."""
        if request.POST.get("_from_order_page") and queryset.count() == 1:
            return HttpResponseRedirect(reverse("admin:orders_order_change", args=[queryset.get().pk]))
        return None

    @admin.action(description="Resend callback (make it due now)", permissions=["resend_callback"])
    def resend_callback(self, request, queryset):
        orders = list(queryset.select_related(None).only("id", "reference", "status")[: RESEND_MAX + 1])
        if len(orders) > RESEND_MAX:
            self.message_user(request, f"Select at most {RESEND_MAX} orders at a time.", messages.ERROR)
            return None
        outcomes: Counter[str] = Counter()
        for order in orders:
            outcome = callback_resend_for_order(order_id=order.pk)
            outcomes[outcome] += 1
            if outcome in ("resent", "scheduled"):
                audit(self, request, order, f"Callback {outcome} by operator.", action="resend_callback")
        done = outcomes["resent"] + outcomes["scheduled"]
        parts = [f"{n} {what.replace('_', ' ')}" for what, n in sorted(outcomes.items())]
        self.message_user(
            request,
            f"Callback made due for {done} order(s): " + ", ".join(parts) + ".",
            messages.SUCCESS if done else messages.WARNING,
        )
        return self._back_to_order(request, queryset)

    @admin.action(
        description="Re-query provider status (processing orders; resume one the sweep gave up on)",
        permissions=["requery_provider"],
    )
    def requery_provider(self, request, queryset):
        orders = list(queryset.select_related(None).only("id", "reference", "status")[: REQUERY_MAX + 1])
        if len(orders) > REQUERY_MAX:
            self.message_user(
                request,
                f"Re-query asks the provider once per order: select at most {REQUERY_MAX}.",
                messages.ERROR,
            )
            return None
        budget = RequeryBudget()
        for index, order in enumerate(orders):
            if budget.stops(self, request, orders[index:], lambda o: o.reference):
                break
            if order_resume(order_id=order.pk):
                detail = "the sweep gave up on it: due again, the sweep moves it on at its next pass"
                audit(self, request, order, f"Resumed: {detail}.", action="requery_provider")
                self.message_user(
                    request, f"Order {order.reference}: {order.status}, {detail}.", messages.INFO
                )
                continue
            if order.status != OrderStatus.PROCESSING:
                self.message_user(
                    request,
                    f"Order {order.reference}: {order.status}, nothing to ask the provider.",
                    messages.WARNING,
                )
                continue
            polled = order_poll(order_id=order.pk)
            now = Order.objects.filter(pk=order.pk).values_list("status", flat=True).first()
            audit(
                self,
                request,
                order,
                f"Provider status re-queried ({polled.said}); order now {now}.",
                action="requery_provider",
            )
            detail, level = requery_detail(polled, now, still=OrderStatus.PROCESSING)
            # Not led by the reference: the admin's template capitalises a message's first letter,
            # and a reference pasted from "Ab-1" into the exact-match search would find nothing.
            self.message_user(request, f"Order {order.reference}: re-queried, {detail}.", level)
        return self._back_to_order(request, queryset)


# --- merchants ---------------------------------------------------------------------------------


class MerchantForm(forms.ModelForm):
    """Only what an operator may edit; keys and secrets rotate through actions, never a form."""

    callback_url = forms.URLField(max_length=2048, required=False, assume_scheme="https")

    class Meta:
        model = Merchant
        fields = ("name", "callback_url", "is_active")

    def clean_callback_url(self) -> str:
        url = self.cleaned_data["callback_url"]
        try:
            callback_url_validate(url)  # checked again on save; here to show it on the form
        except InvalidRequest as exc:
            raise forms.ValidationError(exc.message) from exc
        return url


@admin.register(Merchant)
class MerchantAdmin(GuardedActionsAdmin):
    form = MerchantForm
    list_display = (
        "name",
        "id",
        "api_key_prefix",
        "callback_url",
        "is_active",
        "secret_overlap",
        "created_at",
    )
    list_filter = ("is_active",)
    search_fields = ("name", "=id", "=api_key_prefix")
    readonly_fields = ("id", "api_key_prefix", "secret_overlap", "created_at")
    actions = ("rotate_api_key", "rotate_webhook_secret")
    show_facets = admin.ShowFacets.NEVER

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("name", "callback_url")
        return ("id", "name", "callback_url", "is_active", "api_key_prefix", "secret_overlap", "created_at")

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # orders reference merchants; deactivate instead

    @admin.display(description="previous secret valid until")
    def secret_overlap(self, obj: Merchant) -> str:
        expires = obj.previous_webhook_secret_expires_at
        return expires.strftime("%Y-%m-%d %H:%M UTC") if expires else "—"

    def save_model(self, request, obj, form, change):
        if change:
            merchant_update(
                merchant=obj, name=obj.name, callback_url=obj.callback_url, is_active=obj.is_active
            )
            return
        creds = merchant_create(name=obj.name, callback_url=obj.callback_url)
        # The admin goes on with `obj` (redirect, LogEntry): make it the row the service created.
        for field in Merchant._meta.concrete_fields:
            setattr(obj, field.attname, getattr(creds.merchant, field.attname))
        obj._state.adding = False
        obj._state.db = creds.merchant._state.db
        # Shown by response_add, in this request only: never a message, never stored.
        request._merchant_secrets_shown_once = [
            {"object": creds.merchant, "what": "API key", "value": creds.api_key},
            {"object": creds.merchant, "what": "webhook secret", "value": creds.webhook_secret},
        ]

    def response_add(self, request, obj, post_url_continue=None):
        secrets = getattr(request, "_merchant_secrets_shown_once", None)
        if secrets is None:
            return super().response_add(request, obj, post_url_continue)
        return shown_once_response(request, self, title=f"Merchant {obj.name} added", secrets=secrets)

    def has_rotate_merchant_key_permission(self, request) -> bool:
        return request.user.has_perm("orders.rotate_merchant_key")

    @admin.action(
        description="Rotate API key (the old key stops working at once)",
        permissions=["rotate_merchant_key"],
    )
    def rotate_api_key(self, request, queryset):
        secrets = []
        for merchant in queryset:
            api_key = merchant_rotate_api_key(merchant=merchant)
            audit(self, request, merchant, "API key rotated.", action="rotate_api_key")
            secrets.append({"object": merchant, "what": "new API key", "value": api_key})
        return shown_once_response(request, self, title="API keys rotated", secrets=secrets)

    @admin.action(
        description="Rotate webhook secret (the old one keeps signing for 24 h)",
        permissions=["rotate_merchant_key"],
    )
    def rotate_webhook_secret(self, request, queryset):
        secrets = []
        for merchant in queryset:
            secret = merchant_rotate_webhook_secret(merchant=merchant)
            audit(self, request, merchant, "Webhook secret rotated.", action="rotate_webhook_secret")
            secrets.append({"object": merchant, "what": "new webhook secret", "value": secret})
        return shown_once_response(request, self, title="Webhook secrets rotated", secrets=secrets)
