"""The ignored signals inline, shown on the order's page (all of its signals) and on a refund's
page (that refund's)."""

from django.contrib import admin

from console.adminkit import ReadOnlyInline, ts
from orders.models import IgnoredSignal


class IgnoredSignalInline(ReadOnlyInline):
    model = IgnoredSignal
    fields = ("at", "status_at_signal", "requested_status", "reason")
    ordering = ("-id",)
    verbose_name_plural = "ignored late or duplicate signals (newest first)"

    @admin.display(description="at (UTC)")
    def at(self, obj: IgnoredSignal) -> str:
        return ts(obj.created_at)


class RefundIgnoredSignalInline(IgnoredSignalInline):
    fk_name = "refund"
