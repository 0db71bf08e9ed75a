"""Order and refund API input validation and their representations (SPEC 3, 10)."""

import copy
import functools
import json

import pycountry
from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from orders import payment_methods
from orders.models import Order, OrderStatus, Outcome, Refund

MAX_AMOUNT = 10**12
MAX_METADATA_KEYS = 20
MAX_METADATA_BYTES = 4096
MAX_METADATA_KEY_LENGTH = 40


@extend_schema_field({"type": "integer", "format": "int64", "minimum": 1, "maximum": MAX_AMOUNT})
class StrictIntegerField(serializers.Field):
    """An integer that is a JSON integer: no floats, strings or booleans."""

    default_error_messages = {
        "invalid": "Must be an integer (minor units), not {kind}.",
        "range": "Must be between 1 and {maximum}.",
    }

    def __init__(self, *, maximum: int = MAX_AMOUNT, **kwargs) -> None:
        self.maximum = maximum
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid", kind=type(data).__name__ if data is not None else "null")
        if not 1 <= data <= self.maximum:
            self.fail("range", maximum=self.maximum)
        return data

    def to_representation(self, value):
        return value


class StrictCharField(serializers.CharField):
    """A string that is a JSON string: numbers are not silently turned into text."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


# The codes the API takes. The schema lists them in upper case, as the API answers them; lower
# case is accepted too (SPEC 3), which an enum cannot say, so clients and fuzzers read a narrower
# rule than the API applies, never a wider one.
CURRENCY_CODES = sorted(currency.alpha_3 for currency in pycountry.currencies)
_CURRENCY_CODES = frozenset(CURRENCY_CODES)


def iso_currency(value: str) -> str | None:
    """The ISO 4217 code `value` names in any case, upper-cased; None if it names none.

    ASCII first: str.upper() makes "USD" of "u\u017fd" (a long s) and "INR" of "\u0131nr".
    """
    code = value.upper()
    return code if value.isascii() and code in _CURRENCY_CODES else None


@extend_schema_field(
    {
        "type": "string",
        "enum": CURRENCY_CODES,
        "description": "ISO 4217 alphabetic code; case-insensitive, answered in upper case.",
    }
)
class CurrencyField(StrictCharField):
    pass


@extend_schema_field(
    {
        "type": "object",
        "maxProperties": MAX_METADATA_KEYS,
        "additionalProperties": {"type": "string"},
        "description": f"A flat object: at most {MAX_METADATA_KEYS} keys of 1 to {MAX_METADATA_KEY_LENGTH}"
        f" printable characters, string values, {MAX_METADATA_BYTES} bytes in all.",
    }
)
class MetadataField(serializers.DictField):
    pass


@extend_schema_field(
    {
        "type": "string",
        "format": "uri",
        "pattern": "^https?://",
        "description": "An http(s) URL without credentials, outside private networks;"
        " defaults to the merchant's.",
    }
)
class CallbackUrlField(StrictCharField):
    pass


@extend_schema_field(
    {
        "type": "string",
        "pattern": "^pm_[A-Za-z0-9_]{1,200}$",
        "description": "The payer's payment method as a provider's token (Stripe: `pm_…`, e.g. the test"
        " tokens `pm_card_visa`, `pm_card_chargeCustomerFail`). An order with one is charged only on"
        " `stripe` channels; without one, only on providers that need none.",
    }
)
class PaymentMethodField(StrictCharField):
    pass


def _printable(value: str) -> None:
    if not value.isprintable():
        raise serializers.ValidationError("Must not contain control characters.")


def _metadata_checked(value: dict) -> dict:
    if len(value) > MAX_METADATA_KEYS:
        raise serializers.ValidationError(f"At most {MAX_METADATA_KEYS} keys.")
    for key in value:
        # Keys skip the child field's checks: a NUL or a lone surrogate would reach PostgreSQL.
        if not 1 <= len(key) <= MAX_METADATA_KEY_LENGTH or not key.isprintable():
            raise serializers.ValidationError(
                f"Keys must be 1 to {MAX_METADATA_KEY_LENGTH} printable characters."
            )
    if len(json.dumps(value, ensure_ascii=False).encode()) > MAX_METADATA_BYTES:
        raise serializers.ValidationError(f"At most {MAX_METADATA_BYTES} bytes in all.")
    return value


def _reference_checked(value: str) -> str:
    if not value.strip():
        raise serializers.ValidationError("Must not be blank.")
    return value


def _field_copy(field: serializers.Field) -> serializers.Field:
    """A field of a serializer instance, made from its class's declared one.

    DRF deep-copies each declared field per serializer instance, and a field's deep copy runs
    its __init__ again (validators, error messages): 8 % of the web's CPU in a burst (py-spy).
    A declared field is a template never bound to a serializer; what a request's instance
    changes on its copy, bind() sets on the copy itself (name, parent, source, label), so a
    shallow copy is as separate. A field with a child field (already bound to the template) or
    a nested serializer keeps DRF's deep copy.
    """
    if isinstance(field, serializers.BaseSerializer) or "child" in vars(field):
        return copy.deepcopy(field)
    return copy.copy(field)


class ClosedSerializer(serializers.Serializer):
    """A JSON object body whose unknown fields are refused (SPEC 3), named in `fields`.

    An optional field declared `allow_null` and sent as `null` counts as not sent: the objects we
    answer say `null` for every absent value, and generated clients send `null` for an unset one.
    A field where `null` and absence would mean different things (a refund's amount: absent is
    "everything still refundable") is not declared `allow_null`, and `null` stays a 400.
    """

    def get_fields(self):
        return {name: _field_copy(field) for name, field in self._declared_fields.items()}

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError({"non_field_errors": ["The body must be a JSON object."]})
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        fields = self.fields
        return super().to_internal_value(
            {
                name: value
                for name, value in data.items()
                if value is not None or fields[name].required or not fields[name].allow_null
            }
        )


class OrderCreateSerializer(ClosedSerializer):
    amount = StrictIntegerField()
    currency = CurrencyField(max_length=3, min_length=3, trim_whitespace=False)
    reference = StrictCharField(max_length=64, min_length=1, trim_whitespace=False, validators=[_printable])
    callback_url = CallbackUrlField(
        max_length=2048, required=False, allow_null=True, allow_blank=False, trim_whitespace=False
    )
    description = StrictCharField(
        max_length=1000, required=False, allow_null=True, allow_blank=True, trim_whitespace=False
    )
    metadata = MetadataField(
        child=StrictCharField(allow_blank=True, trim_whitespace=False), required=False, allow_null=True
    )
    payment_method = PaymentMethodField(
        max_length=payment_methods.MAX_LENGTH,
        required=False,
        allow_null=True,
        allow_blank=False,
        trim_whitespace=False,
    )

    def validate_currency(self, value: str) -> str:
        code = iso_currency(value)
        if code is None:
            raise serializers.ValidationError("Not an ISO 4217 currency code.")
        return code

    def validate_reference(self, value: str) -> str:
        return _reference_checked(value)

    def validate_payment_method(self, value: str) -> str:
        if not payment_methods.is_valid(value):
            # The value itself is not echoed: it is the payer's token.
            raise serializers.ValidationError(
                "Must be a payment method token: `pm_` and letters, digits or _."
            )
        return value

    def validate_callback_url(self, value: str) -> str:
        # Syntax only: whether the URL is safe to call is the service's rule (callback_url_validate).
        try:
            serializers.URLField().run_validators(value)
        except serializers.ValidationError as exc:
            raise serializers.ValidationError("Must be a valid http(s) URL.") from exc
        return value

    def validate_metadata(self, value: dict) -> dict:
        return _metadata_checked(value)


class RefundCreateSerializer(ClosedSerializer):
    """SPEC 10: every field optional; no amount means everything still refundable."""

    # No order is over MAX_AMOUNT, so a refund over it exceeds what is refundable: the service
    # says so with its own code (SPEC 10). Bounded only where PostgreSQL's bigint ends.
    amount = StrictIntegerField(required=False, maximum=2**63 - 1)
    reason = StrictCharField(
        max_length=500, required=False, allow_null=True, allow_blank=True, trim_whitespace=False
    )
    reference = StrictCharField(
        max_length=64,
        min_length=1,
        required=False,
        allow_null=True,
        trim_whitespace=False,
        validators=[_printable],
    )
    metadata = MetadataField(
        child=StrictCharField(allow_blank=True, trim_whitespace=False), required=False, allow_null=True
    )

    def validate_reference(self, value: str) -> str:
        return _reference_checked(value)

    def validate_metadata(self, value: dict) -> dict:
        return _metadata_checked(value)


class OrderCreateSchema(OpenApiSerializerExtension):
    """Unknown fields are refused (SPEC 3): say so in the schema too."""

    target_class = OrderCreateSerializer

    def map_serializer(self, auto_schema, direction):
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        return {**schema, "additionalProperties": False}


class RefundCreateSchema(OrderCreateSchema):
    target_class = RefundCreateSerializer


class _BlankIsNullUrlField(serializers.URLField):
    """A URL column whose "" means none: answered as null, like every other absent value."""

    def to_representation(self, value: str) -> str | None:
        return value or None


@extend_schema_field({"type": "object", "additionalProperties": {"type": "string"}})
class _MetadataOut(serializers.JSONField):
    """The stored metadata as it is (a flat object of strings, checked when it came in); typed in
    the schema, where a model's JSONField would say nothing of its shape."""


class OrderSerializer(serializers.ModelSerializer):
    # "" in the row when neither the order nor its merchant has one (SPEC 6: completes at once)
    callback_url = _BlankIsNullUrlField(read_only=True, allow_null=True)
    metadata = _MetadataOut(read_only=True)

    class Meta:
        model = Order
        fields = (
            "id",
            "reference",
            "amount",
            "currency",
            "status",
            "outcome",
            "channel",
            "failure_code",
            "failure_message",
            "callback_url",
            "description",
            "metadata",
            "payment_method",
            "provider_reference",
            "amount_refunded",
            "created_at",
            "updated_at",
            "completed_at",
        )
        read_only_fields = fields


class RefundSerializer(serializers.ModelSerializer):
    class Meta:
        model = Refund
        fields = (
            "id",
            "order_id",
            "amount",
            "currency",
            "status",
            "reason",
            "reference",
            "metadata",
            "failure_code",
            "failure_message",
            "created_at",
            "updated_at",
        )
        read_only_fields = fields

    order_id = serializers.UUIDField(read_only=True)
    metadata = _MetadataOut(read_only=True)


@functools.cache
def _refund_serializer() -> RefundSerializer:
    return RefundSerializer()


def refund_representation(refund: Refund) -> dict:
    """The refund object of the API (SPEC 10): the create answer, the reads and callback bodies."""
    return _refund_serializer().to_representation(refund)


@functools.cache
def _order_serializer() -> OrderSerializer:
    # A ModelSerializer builds its fields from the model on first use, which costs more than
    # rendering an order; the fields hold no per-order state, so one instance serves every call.
    return OrderSerializer()


def order_representation(order: Order) -> dict:
    """The order object of the API (SPEC 3): the create answer, the detail and callback bodies."""
    return _order_serializer().to_representation(order)


class TransitionSerializer(serializers.Serializer):
    """One step of the lifecycle; `from` is a Python keyword, hence get_fields()."""

    to = serializers.CharField(source="to_status")
    at = serializers.DateTimeField(source="created_at")
    reason = serializers.CharField()
    channel = serializers.CharField(allow_null=True)

    def get_fields(self):
        fields = super().get_fields()
        return {"from": serializers.CharField(source="from_status", allow_null=True), **fields}


class OrderListQuerySerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=OrderStatus.values, required=False)
    outcome = serializers.ChoiceField(choices=Outcome.values, required=False)
    reference = serializers.CharField(max_length=64, required=False)
    created_after = serializers.DateTimeField(required=False)
    created_before = serializers.DateTimeField(required=False)
    limit = serializers.IntegerField(min_value=1, max_value=100, required=False)
    cursor = serializers.CharField(required=False)

    def to_internal_value(self, data):
        # DRF reads `?status=` from a query string as "not given"; a filter left empty is a
        # client bug that would silently return everything, so it is a 400 like any bad value.
        blank = sorted(name for name in self.fields if name in data and data.get(name) == "")
        if blank:
            raise serializers.ValidationError({name: ["Must not be empty."] for name in blank})
        # A query string may repeat a parameter; DRF would read the last copy and drop the rest
        # unseen (`?limit=[...]&limit=30.0` passed as 30), so a repeated filter is a 400 too.
        repeated = sorted(
            name for name in self.fields if len(getattr(data, "getlist", lambda _: [])(name)) > 1
        )
        if repeated:
            raise serializers.ValidationError({name: ["Give this parameter once."] for name in repeated})
        return super().to_internal_value(data)
