"""Operators' console for refunds (SPEC 10): their own read-only list and page, the inline on the
order's page, and the refund form of the order's page (orders.change_order needed)."""

import re
import uuid

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import Http404, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils import timezone

from console.admin.signals import RefundIgnoredSignalInline
from console.adminkit import (
    REQUERY_MAX,
    ReadOnlyAdmin,
    ReadOnlyInline,
    RequeryBudget,
    audit,
    exact_or_order_id,
    requery_detail,
    ts,
)
from core.errors import DomainError
from gateway.models import RefundAttempt
from gateway.selectors import refund_ids_by_provider_reference
from gateway.services import refund_poll
from orders.models import Order, Refund, RefundStatus, RefundTransition
from orders.money import money_format
from orders.serializers import RefundCreateSerializer
from orders.services import refund_create, refund_fingerprint, refund_resume

REFUND_PERMISSION = "orders.change_order"
_FORM_KEY = re.compile(r"[0-9a-f]{32}")
_AMOUNT = re.compile(r"[0-9]{1,13}")  # ASCII digits only: str.isdigit() also says yes to "²"


class RefundInline(ReadOnlyInline):
    model = Refund
    fk_name = "order"
    fields = ("at", "amount_display", "status", "reason", "reference", "failure_code")
    ordering = ("created_at", "id")
    show_change_link = True
    verbose_name_plural = "refunds (oldest first)"

    @admin.display(description="at (UTC)")
    def at(self, obj: Refund) -> str:
        return ts(obj.created_at)

    @admin.display(description="amount")
    def amount_display(self, obj: Refund) -> str:
        return money_format(amount=obj.amount, currency=obj.currency)


class RefundTransitionInline(ReadOnlyInline):
    model = RefundTransition
    fields = ("at", "from_status", "to_status", "channel", "reason")
    ordering = ("-id",)
    verbose_name_plural = "transitions (newest first)"

    @admin.display(description="at (UTC)")
    def at(self, obj: RefundTransition) -> str:
        return ts(obj.created_at)


class RefundAttemptInline(ReadOnlyInline):
    """The refund's request to the provider: what it answered, how often it was sent, and when the
    next send may go (after a "try again later")."""

    model = RefundAttempt
    fk_name = "refund"
    fields = (
        "at",
        "channel",
        "provider",
        "status",
        "sends",
        "provider_reference",
        "http_status",
        "failure_code",
        "error",
        "next_send",
    )
    verbose_name = verbose_name_plural = "request to the provider"

    @admin.display(description="at (UTC)")
    def at(self, obj: RefundAttempt) -> str:
        return ts(obj.created_at)

    @admin.display(description="no send before (UTC)")
    def next_send(self, obj: RefundAttempt) -> str:
        return ts(obj.retry_after) if obj.retry_after else "—"


@admin.register(Refund)
class RefundAdmin(ReadOnlyAdmin):
    list_display = ("refund_id", "order", "merchant", "amount_display", "status", "failure_code", "created")
    list_filter = ("status", "currency", "merchant", "created_at")
    list_select_related = ("order", "merchant")
    list_per_page = 50
    ordering = ("-created_at", "-id")
    show_facets = admin.ShowFacets.NEVER
    search_fields = ("=id",)  # shows the box; get_search_results does the work
    search_help_text = "Exact refund id, order id, refund reference or the provider's refund id."
    inlines = (RefundAttemptInline, RefundTransitionInline, RefundIgnoredSignalInline)
    fields = (
        "id",
        "order",
        "merchant",
        "amount_display",
        "status",
        "channel",
        "reason",
        "reference",
        "metadata",
        "failure_code",
        "failure_message",
        "created",
        "next_check_at",
        "check_count",
    )
    readonly_fields = ("amount_display", "created")

    @admin.display(description="id")
    def refund_id(self, obj: Refund) -> str:
        return str(obj.pk)

    @admin.display(description="amount", ordering="amount")
    def amount_display(self, obj: Refund) -> str:
        return money_format(amount=obj.amount, currency=obj.currency)

    @admin.display(description="created (UTC)", ordering="created_at")
    def created(self, obj: Refund) -> str:
        return ts(obj.created_at)

    actions = ("requery_provider",)

    # The same power as on orders: asking the provider about money it holds or owes.
    def has_requery_provider_permission(self, request) -> bool:
        return request.user.has_perm("orders.requery_provider")

    @admin.action(
        description="Re-query provider status (processing refunds; resume a pending one or a lost callback)",
        permissions=["requery_provider"],
    )
    def requery_provider(self, request, queryset):
        refunds = list(queryset.select_related(None).only("id", "status")[: REQUERY_MAX + 1])
        if len(refunds) > REQUERY_MAX:
            self.message_user(
                request,
                f"Re-query asks the provider once per refund: select at most {REQUERY_MAX}.",
                messages.ERROR,
            )
            return
        budget = RequeryBudget()
        for index, refund in enumerate(refunds):
            if budget.stops(self, request, refunds[index:], lambda r: r.pk):
                break
            if refund.status == RefundStatus.PENDING:
                # Not sent, or sent and told to retry: the sweep sends it (same key) at its next pass,
                # but never before the time the provider asked it to wait for.
                if not refund_resume(refund_id=refund.pk):  # moved on since the list was read
                    now = Refund.objects.filter(pk=refund.pk).values_list("status", flat=True).first()
                    self.message_user(
                        request, f"Refund {refund.pk}: now {now}, not resumed.", messages.WARNING
                    )
                    continue
                wait = RefundAttempt.objects.filter(refund_id=refund.pk, retry_after__gt=timezone.now())
                not_before = wait.values_list("retry_after", flat=True).first()
                detail = (
                    f"pending, the provider asked to wait: sent again after {ts(not_before)} UTC"
                    if not_before
                    else "pending, to be sent again at the next sweep"
                )
                level = messages.INFO
            elif refund.status == RefundStatus.PROCESSING:
                polled = refund_poll(refund_id=refund.pk)
                now = Refund.objects.filter(pk=refund.pk).values_list("status", flat=True).first()
                detail, level = requery_detail(polled, now, still=RefundStatus.PROCESSING)
                detail = f"re-queried, {detail}"
            elif refund_resume(refund_id=refund.pk):
                detail = f"{refund.status}, the sweep gave up before its callback was scheduled: due again"
                level = messages.INFO
            else:
                self.message_user(
                    request,
                    f"Refund {refund.pk}: {refund.status}, nothing to ask the provider.",
                    messages.WARNING,
                )
                continue
            audit(self, request, refund, f"Provider status re-queried: {detail}.", action="requery_provider")
            self.message_user(request, f"Refund {refund.pk}: {detail}.", level)

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()[:64]
        if not term:
            return queryset, False
        match = exact_or_order_id(term, "reference")
        try:
            match |= exact_or_order_id(str(uuid.UUID(term)), "reference", order_field="pk")
        except ValueError:
            pass
        refund_ids = refund_ids_by_provider_reference(reference=search_term.strip()[:128])
        if refund_ids:
            match |= Q(pk__in=refund_ids)
        return queryset.filter(match), False


def order_refund_view(model_admin: admin.ModelAdmin, request, object_id: str):
    """POST from the order's page: refund `amount` (blank: everything left) with `reason`.

    The form carries a key made when the page was drawn, used as the refund's Idempotency-Key:
    a double submit or a reload makes one refund, not two.
    """
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    if not request.user.has_perm(REFUND_PERMISSION):
        raise PermissionDenied
    try:
        order_id = uuid.UUID(object_id)
    except ValueError:
        raise Http404("No such order.") from None
    order = get_object_or_404(Order.objects.select_related("merchant"), pk=order_id)
    back = HttpResponseRedirect(reverse("admin:orders_order_change", args=[order.pk]))
    form_key = request.POST.get("refund_key", "")
    if not _FORM_KEY.fullmatch(form_key):
        model_admin.message_user(request, "The refund form expired: reload the page.", messages.ERROR)
        return back
    raw_amount = request.POST.get("amount", "").strip()
    data: dict = {}
    if raw_amount:
        if not _AMOUNT.fullmatch(raw_amount):
            model_admin.message_user(request, "Amount: a whole number of minor units.", messages.ERROR)
            return back
        data["amount"] = int(raw_amount)
    if reason := request.POST.get("reason", ""):
        data["reason"] = reason
    serializer = RefundCreateSerializer(data=data)
    if not serializer.is_valid():
        problems = "; ".join(
            f"{name}: {' '.join(map(str, errs))}" for name, errs in serializer.errors.items()
        )
        model_admin.message_user(request, f"Not refunded. {problems}", messages.ERROR)
        return back
    valid = serializer.validated_data
    try:
        result = refund_create(
            merchant=order.merchant,
            order_id=str(order.pk),
            idempotency_key=f"console:{form_key}",
            fingerprint=refund_fingerprint(order_id=order.pk, data=valid),
            amount=valid.get("amount"),
            reason=valid.get("reason"),
        )
    except DomainError as exc:
        model_admin.message_user(request, f"Not refunded ({exc.code}): {exc.message}", messages.ERROR)
        return back
    refund = result.body
    amount = money_format(amount=refund["amount"], currency=refund["currency"])
    if result.replayed:
        model_admin.message_user(request, f"Refund {refund['id']} of {amount} was already requested.")
        return back
    audit(model_admin, request, order, f"Refund {refund['id']} of {amount} requested.", action="refund")
    model_admin.message_user(request, f"Refund {refund['id']} of {amount} requested.", messages.SUCCESS)
    return back
