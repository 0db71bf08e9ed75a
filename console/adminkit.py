"""Pieces shared by the apps' admin modules: cheap pagination on big tables, read-only pages,
actions that need a permission of their own, secrets shown once without being stored."""

import json
import logging
import time
import uuid
from datetime import UTC, datetime

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connection
from django.db.models import Q
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers, patch_cache_control
from django.utils.functional import cached_property
from django.utils.html import format_html

from gateway.services import Polled

logger = logging.getLogger(__name__)

EXACT_COUNT_BELOW = 10_000


def exact_or_order_id(term: str, field: str, order_field: str = "order_id") -> Q:
    """Search: `field` equal to the term, or the order whose id the term is (when it is a UUID)."""
    match = Q(**{field: term})
    try:
        match |= Q(**{order_field: uuid.UUID(term)})
    except ValueError:
        pass
    return match


class EstimatedCountPaginator(Paginator):
    """Counts exactly only when the planner expects few rows; otherwise shows its estimate.

    COUNT(*) over a million orders reads every row; EXPLAIN reads none. Below the threshold the
    exact count is cheap and the pages add up; above it nobody pages to the end anyway.
    """

    @cached_property
    def count(self) -> int:
        queryset = self.object_list.order_by()
        sql, params = queryset.query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
            plan = cursor.fetchone()[0]
        if isinstance(plan, str):
            plan = json.loads(plan)
        estimate = int(plan[0]["Plan"]["Plan Rows"])
        if estimate >= EXACT_COUNT_BELOW:
            return estimate
        return queryset[: EXACT_COUNT_BELOW + 1].count()


class ChannelFilter(admin.SimpleListFilter):
    """Choices from the channels table: a DISTINCT over a million rows would read them all."""

    title = "channel"
    parameter_name = "channel"

    def lookups(self, request, model_admin):
        from allocation.selectors import channel_codes

        return [(code, code) for code in channel_codes()]

    def queryset(self, request, queryset):
        return queryset.filter(channel=self.value()) if self.value() else queryset


class ProviderFilter(admin.SimpleListFilter):
    """Providers of the configured channels, for the same reason."""

    title = "provider"
    parameter_name = "provider"

    def lookups(self, request, model_admin):
        from allocation.selectors import channel_providers

        return [(name, name) for name in channel_providers()]

    def queryset(self, request, queryset):
        return queryset.filter(provider=self.value()) if self.value() else queryset


# A re-query runs in the operator's request and asks the provider once per row: bound it, in
# rows and in time (a provider that does not answer costs each row its connect and read timeouts:
# twenty of them would hold the request for minutes, past any proxy's patience).
REQUERY_MAX = 20
REQUERY_BUDGET_SECONDS = 20.0


class RequeryBudget:
    """The time a re-query action may spend asking providers, from its start."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + REQUERY_BUDGET_SECONDS

    def stops(self, model_admin: admin.ModelAdmin, request, rest: list, name) -> bool:
        """True, once it is spent, after telling the operator which rows were not asked."""
        if time.monotonic() <= self.deadline or not rest:
            return False
        names = ", ".join(str(name(row)) for row in rest)
        model_admin.message_user(
            request,
            f"Stopped after {REQUERY_BUDGET_SECONDS:.0f} s of asking: not re-queried: {names}. Select fewer.",
            messages.WARNING,
        )
        return True


def requery_detail(polled: Polled, now: str, *, still: str) -> tuple[str, int]:
    """A re-query's words and message level: moved on (success), the provider's answer while it is
    `still` where it was (info), or not answered / not asked (a warning: someone has to look)."""
    if now != still:
        return f"now {now}", messages.SUCCESS
    return polled.said, messages.INFO if polled.answered else messages.WARNING


class GuardedActionsAdmin(admin.ModelAdmin):
    """Every action names the permission it needs; a POST naming one the user lacks is a 403.

    Django only leaves such an action out of the drop-down (and answers a forged POST with
    "No action selected" or a plain page). Refusing outright keeps the server the judge whatever
    the form said, and says so in the response.
    """

    def changelist_view(self, request, extra_context=None):
        if request.method == "POST":
            for name in request.POST.getlist("action"):
                if not self.action_allowed(request, name):
                    raise PermissionDenied
        return super().changelist_view(request, extra_context)

    def action_allowed(self, request, name: str) -> bool:
        """May this user run the action `name` here? Not an action of this admin: nothing to refuse."""
        action = self.get_action(name)
        if action is None:
            return True
        needs = getattr(action[0], "allowed_permissions", None)
        if needs is None:
            return True  # Django's default; tests/admin require every action to declare permissions
        return any(getattr(self, f"has_{perm}_permission")(request) for perm in needs)


class ReadOnlyAdmin(GuardedActionsAdmin):
    """Pages to look at: every change goes through an action that calls a service."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def get_readonly_fields(self, request, obj=None):
        return self.fields or ()

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


def shown_once_response(request, model_admin: admin.ModelAdmin, *, title: str, secrets: list[dict]):
    """A page, the answer to the operator's own POST, showing new keys or secrets once.

    Never a message: Django's messages cookie is signed, not encrypted, and a message may also land
    in the session table. The page is the only copy; `no-store` keeps it out of every cache.
    Each item of `secrets`: {"object": ..., "what": "API key", "value": "sk_..."}.
    """
    context = {
        **model_admin.admin_site.each_context(request),
        "title": title,
        "opts": model_admin.opts,
        "secrets": secrets,
    }
    response = TemplateResponse(request, "admin/shown_once.html", context)
    add_never_cache_headers(response)
    patch_cache_control(response, private=True)
    return response


def admin_link(obj, text: str | None = None) -> str:
    """A link to the admin page of `obj`."""
    url = reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, text if text is not None else str(obj))


def order_link(order_id, text: str | None = None) -> str:
    url = reverse("admin:orders_order_change", args=[order_id])
    return format_html('<a href="{}">{}</a>', url, text if text is not None else str(order_id))


def ts(value: datetime | None) -> str:
    """A timestamp for operators: UTC, ISO order, to the millisecond (transitions come fast)."""
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def age(since: datetime | None, now: datetime | None = None) -> str:
    """Compact elapsed time: 42s, 7m, 3h, 12d."""
    if since is None:
        return "-"
    seconds = max(int(((now or timezone.now()) - since).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def audit(model_admin: admin.ModelAdmin, request, obj, message: str, *, action: str) -> None:
    """Record an operator's action: a LogEntry (the object's History, "Recent actions") and a log line."""
    model_admin.log_change(request, obj, message)
    logger.info(
        "admin.action",
        extra={
            "action": action,
            "user": request.user.get_username(),
            "model": obj._meta.label,
            "object": str(obj.pk),
            "detail": message,
        },
    )
