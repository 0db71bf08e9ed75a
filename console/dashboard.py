"""The operators' dashboard at /admin/dashboard/: the whole pipeline on one page, for staff who may
view orders.

Every number comes from a selector bounded by an index or by the last hour, so the page costs
the same with a million completed orders as with a hundred. The chart is SVG drawn here, on
the server: no JavaScript, nothing fetched from elsewhere.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from allocation.selectors import channels_with_volume
from callbacks.selectors import callbacks_health, deliveries_exhausted
from console.admin.allocation import circuit_state, success_rate, volume_against_cap
from console.admin.orders import status_badge
from core.broker import BROKER_ERRORS, queue_depths
from gateway.selectors import ChannelResults, charge_results_by_channel
from orders.models import OrderStatus
from orders.selectors import (
    orders_latency,
    orders_open_by_status,
    orders_per_minute,
    orders_stuck,
    orders_stuck_counts,
    orders_total_estimate,
    outbox_backlog,
    refunded_by_currency,
    refunds_by_status,
    refunds_stuck,
    refunds_stuck_counts,
)

WINDOW = timedelta(hours=1)
# An order whose next check is this far in the past is not being swept: beat or workers are down.
OVERDUE_GRACE = timedelta(minutes=2)
# The oldest this many of each kind of order (and of refund) that needs a person are listed (all
# are counted).
STUCK_SHOWN = 50
OPEN_STATUSES = (
    OrderStatus.PENDING,
    OrderStatus.ASSIGNED,
    OrderStatus.PROCESSING,
    OrderStatus.PAID,
    OrderStatus.FAILED,
)


# The page shows orders (ids, references, who needs a person) and callback errors naming the
# merchants' hosts: an operator needs to be allowed to view orders to open it, as for their list.
VIEW_PERMISSION = "orders.view_order"


def dashboard(request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied
    now = timezone.now()
    since = now - WINDOW
    open_counts = orders_open_by_status()
    results = charge_results_by_channel(since=since)
    channels = [
        {
            "channel": channel,
            "circuit": circuit_state(channel),
            "volume": volume_against_cap(channel),
            "success": success_rate(results.get(channel.code, ChannelResults())),
            "attempts": results.get(channel.code, ChannelResults()).settled,
        }
        for channel in channels_with_volume(day=now.date()).order_by("priority", "code")
    ]
    try:
        queues = queue_depths()
    except (redis.RedisError, *BROKER_ERRORS):  # a RabbitMQ broker raises its own
        queues = None
    # Whole minutes only: the current one is still filling and would always look like a drop.
    this_minute = now.replace(second=0, microsecond=0)
    series = orders_per_minute(since=this_minute - WINDOW, until=this_minute)
    latency = orders_latency(since=since)
    callback_health = callbacks_health(since=since)
    refund_counts = refunds_by_status()
    context = {
        **admin.site.each_context(request),
        "title": "Dashboard",
        "now": now,
        "statuses": [(status_badge(s), open_counts.get(s, 0)) for s in OPEN_STATUSES],
        "open_total": sum(open_counts.values()),
        "completed_last_hour": latency.count,
        "total_estimate": orders_total_estimate(),
        "chart_created": sum(created for _, created, _ in series),
        "chart_completed": sum(completed for _, _, completed in series),
        "chart": throughput_chart(series),
        "latency": latency,
        "latency_text": {name: _seconds(getattr(latency, name)) for name in ("p50", "p95", "p99")},
        "callbacks": callback_health,
        "callback_ratio": "—"
        if callback_health.success_ratio is None
        else f"{callback_health.success_ratio:.1%}",
        "channels": channels,
        "outbox_backlog": outbox_backlog(),
        "queues": queues,
        "stuck": orders_stuck(overdue_before=now - OVERDUE_GRACE, limit=STUCK_SHOWN),
        "stuck_counts": orders_stuck_counts(overdue_before=now - OVERDUE_GRACE),
        "stuck_shown": STUCK_SHOWN,
        "stuck_refunds": refunds_stuck(overdue_before=now - OVERDUE_GRACE, limit=STUCK_SHOWN),
        "stuck_refund_counts": refunds_stuck_counts(overdue_before=now - OVERDUE_GRACE),
        "exhausted": deliveries_exhausted(limit=20),
        "refunds": [(s, refund_counts.get(s, 0)) for s in ("pending", "processing", "succeeded", "failed")],
        "refunded": sorted(refunded_by_currency().items()),
    }
    return TemplateResponse(request, "admin/dashboard.html", context)


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return (
        f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s" if value < 60 else f"{value / 60:.1f} min"
    )


# --- the chart ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Box:
    width: int = 1100
    height: int = 260
    left: int = 48
    right: int = 16
    top: int = 16
    bottom: int = 36

    @property
    def plot_width(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> int:
        return self.height - self.top - self.bottom


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5 x 10^k at or above `value` (at least 5), for a round axis."""
    if value <= 5:
        return 5
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def throughput_chart(series: list[tuple[datetime, int, int]]) -> SafeString:
    """Orders created and completed per minute as an inline SVG line chart with hover titles."""
    box = _Box()
    if not series:
        return mark_safe("")
    top = _nice_ceiling(max(max(c, d) for _, c, d in series))
    n = len(series)
    step = box.plot_width / max(n - 1, 1)

    def x(i: int) -> float:
        return box.left + i * step

    def y(v: int) -> float:
        return box.top + box.plot_height * (1 - v / top)

    def points(index: int) -> str:
        return " ".join(f"{x(i):.1f},{y(row[index]):.1f}" for i, row in enumerate(series))

    base = box.top + box.plot_height

    def f(value: float) -> str:
        return f"{value:.1f}"

    grid = format_html_join(
        "",
        '<line x1="{}" x2="{}" y1="{}" y2="{}" class="grid"/>'
        '<text x="{}" y="{}" class="label" text-anchor="end">{}</text>',
        (
            (box.left, box.width - box.right, f(y(v)), f(y(v)), box.left - 6, f(y(v) + 4), f"{v:,}")
            for v in (top * k // 4 for k in range(5))
        ),
    )
    ticks = format_html_join(
        "",
        '<line x1="{}" x2="{}" y1="{}" y2="{}" class="axis"/>'
        '<text x="{}" y="{}" class="label" text-anchor="middle">{}</text>',
        (
            (f(x(i)), f(x(i)), base, base + 4, f(x(i)), base + 18, minute.strftime("%H:%M"))
            for i, (minute, _, _) in enumerate(series)
            if minute.minute % 10 == 0
        ),
    )
    hovers = format_html_join(
        "",
        '<rect x="{}" y="{}" width="{}" height="{}" class="hover">'
        "<title>{} UTC: {} created, {} completed</title></rect>",
        (
            (
                f(x(i) - step / 2),
                box.top,
                f(step),
                box.plot_height,
                minute.strftime("%H:%M"),
                created,
                completed,
            )
            for i, (minute, created, completed) in enumerate(series)
        ),
    )
    area = f"{x(0):.1f},{base} {points(1)} {x(n - 1):.1f},{base}"
    return format_html(
        '<svg class="chart" viewBox="0 0 {w} {h}" width="100%" role="img" '
        'aria-label="Orders created and completed per minute, last hour">'
        "<style>"
        ".chart .grid{{stroke:var(--hairline-color,#ddd);stroke-width:1}}"
        ".chart .axis{{stroke:var(--body-quiet-color,#888);stroke-width:1}}"
        ".chart .label{{fill:var(--body-quiet-color,#666);font-size:11px;font-family:sans-serif}}"
        ".chart .created{{fill:none;stroke:#3b82f6;stroke-width:2}}"
        ".chart .created-area{{fill:#3b82f6;opacity:.12}}"
        ".chart .completed{{fill:none;stroke:#16a34a;stroke-width:2;stroke-dasharray:5 3}}"
        ".chart .hover{{fill:transparent}} .chart .hover:hover{{fill:rgba(127,127,127,.15)}}"
        "</style>"
        "{grid}"
        '<line x1="{left}" x2="{right}" y1="{base}" y2="{base}" class="axis"/>'
        "{ticks}"
        '<polygon points="{area}" class="created-area"/>'
        '<polyline points="{created}" class="created"/>'
        '<polyline points="{completed}" class="completed"/>'
        "{hovers}"
        "</svg>",
        w=box.width,
        h=box.height,
        grid=grid,
        left=box.left,
        right=box.width - box.right,
        base=base,
        ticks=ticks,
        area=area,
        created=points(1),
        completed=points(2),
        hovers=hovers,
    )
