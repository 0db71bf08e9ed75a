"""POST /api/v1/orders: what is accepted, and every bad input answered 400/409/413/415 (SPEC 3, 7)."""

import itertools
import json

import pytest
from rest_framework.test import APIClient

from orders.models import IdempotencyKey, Order
from tests.database_down import database_restarting
from tests.factories import make_merchant

pytestmark = pytest.mark.django_db

URL = "/api/v1/orders"
_keys = itertools.count(1)
_MISSING = object()


def _body(**overrides) -> dict:
    body = {"amount": 1050, "currency": "USD", "reference": "inv-2041"}
    body.update(overrides)
    return {name: value for name, value in body.items() if value is not _MISSING}


def _post(api, body, *, key: str | None = None):
    return api.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY=key or f"key-{next(_keys)}")


def _post_raw(api, raw: bytes | str, *, content_type: str = "application/json"):
    return api.post(URL, raw, content_type=content_type, HTTP_IDEMPOTENCY_KEY=f"key-{next(_keys)}")


def _assert_error(response, status: int, *, field: str | None = None) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) <= {"code", "message", "fields"}
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if field is not None:
        assert field in error["fields"], error
    return error


def _assert_rejected(response, *, field: str | None = None) -> dict:
    error = _assert_error(response, 400, field=field)
    assert Order.objects.count() == 0
    assert IdempotencyKey.objects.count() == 0
    return error


# --- accepted input -------------------------------------------------------------------------


def test_valid_order_is_created_with_the_spec_representation(api, merchant_creds):
    # given
    body = _body(
        callback_url="https://merchant.example/hooks/pay",
        description="Two coffees",
        metadata={"cart": "77"},
    )
    # when
    response = _post(api, body)
    # then
    assert response.status_code == 201, response.content
    data = response.json()
    assert set(data) == {
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
    }
    assert data["payment_method"] is None
    assert data["provider_reference"] is None
    assert data["amount_refunded"] == 0
    assert data["amount"] == 1050
    assert data["currency"] == "USD"
    assert data["reference"] == "inv-2041"
    assert data["status"] == "pending"
    assert data["outcome"] is None
    assert data["channel"] is None
    assert data["completed_at"] is None
    assert data["callback_url"] == "https://merchant.example/hooks/pay"
    assert data["description"] == "Two coffees"
    assert data["metadata"] == {"cart": "77"}
    order = Order.objects.get(pk=data["id"])
    assert order.merchant_id == merchant_creds.merchant.id
    assert order.amount == 1050


@pytest.mark.parametrize("amount", [1, 10**12])
def test_amount_bounds_are_accepted(api, amount):
    response = _post(api, _body(amount=amount))

    assert response.status_code == 201, response.content
    assert response.json()["amount"] == amount
    assert Order.objects.get().amount == amount


def test_lower_case_currency_is_accepted_and_returned_upper_case(api):
    response = _post(api, _body(currency="eur"))

    assert response.status_code == 201, response.content
    assert response.json()["currency"] == "EUR"
    assert Order.objects.get().currency == "EUR"


@pytest.mark.parametrize(
    ("merchants", "shown"),
    [("https://merchant.example/default-hook", "https://merchant.example/default-hook"), ("", None)],
    ids=["the-merchants", "none-anywhere-is-null"],
)
def test_an_order_that_names_no_callback_url_takes_its_merchants(db, merchants, shown):
    # given a merchant with a callback URL or without one (then the order has none: null, as every
    # absent value is, not an empty string)
    creds = make_merchant(callback_url=merchants)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {creds.api_key}")
    # when
    response = _post(client, _body())
    # then
    assert response.status_code == 201, response.content
    assert response.json()["callback_url"] == shown
    assert client.get(f"{URL}/{response.json()['id']}").json()["callback_url"] == shown
    assert Order.objects.get().callback_url == merchants


def test_explicit_callback_url_wins_over_the_merchants(api):
    response = _post(api, _body(callback_url="https://merchant.example/own"))

    assert response.status_code == 201, response.content
    assert Order.objects.get().callback_url == "https://merchant.example/own"


def test_metadata_at_the_limits_is_accepted(api):
    metadata = {f"k{i}": "v" * 150 for i in range(20)}
    assert len(json.dumps(metadata).encode()) <= 4096

    response = _post(api, _body(metadata=metadata))

    assert response.status_code == 201, response.content
    assert response.json()["metadata"] == metadata


def test_null_for_an_optional_field_is_the_field_left_out(api, merchant_creds):
    # given an order whose optional fields are all sent as null, as generated clients send an unset
    # value (and as the order object answers an absent callback URL or payment method)
    nulls = {"callback_url": None, "description": None, "metadata": None, "payment_method": None}
    # when
    response = _post(api, _body(**nulls), key="nulls")
    # then it is the order without them: the merchant's callback URL, no description, no metadata
    assert response.status_code == 201, response.content
    order = Order.objects.get()
    merchants_url = merchant_creds.merchant.callback_url
    assert merchants_url
    assert (order.callback_url, order.description, order.metadata, order.payment_method) == (
        merchants_url,
        "",
        {},
        None,
    )
    assert {name: response.json()[name] for name in ("callback_url", "description", "metadata")} == {
        "callback_url": merchants_url,
        "description": "",
        "metadata": {},
    }
    # and the same request without the fields is a replay of it, not another body (422)
    replay = _post(api, _body(), key="nulls")
    assert replay.status_code == 201 and replay["Idempotent-Replayed"] == "true"
    assert replay.content == response.content


def test_reference_of_64_characters_is_accepted(api):
    response = _post(api, _body(reference="r" * 64))

    assert response.status_code == 201, response.content
    assert Order.objects.get().reference == "r" * 64


# --- amount -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "amount",
    [10.5, 10.0, "1050", True, False, None, 0, -1, -1050, 10**12 + 1, [1050], {"value": 1050}],
    ids=[
        "float",
        "float-integral",
        "string",
        "true",
        "false",
        "null",
        "zero",
        "minus-one",
        "negative",
        "over-max",
        "list",
        "object",
    ],
)
def test_bad_amount_is_rejected(api, amount):
    response = _post(api, _body(amount=amount))

    error = _assert_rejected(response, field="amount")
    assert error["code"] == "invalid_request"


def test_float_amount_written_as_10_point_0_in_raw_json_is_rejected(api):
    # format="json" would already send 10.0; this pins the exact bytes a client might send.
    response = _post_raw(api, b'{"amount": 10.0, "currency": "USD", "reference": "inv-1"}')

    _assert_rejected(response, field="amount")


def test_amount_in_exponent_notation_is_rejected(api):
    response = _post_raw(api, b'{"amount": 1e3, "currency": "USD", "reference": "inv-1"}')

    _assert_rejected(response, field="amount")


def test_missing_amount_is_rejected(api):
    response = _post(api, _body(amount=_MISSING))

    _assert_rejected(response, field="amount")


# --- currency -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "currency",
    [
        "XYZ",
        "US",
        "USDD",
        12,
        "",
        None,
        "U$D",
        " USD",
        "usd\n",
        True,
        "u\u017fd",
        "\u0131nr",
        "\uff35\uff33\uff24",
    ],
    ids=[
        "unknown",
        "short",
        "long",
        "number",
        "empty",
        "null",
        "symbol",
        "space",
        "newline",
        "bool",
        # letters that upper-case into ASCII (long s, dotless i) and full-width letters
        "long-s",
        "dotless-i",
        "full-width",
    ],
)
def test_bad_currency_is_rejected(api, currency):
    response = _post(api, _body(currency=currency))

    _assert_rejected(response, field="currency")


def test_missing_currency_is_rejected(api):
    _assert_rejected(_post(api, _body(currency=_MISSING)), field="currency")


# --- reference ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference",
    [
        _MISSING,
        "",
        "   ",
        "r" * 65,
        12345,
        None,
        ["inv"],
        "inv\n1",
        "inv\t1",
        "inv\x001",
        "inv\x1b1",
        "inv\u200b",
    ],
    ids=[
        "missing",
        "empty",
        "blank",
        "65-chars",
        "number",
        "null",
        "list",
        "newline",
        "tab",
        "nul",
        "escape",
        "zero-width-space",
    ],
)
def test_bad_reference_is_rejected(api, reference):
    response = _post(api, _body(reference=reference))

    _assert_rejected(response, field="reference")


def test_reference_reused_with_another_idempotency_key_is_409(api):
    # given
    first = _post(api, _body(reference="inv-dup"), key="key-a")
    assert first.status_code == 201, first.content
    # when
    second = _post(api, _body(reference="inv-dup", amount=2000), key="key-b")
    # then
    error = _assert_error(second, 409, field="reference")
    assert error["code"] == "duplicate_reference"
    assert Order.objects.count() == 1
    # The refused request did not keep its key: it may be used again for a new reference.
    assert not IdempotencyKey.objects.filter(key="key-b").exists()
    third = _post(api, _body(reference="inv-new"), key="key-b")
    assert third.status_code == 201, third.content


def test_same_reference_is_fine_for_another_merchant(api, other_api):
    first = _post(api, _body(reference="inv-shared"))
    second = _post(other_api, _body(reference="inv-shared"))

    assert first.status_code == 201, first.content
    assert second.status_code == 201, second.content
    assert first.json()["id"] != second.json()["id"]


# --- metadata -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        ["cart", "77"],
        "cart=77",
        42,
        {f"k{i}": "v" for i in range(21)},
        {"cart": 77},
        {"cart": True},
        {"cart": None},
        {"cart": {"id": "77"}},
        {"cart": ["77"]},
        {"a": "x" * 2100, "b": "y" * 2100},
        {"": "empty key"},
        {"k" * 41: "long key"},
        {"\x00": "nul key"},
        {"\ud800": "lone surrogate key"},
        {"cart": "7\x007"},
    ],
    ids=[
        "list",
        "string",
        "number",
        "21-keys",
        "int-value",
        "bool-value",
        "null-value",
        "nested-object",
        "nested-list",
        "over-4KiB",
        "empty-key",
        "long-key",
        "nul-key",
        "surrogate-key",
        "nul-value",
    ],
)
def test_bad_metadata_is_rejected(api, metadata):
    # json.dumps escapes a lone surrogate as \ud800, which is valid JSON text.
    raw = json.dumps(_body(metadata=metadata))

    response = _post_raw(api, raw)

    _assert_rejected(response, field="metadata")


# --- description, callback_url ------------------------------------------------------------


def test_description_too_long_is_rejected(api):
    response = _post(api, _body(description="d" * 1001))

    _assert_rejected(response, field="description")


def test_description_not_a_string_is_rejected(api):
    _assert_rejected(_post(api, _body(description=123)), field="description")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://merchant.example/hook",
        "javascript:alert(1)",
        "file:///etc/passwd",
        "merchant.example/hook",
        "https://user:secret@merchant.example/hook",
        "https://user@merchant.example/hook",
        "http://",
        "",
        42,
        "http://127.0.0.1:0/hook",
        "https://merchant.example/" + "p" * 2048,
    ],
    ids=[
        "ftp",
        "javascript",
        "file",
        "no-scheme",
        "userinfo",
        "user-only",
        "no-host",
        "empty",
        "number",
        "port-zero",
        "too-long",
    ],
)
def test_bad_callback_url_is_rejected(api, url):
    response = _post(api, _body(callback_url=url))

    _assert_rejected(response, field="callback_url")


PRIVATE_URLS = [
    "http://127.0.0.1/hook",
    "http://10.0.0.1/hook",
    "http://192.168.1.10:8080/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://0.0.0.0/hook",
    "http://224.0.0.1/hook",
    "http://2130706433/",
    "http://localhost/hook",
    "https://localhost:8443/hook",
]


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_private_callback_url_is_refused_in_production_mode(api, settings, url):
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = False

    response = _post(api, _body(callback_url=url))

    _assert_rejected(response, field="callback_url")


# http://2130706433/ is not in this list: it is refused as "not a valid URL" whatever the setting.
@pytest.mark.parametrize("url", [url for url in PRIVATE_URLS if "2130706433" not in url])
def test_private_callback_url_is_accepted_when_private_networks_are_allowed(api, settings, url):
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = True

    response = _post(api, _body(callback_url=url))

    assert response.status_code == 201, response.content
    assert response.json()["callback_url"] == url


# --- body shape, media type, size --------------------------------------------------------


def test_unknown_field_is_rejected_and_named(api):
    response = _post(api, _body(colour="blue", status="paid"))

    error = _assert_rejected(response, field="colour")
    assert "status" in error["fields"]


def test_malformed_json_is_rejected(api):
    error = _assert_rejected(_post_raw(api, b'{"amount": 1050, "currency": '))

    assert error["code"] == "malformed_json"


def test_invalid_utf8_is_rejected(api):
    _assert_rejected(_post_raw(api, b'{"amount": 1050, "currency": "\xff\xfe"}'))


def test_nan_is_rejected(api):
    _assert_rejected(_post_raw(api, b'{"amount": NaN, "currency": "USD", "reference": "r"}'))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"amount": 1, "amount": 100000, "currency": "USD", "reference": "r"}',
        b'{"amount": 1050, "currency": "USD", "reference": "r", "metadata": {"k": "a", "k": "b"}}',
    ],
    ids=["top-level", "nested"],
)
def test_a_key_given_twice_is_refused_not_read_one_way(api, raw):
    # which of the two a parser keeps is the parser's choice: a proxy may read the first, Python the last
    error = _assert_rejected(_post_raw(api, raw))

    assert error["code"] == "malformed_json"
    assert "more than once" in error["message"]
    assert Order.objects.count() == 0


def test_deeply_nested_json_is_a_400_not_a_500(api):
    response = _post_raw(api, "[" * 5000 + "]" * 5000)

    _assert_rejected(response)


@pytest.mark.parametrize("raw", ["[]", '[{"amount": 1050}]', "null", '"order"', "1050", ""])
def test_body_that_is_not_a_json_object_is_rejected(api, raw):
    _assert_rejected(_post_raw(api, raw))


def test_json_list_body_is_rejected_with_a_message(api):
    error = _assert_rejected(_post_raw(api, json.dumps([_body()])))

    assert "object" in error["message"]


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", "application/xml"]
)
def test_wrong_content_type_is_415(api, content_type):
    response = _post_raw(api, json.dumps(_body()), content_type=content_type)

    error = _assert_error(response, 415)
    assert error["code"] == "unsupported_media_type"
    assert Order.objects.count() == 0


def test_body_over_64_kib_is_413(api):
    # given: a body that would otherwise be valid JSON, just too big
    raw = json.dumps(_body(description="d" * (64 * 1024)))
    assert len(raw.encode()) > 64 * 1024
    # when
    response = _post_raw(api, raw)
    # then
    error = _assert_error(response, 413)
    assert error["code"] == "payload_too_large"
    assert Order.objects.count() == 0


def test_body_just_under_64_kib_is_not_413(api):
    raw = json.dumps(_body(description="d" * 1000, metadata={"pad": "p"}))
    raw = raw + " " * (64 * 1024 - len(raw.encode()))
    assert len(raw.encode()) == 64 * 1024

    response = _post_raw(api, raw)

    assert response.status_code == 201, response.content


def test_several_errors_are_reported_together(api):
    response = _post(api, {"amount": "1", "currency": "XYZ", "reference": ""})

    error = _assert_rejected(response)
    assert set(error["fields"]) == {"amount", "currency", "reference"}
    assert error["code"] == "invalid_request"


@pytest.mark.django_db
def test_a_create_while_the_database_restarts_is_a_503_to_retry_and_creates_nothing(api):
    with database_restarting():
        response = _post(api, _body(), key="restart-1")

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    assert response["Retry-After"] == "1"
    assert not Order.objects.exists() and not IdempotencyKey.objects.exists()
    # the merchant's retry with the same key, once it is back, creates the order
    assert _post(api, _body(), key="restart-1").status_code == 201
