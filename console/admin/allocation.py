"""Operators' console for payment channels: state at a glance; enable, disable, close a circuit.

The actions need `allocation.manage_paymentchannel`: the page is read-only, so no model
"change" permission applies, and viewing a channel must not be enough to switch it off.
"""

import re
from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from allocation.models import PaymentChannel
from allocation.selectors import channel_recent_volume, channels_with_volume, credential_hint
from allocation.services import (
    InvalidCredential,
    channel_circuit_close,
    channel_create,
    channel_credentials_set,
    channel_set_enabled,
)
from console.adminkit import ReadOnlyAdmin, audit
from gateway.providers.base import provider_names
from gateway.providers.sandbox import sandbox_channel_secret
from gateway.selectors import ChannelResults, charge_results_by_channel
from orders.serializers import iso_currency

SUCCESS_WINDOW = timedelta(hours=1)


def _minor(amount: int | None) -> str:
    return f"{amount:,}" if amount is not None else "—"


def volume_against_cap(channel: PaymentChannel) -> str:
    """Today's reserved volume against the daily cap; `channel` comes from channels_with_volume."""
    reserved = getattr(channel, "day_reserved", None) or 0
    if channel.daily_cap is None:
        return f"{reserved:,} / no cap"
    if channel.daily_cap <= 0:  # only from before the add form refused it: it takes nothing
        return f"{reserved:,} / {channel.daily_cap:,} (takes no orders)"
    share = reserved / channel.daily_cap
    colour = "#dc3545" if share >= 0.9 else "#b58105" if share >= 0.7 else "inherit"
    return format_html(
        '{} / {} <span style="color:{}">({}%)</span>',
        f"{reserved:,}",
        f"{channel.daily_cap:,}",
        colour,
        f"{share * 100:.1f}",
    )


def circuit_state(channel: PaymentChannel) -> str:
    until = channel.circuit_open_until
    if until and until > timezone.now():
        return format_html(
            '<span style="color:#dc3545;font-weight:bold">open</span> until {}',
            until.strftime("%H:%M:%S UTC"),
        )
    if until:
        # The cool-down is over, and no charge has succeeded since: one trial order at a time
        # decides whether it closes (success) or opens again (another technical failure).
        return format_html(
            '<span style="color:#b58105;font-weight:bold">half-open</span> since {}: {}',
            until.strftime("%H:%M:%S UTC"),
            "one trial order at a time",
        )
    return mark_safe('<span style="color:#198754">closed</span>')


def success_rate(results: ChannelResults | None) -> str:
    if results is None or results.success_rate is None:
        return "—"
    rate = results.success_rate
    colour = "#198754" if rate >= 0.9 else "#b58105" if rate >= 0.5 else "#dc3545"
    return format_html(
        '<span style="color:{}">{}%</span> <span style="color:#888">({} of {})</span>',
        colour,
        f"{rate * 100:.1f}",
        f"{results.paid:,}",
        f"{results.settled:,}",
    )


class CredentialsForm(forms.Form):
    """A channel's credentials, typed in and never rendered back (PasswordInput, no initial value)."""

    api_key = forms.CharField(
        required=False,
        max_length=500,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Stripe: the secret key (sk_…) or a restricted key (rk_…) of the account.",
    )
    webhook_secret = forms.CharField(
        required=False,
        max_length=500,
        strip=True,
        label="Webhook endpoint secret",
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Stripe: the signing secret (whsec_…) of the endpoint …/api/v1/gateway/webhooks/stripe.",
    )


# What an operator gives a new channel, in the order its page shows them.
_SETTABLE = (
    "code",
    "provider",
    "currencies",
    "min_amount",
    "max_amount",
    "fee_bps",
    "fee_fixed",
    "priority",
    "weight",
    "daily_cap",
    "enabled",
    "api_base",
)


class ChannelAddForm(forms.ModelForm):
    """A new channel (`allocation.add_paymentchannel`). Once made, a channel changes only through
    the list's actions and its credentials page; its API key and webhook secret are set there."""

    provider = forms.ChoiceField(choices=())
    api_base = forms.URLField(
        max_length=500,
        required=False,
        assume_scheme="https",
        help_text="Empty: the provider's default (Stripe: STRIPE_API_BASE).",
    )

    class Meta:
        model = PaymentChannel
        fields = _SETTABLE
        help_texts = {"currencies": "ISO 4217 codes, comma-separated: USD,EUR."}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["provider"].choices = [(name, name) for name in provider_names()]

    def clean_currencies(self) -> list[str]:
        given = [value.strip() for value in self.cleaned_data["currencies"]]
        codes = [iso_currency(value) for value in given]
        unknown = [value for value, code in zip(given, codes, strict=True) if code is None]
        if unknown:
            raise forms.ValidationError(f"Not ISO 4217 codes: {', '.join(unknown)}.")
        if not codes or len(set(codes)) != len(codes):
            raise forms.ValidationError("At least one currency, each once.")
        return codes

    def clean(self):
        data = super().clean()
        low, high = data.get("min_amount"), data.get("max_amount")
        if low is not None and low < 1:
            self.add_error("min_amount", "At least 1.")
        # 0 would read as "no share" and "no room", but allocation takes a weight of 0 as 1 and a
        # cap of 0 refuses every order: leave the cap empty for none, disable a channel to stop it.
        if data.get("weight") is not None and data["weight"] < 1:
            self.add_error("weight", "At least 1.")
        if data.get("daily_cap") is not None and data["daily_cap"] < 1:
            self.add_error("daily_cap", "At least 1; leave it empty for no cap.")
        if low is not None and high is not None and high < low:
            self.add_error("max_amount", "Not below the minimum.")
        return data


@admin.register(PaymentChannel)
class PaymentChannelAdmin(ReadOnlyAdmin):
    list_display = (
        "code",
        "provider",
        "currencies_display",
        "priority",
        "weight",
        "enabled",
        "today_volume",
        "today_orders",
        "circuit",
        "success_last_hour",
    )
    # A handful of rows: no filter sidebar, the table gets the whole width.
    search_fields = ("code",)
    show_facets = admin.ShowFacets.NEVER
    actions = ("enable", "disable", "close_circuit")
    fields = (
        *("currencies_display" if name == "currencies" else name for name in _SETTABLE),
        "credentials",
        "today_volume",
        "today_orders",
        "circuit",
        "success_last_hour",
        "recent_volume",
        "created_at",
    )  # never the encrypted fields themselves: `credentials` shows their last four characters
    readonly_fields = (
        "credentials",
        "currencies_display",
        "today_volume",
        "today_orders",
        "circuit",
        "success_last_hour",
        "recent_volume",
    )

    def get_queryset(self, request):
        return channels_with_volume(day=timezone.now().date())

    # Adding is the one change made through a form; the rest are actions and the credentials page.
    def has_add_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("allocation.add_paymentchannel")

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = ChannelAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request, obj=None):
        return ChannelAddForm.Meta.fields if obj is None else self.fields

    def get_readonly_fields(self, request, obj=None):
        return () if obj is None else self.readonly_fields

    def save_model(self, request, obj, form, change) -> None:
        if change:  # no change permission: Django never gets here for an existing channel
            raise PermissionDenied
        channel_create(channel=obj)
        if obj.provider == "sandbox":
            # The sandbox signs a channel's webhooks with the secret derived from SANDBOX_SECRET and
            # the code, as seed_sandbox sets it; without it every webhook would be refused (401).
            secret = sandbox_channel_secret(obj.code, settings.SANDBOX_SECRET)
            channel_credentials_set(channel=obj, webhook_secret=secret)
            obj.refresh_from_db()
        if not obj.webhook_secret_encrypted:
            self.message_user(
                request,
                f"Channel {obj.code} has no webhook secret yet: set it on its credentials page. Until"
                " then its provider's webhooks are refused, and its orders settle only by status polls.",
                messages.WARNING,
            )

    def get_urls(self):
        view = self.admin_site.admin_view(self.credentials_view)
        return [
            path("<path:object_id>/credentials/", view, name="allocation_paymentchannel_credentials"),
            *super().get_urls(),
        ]

    @admin.display(description="credentials")
    def credentials(self, obj: PaymentChannel) -> str:
        link = reverse("admin:allocation_paymentchannel_credentials", args=[obj.pk])
        return format_html(
            'API key <code>{}</code>, webhook secret <code>{}</code> &nbsp;<a href="{}">set or rotate</a>',
            credential_hint(obj.api_key_encrypted),
            credential_hint(obj.webhook_secret_encrypted),
            link,
        )

    def credentials_view(self, request, object_id: str):
        """Set or rotate a channel's API key and endpoint secret (`allocation.manage_paymentchannel`)."""
        if not self.has_manage_paymentchannel_permission(request):
            raise PermissionDenied
        # ASCII digits only: str.isdigit() also says yes to "²" (int() does not) and to Arabic-Indic ones
        is_id = re.fullmatch(r"[0-9]{1,18}", object_id)
        channel = PaymentChannel.objects.filter(pk=object_id).first() if is_id else None
        if channel is None:
            raise Http404("No such channel.")
        form = CredentialsForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                changed = channel_credentials_set(
                    channel=channel,
                    api_key=form.cleaned_data["api_key"] or None,
                    webhook_secret=form.cleaned_data["webhook_secret"] or None,
                )
            except InvalidCredential as exc:
                form.add_error(None, exc.message)
            else:
                if changed:
                    audit(
                        self,
                        request,
                        channel,
                        f"Credentials set: {', '.join(changed)}.",
                        action="channel_credentials_set",
                    )
                    channel.refresh_from_db()
                    hints = ", ".join(
                        f"{name.replace('_', ' ')} {credential_hint(getattr(channel, name + '_encrypted'))}"
                        for name in changed
                    )
                    self.message_user(request, f"Channel {channel.code}: {hints}.", messages.SUCCESS)
                else:
                    self.message_user(request, "Nothing to change: both fields were empty.", messages.INFO)
                return HttpResponseRedirect(
                    reverse("admin:allocation_paymentchannel_change", args=[channel.pk])
                )
        context = {
            **self.admin_site.each_context(request),
            "title": f"Credentials of {channel.code}",
            "opts": self.opts,
            "channel": channel,
            "form": form,
            "api_key_hint": credential_hint(channel.api_key_encrypted),
            "webhook_secret_hint": credential_hint(channel.webhook_secret_encrypted),
        }
        response = TemplateResponse(request, "admin/allocation/paymentchannel/credentials.html", context)
        add_never_cache_headers(response)
        return response

    def get_changelist_instance(self, request):
        """Attach the last hour's charge results to the page's channels: one aggregate query."""
        changelist = super().get_changelist_instance(request)
        results = charge_results_by_channel(since=timezone.now() - SUCCESS_WINDOW)
        changelist.result_list = list(changelist.result_list)
        for channel in changelist.result_list:
            channel.results_last_hour = results.get(channel.code, ChannelResults())
        return changelist

    @admin.display(description="currencies")
    def currencies_display(self, obj: PaymentChannel) -> str:
        return ", ".join(obj.currencies)

    @admin.display(description="volume today / cap (minor units)")
    def today_volume(self, obj: PaymentChannel) -> str:
        return volume_against_cap(obj)

    @admin.display(description="orders today")
    def today_orders(self, obj: PaymentChannel) -> str:
        return f"{getattr(obj, 'day_orders', None) or 0:,}"

    @admin.display(description="circuit")
    def circuit(self, obj: PaymentChannel) -> str:
        return circuit_state(obj)

    @admin.display(description="success, 1 h")
    def success_last_hour(self, obj: PaymentChannel) -> str:
        results = getattr(obj, "results_last_hour", None)
        if results is None:  # the channel's own page: one query for one channel
            since = timezone.now() - SUCCESS_WINDOW
            results = charge_results_by_channel(since=since).get(obj.code, ChannelResults())
        return success_rate(results)

    @admin.display(description="last 14 days")
    def recent_volume(self, obj: PaymentChannel) -> str:
        days = channel_recent_volume(channel=obj)
        if not days:
            return "no volume yet"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((d.day, _minor(d.reserved), d.orders) for d in days),
        )
        return format_html(
            "<table><thead><tr><th>day (UTC)</th><th>reserved</th><th>orders</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )

    def has_manage_paymentchannel_permission(self, request) -> bool:
        return request.user.has_perm("allocation.manage_paymentchannel")

    def _set_enabled(self, request, queryset, enabled: bool) -> None:
        changed = 0
        for channel in queryset:
            if channel.enabled == enabled:
                continue
            channel_set_enabled(channel=channel, enabled=enabled)
            audit(
                self, request, channel, "Enabled." if enabled else "Disabled.", action="channel_set_enabled"
            )
            changed += 1
        verb = "enabled" if enabled else "disabled"
        self.message_user(request, f"{changed} channel(s) {verb}.", messages.SUCCESS)

    @admin.action(description="Enable selected channels", permissions=["manage_paymentchannel"])
    def enable(self, request, queryset):
        self._set_enabled(request, queryset, True)

    @admin.action(
        description="Disable selected channels (no new orders are allocated to them)",
        permissions=["manage_paymentchannel"],
    )
    def disable(self, request, queryset):
        self._set_enabled(request, queryset, False)

    @admin.action(
        description="Close circuit (let selected channels take orders again now)",
        permissions=["manage_paymentchannel"],
    )
    def close_circuit(self, request, queryset):
        closed = 0
        for channel in queryset:
            channel_circuit_close(channel=channel)
            audit(self, request, channel, "Circuit closed.", action="channel_circuit_close")
            closed += 1
        self.message_user(request, f"Circuit closed on {closed} channel(s).", messages.SUCCESS)
