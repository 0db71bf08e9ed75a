"""The order lifecycle as a Hypothesis state machine on the real database (SPEC 1, 5, 6, 9).

No workers: the rules call the stage services directly, in any order, repeated, late, with a
scripted provider (the one stub allowed: the provider adapter) and a real local HTTP endpoint for
callbacks answering scripted statuses. After every step, for every order: the status never goes
back, the outcome never changes once set, the transition log is a chain, the provider charged at
most one idempotency key per order (exactly one when paid), and a completed order has exactly one
delivered callback.
"""

import itertools
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from allocation.models import PaymentChannel
from allocation.services import order_allocate
from callbacks.models import CallbackDelivery
from callbacks.services import callback_deliver
from gateway.models import ChargeAttempt
from gateway.providers import base
from gateway.providers.base import ChargeOutcome, ChargeResult, StatusResult
from gateway.services import order_charge, order_confirm, order_poll
from orders.models import Order, OrderTransition
from orders.redis_client import get_redis
from orders.services import order_create, orders_sweep
from orders.transitions import RANK
from tests.factories import ChannelFactory, make_merchant

PROVIDER = "propstub"
CURRENCY = "SEK"  # only this test's channels take it


class ScriptedProvider(base.ProviderAdapter):
    """Honours idempotency keys like a real provider; each new charge answers as scripted.

    accepted: charged. rejected: refused, nothing charged. unknown_charged: timed out after the
    provider made the charge. unknown_lost: timed out, and the request never arrived.
    """

    name = PROVIDER

    def __init__(self) -> None:
        self.next_answer = "accepted"
        self.charges: dict[str, dict] = {}  # idempotency key -> {"order", "status"}

    def charge(self, *, channel, request):
        key = request.idempotency_key
        if key in self.charges:
            return ChargeResult(ChargeOutcome.ACCEPTED, provider_reference=f"ch_{key}", http_status=200)
        answer = self.next_answer
        if answer == "rejected":
            return ChargeResult(ChargeOutcome.REJECTED, http_status=503, error="channel_unavailable")
        if answer == "unknown_lost":
            return ChargeResult(ChargeOutcome.UNKNOWN, error="timeout")
        self.charges[key] = {"order": request.order_id, "status": "pending"}
        if answer == "unknown_charged":
            return ChargeResult(ChargeOutcome.UNKNOWN, error="timeout")
        return ChargeResult(ChargeOutcome.ACCEPTED, provider_reference=f"ch_{key}", http_status=201)

    def fetch_status(self, *, channel, idempotency_key):
        charge = self.charges.get(idempotency_key)
        return StatusResult("not_found") if charge is None else StatusResult(charge["status"])

    def parse_webhook(self, *, body, headers):
        raise base.InvalidWebhook("no webhooks here")

    def charged_keys(self, order_id) -> list[str]:
        return [key for key, charge in self.charges.items() if charge["order"] == str(order_id)]


class Endpoint:
    """The merchant's callback URL: answers the scripted status, records every request."""

    def __init__(self) -> None:
        self.status = 200
        self.received: list[tuple[str, int]] = []  # (webhook-id, status answered)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                endpoint.received.append((self.headers.get("webhook-id"), endpoint.status))
                self.send_response(endpoint.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def clear_circuits() -> None:
    PaymentChannel.objects.filter(code__startswith="prop-").update(circuit_open_until=None)
    for key in get_redis().scan_iter("circuit:prop-*"):
        get_redis().delete(key)


@pytest.fixture
def provider():
    adapter = ScriptedProvider()
    base.register(adapter)
    yield adapter
    base._adapters.pop(PROVIDER, None)
    clear_circuits()


@pytest.fixture
def endpoint():
    server = Endpoint()
    yield server
    server.close()


_references = itertools.count(1)


def make_machine(provider: ScriptedProvider, endpoint: Endpoint, merchant):
    class OrderLifecycle(RuleBasedStateMachine):
        orders = Bundle("orders")

        def __init__(self) -> None:
            super().__init__()
            provider.charges.clear()
            # Each example starts with closed circuits, so replaying an example replays it exactly.
            clear_circuits()
            self.seen_rank: dict[str, int] = {}
            self.seen_outcome: dict[str, str | None] = {}

        @initialize(target=orders, amount=st.integers(min_value=1, max_value=10**6))
        def first_order(self, amount):
            return self._create(amount)

        @precondition(lambda self: len(self.seen_rank) < 3)
        @rule(target=orders, amount=st.integers(min_value=1, max_value=10**6))
        def create(self, amount):
            return self._create(amount)

        def _create(self, amount: int) -> str:
            reference = f"prop-{next(_references)}"
            result = order_create(
                merchant=merchant,
                idempotency_key=reference,
                data={
                    "amount": amount,
                    "currency": CURRENCY,
                    "reference": reference,
                    "callback_url": endpoint.url,
                },
            )
            order_id = result.body["id"]
            self.seen_rank[order_id] = RANK["pending"]
            self.seen_outcome[order_id] = None
            return order_id

        @rule(order_id=orders, data=st.data())
        def advance(self, order_id, data):
            """The next step of the happy path (or of the failed one), whatever the order's stage."""
            status = Order.objects.values_list("status", flat=True).get(pk=order_id)
            if status == "pending":
                self.allocate(order_id)
            elif status == "assigned":
                self.charge(order_id, data.draw(st.sampled_from(["accepted", "unknown_charged"])))
            elif status == "processing":
                self.provider_webhook(order_id, data.draw(st.sampled_from(["paid", "failed"])), data)
            elif status in ("paid", "failed"):
                self.callback(order_id, 200)

        @rule(order_id=orders, data=st.data())
        def advance_again(self, order_id, data):
            self.advance(order_id, data)

        @rule(order_id=orders)
        def allocate(self, order_id):
            order_allocate(order_id=order_id)

        @rule(
            order_id=orders,
            answer=st.sampled_from(["accepted", "accepted", "rejected", "unknown_charged", "unknown_lost"]),
        )
        def charge(self, order_id, answer):
            provider.next_answer = answer
            order_charge(order_id=order_id)

        @rule(order_id=orders, status=st.sampled_from(["paid", "failed"]), data=st.data())
        def provider_webhook(self, order_id, status, data):
            """The provider's final word on a charge it made: first time, duplicate, or late."""
            keys = provider.charged_keys(order_id)
            if not keys:
                return
            key = data.draw(st.sampled_from(keys))
            charge = provider.charges[key]
            if charge["status"] == "pending":
                charge["status"] = status  # the provider's truth is its first word
            elif Order.objects.filter(pk=order_id, outcome__isnull=True).exists():
                # Until the order has its outcome, the provider's webhooks tell its truth (settled
                # silently or not); only late ones may contradict it (sandbox row 81).
                status = charge["status"]
            order_confirm(
                order_id=order_id,
                idempotency_key=key,
                status=status,
                failure_code="card_declined" if status == "failed" else "",
                source="property webhook",
            )

        @rule(order_id=orders, status=st.sampled_from(["paid", "failed"]))
        def provider_settles_silently(self, order_id, status):
            for key in provider.charged_keys(order_id):
                if provider.charges[key]["status"] == "pending":
                    provider.charges[key]["status"] = status

        @rule(order_id=orders)
        def poll(self, order_id):
            order_poll(order_id=order_id)

        @rule(order_id=orders, answer=st.sampled_from([200, 204, 500, 503, 302]))
        def callback(self, order_id, answer):
            endpoint.status = answer
            # the retry is due (the schedule's wait, skipped)
            CallbackDelivery.objects.filter(order_id=order_id, status="pending").update(
                next_attempt_at=timezone.now() - timedelta(seconds=1)
            )
            callback_deliver(order_id=order_id)

        @rule()
        def sweep(self):
            Order.objects.filter(next_check_at__isnull=False).update(
                next_check_at=timezone.now() - timedelta(seconds=1)
            )
            orders_sweep(batch=500)

        @invariant()
        def every_order_is_consistent(self):
            for order_id in self.seen_rank:
                order = Order.objects.get(pk=order_id)
                # never backwards, outcome fixed once known
                assert RANK[order.status] >= self.seen_rank[order_id], (
                    order.status,
                    self.seen_rank[order_id],
                )
                self.seen_rank[order_id] = RANK[order.status]
                if self.seen_outcome[order_id] is not None:
                    assert order.outcome == self.seen_outcome[order_id]
                self.seen_outcome[order_id] = order.outcome
                if order.status in ("paid", "failed", "completed"):
                    assert order.outcome in ("paid", "failed")
                else:
                    assert order.outcome is None
                # the log is a chain from creation to where the order is
                steps = list(
                    OrderTransition.objects.filter(order_id=order_id)
                    .order_by("id")
                    .values_list("from_status", "to_status", "channel")
                )
                assert steps[0][:2] == (None, "pending")
                for previous, step in itertools.pairwise(steps):
                    assert step[0] == previous[1]
                    assert RANK[step[1]] >= RANK[previous[1]]
                assert steps[-1][1] == order.status
                assert steps[-1][2] == order.channel
                assert sum(1 for s in steps if s[1] == "paid") <= 1
                assert sum(1 for s in steps if s[1] == "completed") <= 1
                # at most one charge per order at the provider; exactly one, and paid, when paid
                charged = provider.charged_keys(order_id)
                assert len(charged) <= 1, charged
                if order.outcome == "paid":
                    assert len(charged) == 1
                    assert provider.charges[charged[0]]["status"] == "paid"
                    attempt = ChargeAttempt.objects.get(idempotency_key=charged[0])
                    assert attempt.channel == order.channel
                # a completed order: exactly one delivered callback, which the endpoint took
                delivered = list(
                    CallbackDelivery.objects.filter(order_id=order_id, status="delivered").values_list(
                        "webhook_id", flat=True
                    )
                )
                if order.status == "completed":
                    assert len(delivered) == 1
                    assert any(
                        webhook_id == delivered[0] and 200 <= code < 300
                        for webhook_id, code in endpoint.received
                    )
                else:
                    assert delivered == []

    return OrderLifecycle


@pytest.mark.django_db
def test_order_lifecycle_state_machine(provider, endpoint):
    # given two channels of the scripted provider and a merchant
    ChannelFactory(code="prop-1", provider=PROVIDER, currencies=[CURRENCY], priority=1)
    ChannelFactory(code="prop-2", provider=PROVIDER, currencies=[CURRENCY], priority=2)
    merchant = make_merchant(callback_url=endpoint.url).merchant
    # when / then: any sequence of stage calls keeps every invariant after every step
    run_state_machine_as_test(
        make_machine(provider, endpoint, merchant),
        settings=settings(
            max_examples=50,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
