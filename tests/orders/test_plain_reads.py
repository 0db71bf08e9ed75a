"""The stages' plain SELECTs (core/rows.py) make the instances the ORM would: same values, same
types, each field's conversion from the database applied."""

import pytest
from django.db.models import Model

from core import rows
from orders.models import Merchant, Order
from orders.selectors import order_fields, order_with_merchant
from orders.serializers import order_representation
from orders.services import merchant_signing_secrets
from tests.factories import OrderFactory, make_merchant

pytestmark = pytest.mark.django_db


def _values(instance: Model) -> dict:
    return {field.attname: getattr(instance, field.attname) for field in type(instance)._meta.concrete_fields}


def _order() -> Order:
    merchant = make_merchant(callback_url="https://merchant.example/hooks").merchant
    return OrderFactory(
        merchant=merchant,
        metadata={"cart": [1, 2], "note": "ünïcode"},
        description="two items",
        payment_method="pm_card_visa",
    )


def test_the_order_with_its_merchant_is_the_orms():
    order = _order()
    expected = Order.objects.select_related("merchant").get(pk=order.pk)

    got = order_with_merchant(order_id=order.pk)

    assert _values(got) == _values(expected)
    assert _values(got.merchant) == _values(expected.merchant)
    assert got.metadata == {"cart": [1, 2], "note": "ünïcode"}  # JSON decoded, not its text
    # what the callback builds from it: the body and the signing secrets
    assert order_representation(got) == order_representation(expected)
    assert merchant_signing_secrets(merchant=got.merchant) == merchant_signing_secrets(
        merchant=expected.merchant
    )
    assert not got._state.adding and got.merchant._state.db == "default"


def test_a_missing_order_reads_as_none():
    assert order_with_merchant(order_id="00000000-0000-7000-8000-000000000000") is None
    assert order_fields(order_id="00000000-0000-7000-8000-000000000000", fields=("id",)) is None


def test_only_the_fields_asked_for_are_loaded_whatever_their_order():
    order = _order()

    got = order_fields(order_id=order.pk, fields=("status", "metadata", "id", "amount"))

    assert (got.pk, got.status, got.amount, got.metadata) == (order.pk, "pending", 1050, order.metadata)
    assert got.get_deferred_fields() == {field.attname for field in Order._meta.concrete_fields} - {
        "id",
        "status",
        "metadata",
        "amount",
    }


def test_a_column_the_model_does_not_have_is_refused():
    with pytest.raises(ValueError, match="no column"):
        rows.select_list(Merchant, ("id", "password"))
