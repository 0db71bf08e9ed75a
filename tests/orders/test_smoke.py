import pytest

pytestmark = pytest.mark.django_db(transaction=True)


def test_create_and_read_back(api):
    # given
    body = {"amount": 1050, "currency": "usd", "reference": "inv-1"}
    # when
    created = api.post("/api/v1/orders", body, format="json", HTTP_IDEMPOTENCY_KEY="k1")
    # then
    assert created.status_code == 201, created.content
    assert created.json()["currency"] == "USD"
    assert created.json()["status"] == "pending"
    got = api.get(f"/api/v1/orders/{created.json()['id']}")
    assert got.status_code == 200
    assert got.json() == created.json()
    events = api.get(f"/api/v1/orders/{created.json()['id']}/events").json()
    assert events[0]["from"] is None and events[0]["to"] == "pending"
