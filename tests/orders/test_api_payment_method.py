"""The order API's payment method and provider reference (SPEC 11)."""

import logging

import pytest
from rest_framework.test import APIClient

from orders.models import Order

URL = "/api/v1/orders"
TOKEN = "pm_card_chargeCustomerFail"


def _post(api, **fields):
    body = {"amount": 1050, "currency": "USD", "reference": "inv-pm", **fields}
    return api.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY="key-pm")


@pytest.mark.django_db
def test_a_pm_token_is_taken_and_shown_with_a_null_provider_reference(api, caplog):
    caplog.set_level(logging.INFO)
    response = _post(api, payment_method=TOKEN)
    assert response.status_code == 201, response.content
    data = response.json()
    assert (data["payment_method"], data["provider_reference"]) == (TOKEN, None)
    assert Order.objects.get(pk=data["id"]).payment_method == TOKEN
    # logged, but never in full
    created = [r for r in caplog.records if r.getMessage() == "order.created"]
    assert created and created[0].payment_method == "pm_…Fail"
    assert not any(TOKEN in str(vars(record)) for record in caplog.records)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "token",
    ["", "card_visa", "tok_visa", "pm_", "pm_card visa", "pm_card-visa", "pm_\x00", 42, ["pm_x"],
     "pm_" + "x" * 201],
)  # fmt: skip
def test_a_payment_method_that_is_not_a_pm_token_is_400_and_not_echoed(api, token):
    response = _post(api, payment_method=token)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert "payment_method" in error["fields"]
    if isinstance(token, str) and len(token) > 3:
        assert token not in response.content.decode()
    assert Order.objects.count() == 0


@pytest.mark.django_db
def test_the_openapi_schema_names_both_fields():
    schema = APIClient().get("/api/schema/", HTTP_ACCEPT="application/json").json()
    components = schema["components"]["schemas"]
    assert components["OrderCreateRequest"]["properties"]["payment_method"]["pattern"].startswith("^pm_")
    assert {"payment_method", "provider_reference"} <= set(components["Order"]["properties"])
