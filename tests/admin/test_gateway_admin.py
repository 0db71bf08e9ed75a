"""Charge attempts and provider webhooks in the console: read-only lists, filters, exact search."""

import pytest

from gateway.models import ProviderWebhook
from orders.models import OrderStatus
from tests.admin.factories import ChargeAttemptFactory

pytestmark = pytest.mark.django_db

ATTEMPTS = "/admin/gateway/chargeattempt/"
WEBHOOKS = "/admin/gateway/providerwebhook/"


def test_charge_attempts_list_filters_and_search(operator, make_order):
    order = make_order(OrderStatus.PROCESSING)
    rejected = ChargeAttemptFactory(channel="other", status="rejected", provider_reference="pr-9")

    response = operator.get(ATTEMPTS)
    assert response.status_code == 200
    assert len(response.context["cl"].result_list) == 2

    def codes(**params):
        return [a.channel for a in operator.get(ATTEMPTS, params).context["cl"].result_list]

    assert codes(status__exact="rejected") == ["other"]
    assert codes(channel="fake-a") == ["fake-a"]
    assert codes(provider="sandbox") == ["other"]
    assert codes(q="pr-9") == ["other"]
    assert codes(q=str(order.pk)) == ["fake-a"]
    page = operator.get(f"{ATTEMPTS}{rejected.pk}/change/")
    assert page.status_code == 200 and "pr-9" in page.content.decode()


def test_provider_webhooks_list_and_page(operator, make_order):
    order = make_order(OrderStatus.PROCESSING)
    webhook = ProviderWebhook.objects.create(
        provider="sandbox",
        webhook_id="wh_1",
        order=order,
        event_type="charge.failed",
        idempotency_key="ord-key-1",
        status="failed",
        failure_code="card_declined",
        payload={"status": "failed"},
    )

    assert [w.pk for w in operator.get(WEBHOOKS, {"q": "wh_1"}).context["cl"].result_list] == [webhook.pk]
    assert [w.pk for w in operator.get(WEBHOOKS, {"q": str(order.pk)}).context["cl"].result_list] == [
        webhook.pk
    ]
    listing = operator.get(WEBHOOKS).content.decode()
    # The word it carried shows in the list and on its page, not only inside the payload.
    assert '<td class="field-status">failed</td>' in listing
    assert '<td class="field-failure_code">card_declined</td>' in listing
    assert operator.get(WEBHOOKS, {"event_type": "charge.failed"}).status_code == 200
    page = operator.get(f"{WEBHOOKS}{webhook.pk}/change/").content.decode()
    assert "&quot;status&quot;: &quot;failed&quot;" in page
    assert "ord-key-1" in page and "card_declined" in page
