"""The order lifecycle as a Hypothesis state machine on the real database (SPEC 1, 5, 6, 8, 9).

No workers: the rules call the stage task bodies in any order, repeated, late, two copies at once
in threads, with a scripted provider (the one stub allowed: the provider adapter) whose webhooks
are signed and go through our real webhook endpoint and its duplicate filter, and a real local
HTTP endpoint for callbacks that answers scripted statuses, resets the connection, or is too slow.
Channels differ per example (currencies, caps, amount bounds); orders come in two currencies.

Time moves through the real due times (tests/properties/pipeline.py: a virtual clock that moves
every stored instant back, and beat run at each due time), so the sweep's backoff spacing and its
give-up rule happen as they would. Safety after every step, for every order: the status never goes
back, the outcome never changes once set, the transition log is a chain, the provider charged at
most one idempotency key per order (exactly one, paid, when paid; none that is not failed when
failed), a completed order has exactly one delivered callback, and an unfinished order has a due
time unless it needs a person. Liveness at the end of every example: the provider settles, the
receiver recovers, time runs until nothing is due; every order that did not already need a person
then is completed, and every order that is not completed is one the console shows as needing one
(orders_stuck: the sweep gave up on it).
"""

import base64
import itertools
import json
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.conf import settings as django_settings
from django.db import connections
from django.test import Client
from django.urls import reverse
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
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from allocation.models import ChannelDailyVolume, PaymentChannel
from callbacks.models import CallbackDelivery
from config.celery_app import app as celery_app
from core.redis import get_redis
from gateway.models import ChargeAttempt
from gateway.providers import base
from gateway.providers.base import ChargeOutcome, ChargeResult, StatusResult, WebhookEvent
from orders.events import MAX_SWEEP_CHECKS
from orders.models import Order, OrderTransition
from orders.selectors import orders_stuck
from orders.services import order_create
from orders.transitions import RANK
from tests.factories import ChannelFactory, make_merchant
from tests.properties.pipeline import Pipeline, VirtualClock

PROVIDER = "propstub"
CURRENCIES = ("SEK", "NOK")  # only this test's channels take them
CHANNELS = ("prop-1", "prop-2", "prop-3")
SECRET = "whsec_" + base64.b64encode(b"property-machine-webhook-secret!").decode()
CALLBACK_TOTAL_TIMEOUT = 0.4  # the slow receiver answers after twice this
QUEUES = ("allocation", "gateway", "callbacks", "orders")
REACHED: Counter[str] = Counter()  # rules the examples reached, across one run


class ScriptedProvider(base.ProviderAdapter):
    """Honours idempotency keys like a real provider; each new charge answers as scripted.

    accepted: charged. rejected: refused, nothing charged. unknown_charged: timed out after the
    provider made the charge. unknown_lost: timed out, and the request never arrived. Its webhooks
    are Standard Webhooks signed with SECRET, verified here as a real adapter does.
    """

    name = PROVIDER

    def __init__(self) -> None:
        self.next_answer = "accepted"
        self.settles_when_asked = False  # the provider's final word arrives at last (liveness)
        self.charges: dict[str, dict] = {}  # idempotency key -> {"order", "channel", "status"}
        self.lock = threading.Lock()

    def charge(self, *, channel, request):
        time.sleep(0.002)  # a provider takes a moment: copies running at once overlap here
        key = request.idempotency_key
        with self.lock:
            if key in self.charges:
                return ChargeResult(ChargeOutcome.ACCEPTED, provider_reference=f"ch_{key}", http_status=200)
            answer = self.next_answer
            if answer == "rejected":
                return ChargeResult(ChargeOutcome.REJECTED, http_status=503, error="channel_unavailable")
            if answer == "unknown_lost":
                return ChargeResult(ChargeOutcome.UNKNOWN, error="timeout")
            self.charges[key] = {"order": request.order_id, "channel": channel.code, "status": "pending"}
        if answer == "unknown_charged":
            return ChargeResult(ChargeOutcome.UNKNOWN, error="timeout")
        return ChargeResult(ChargeOutcome.ACCEPTED, provider_reference=f"ch_{key}", http_status=201)

    def fetch_status(self, *, channel, idempotency_key, provider_reference=""):
        with self.lock:
            charge = self.charges.get(idempotency_key)
            if charge is None:
                return StatusResult("not_found")
            if self.settles_when_asked and charge["status"] == "pending":
                charge["status"] = "paid"
            return StatusResult(charge["status"])

    def parse_webhook(self, *, body, headers):
        try:
            Webhook(SECRET).verify(body, headers)
        except (WebhookVerificationError, ValueError) as exc:
            raise base.InvalidWebhook(str(exc)) from exc
        event = json.loads(body)
        data = event["data"]
        return WebhookEvent(
            webhook_id={k.lower(): v for k, v in headers.items()}["webhook-id"],
            event_type=event["type"],
            status=data["status"],
            order_id=data["order_id"],
            idempotency_key=data["idempotency_key"],
            channel=data["channel"],
            failure_code=data.get("failure_code") or "",
            provider_reference=f"ch_{data['idempotency_key']}",
            payload=event,
        )

    def charged_keys(self, order_id) -> list[str]:
        with self.lock:
            return [key for key, charge in self.charges.items() if charge["order"] == str(order_id)]


class Endpoint:
    """The merchant's callback URL: answers as scripted (a status, "reset": drops the connection,
    "slow": answers after twice the callback timeout), records every request."""

    def __init__(self) -> None:
        self.mode: int | str = 200
        self.received: list[tuple[str, int | str]] = []  # (webhook-id, what it answered)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                mode = endpoint.mode
                endpoint.received.append((self.headers.get("webhook-id"), mode))
                if mode == "reset":
                    self.close_connection = True
                    return
                if mode == "slow":
                    time.sleep(CALLBACK_TOTAL_TIMEOUT * 2)
                    mode = 200
                self.send_response(mode)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def took(self, webhook_id: str) -> bool:
        return any(w == webhook_id and isinstance(m, int) and 200 <= m < 300 for w, m in self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def clear_circuits() -> None:
    PaymentChannel.objects.filter(code__startswith="prop-").update(circuit_open_until=None)
    for key in get_redis().scan_iter("circuit:prop-*"):
        get_redis().delete(key)


@pytest.fixture
def provider(settings):
    settings.CALLBACK_TOTAL_TIMEOUT = CALLBACK_TOTAL_TIMEOUT
    adapter = ScriptedProvider()
    base.register(adapter)
    yield adapter
    base._adapters.pop(PROVIDER, None)
    clear_circuits()
    # No workers here: drop what the committed transitions published to the broker.
    for key in QUEUES:
        get_redis().delete(key)


@pytest.fixture
def endpoint():
    server = Endpoint()
    yield server
    server.close()


_references = itertools.count(1)
STAGES = {
    "allocate": "allocation.allocate",
    "charge": "gateway.charge",
    "poll": "gateway.poll",
    "callback": "callbacks.callback",
}
CAPS = st.sampled_from([None, None, 5_000, 20_000])
MAX_AMOUNTS = st.sampled_from([None, 3_000, 8_000])
AMOUNTS = st.one_of(st.integers(1, 100), st.integers(100, 10_000))


def limit_of(status: str) -> int:
    """The sweep's give-up rule (orders/services.py orders_sweep): checks before it stops."""
    return django_settings.POLL_MAX_COUNT if status == "processing" else MAX_SWEEP_CHECKS


def make_machine(provider: ScriptedProvider, endpoint: Endpoint, merchant):
    class OrderLifecycle(RuleBasedStateMachine):
        orders = Bundle("orders")

        def __init__(self) -> None:
            super().__init__()
            with provider.lock:
                provider.charges.clear()
            provider.next_answer = "accepted"
            provider.settles_when_asked = False
            endpoint.mode = 200
            # Each example starts alone: closed circuits, empty caps, earlier examples' orders
            # no longer due (so replaying an example replays it exactly).
            clear_circuits()
            ChannelDailyVolume.objects.filter(channel__code__startswith="prop-").delete()
            Order.objects.filter(merchant=merchant).update(next_check_at=None)
            self.seen_rank: dict[str, int] = {}
            self.seen_outcome: dict[str, str | None] = {}
            self.sent_webhooks: list[tuple[str, bytes]] = []  # (webhook-id, body) as the provider sent
            self.web = Client()
            self.pipeline = Pipeline()
            self.clock = VirtualClock("prop-")

        @initialize(
            target=orders,
            caps=st.tuples(CAPS, CAPS),
            max_amount=MAX_AMOUNTS,
            third=st.booleans(),
            amount=AMOUNTS,
            currency=st.sampled_from(CURRENCIES),
        )
        def channels_and_first_order(self, caps, max_amount, third, amount, currency):
            """Channels that differ: prop-1 takes both currencies under a cap, prop-2 only SEK up
            to a maximum amount, prop-3 (when enabled) only NOK from 50 up."""
            PaymentChannel.objects.filter(code="prop-1").update(daily_cap=caps[0])
            PaymentChannel.objects.filter(code="prop-2").update(daily_cap=caps[1], max_amount=max_amount)
            PaymentChannel.objects.filter(code="prop-3").update(enabled=third)
            return self._create(amount, currency)

        @precondition(lambda self: len(self.seen_rank) < 3)
        @rule(target=orders, amount=AMOUNTS, currency=st.sampled_from(CURRENCIES))
        def create(self, amount, currency):
            return self._create(amount, currency)

        def _create(self, amount: int, currency: str) -> str:
            reference = f"prop-{uuid.uuid4().hex[:8]}-{next(_references)}"
            result = order_create(
                merchant=merchant,
                idempotency_key=reference,
                fingerprint=reference,
                reference=reference,
                amount=amount,
                currency=currency,
                callback_url=endpoint.url,
            )
            order_id = result.body["id"]
            self.seen_rank[order_id] = RANK["pending"]
            self.seen_outcome[order_id] = None
            return order_id

        def _stage(self, stage: str, order_id: str) -> None:
            celery_app.tasks[STAGES[stage]].run({"order_id": order_id})

        @rule(order_id=orders, data=st.data())
        def advance(self, order_id, data):
            """The next step of the happy path (or of the failed one), whatever the order's stage."""
            status = Order.objects.values_list("status", flat=True).get(pk=order_id)
            if status == "pending":
                self._stage("allocate", order_id)
            elif status == "assigned":
                self.charge(order_id, data.draw(st.sampled_from(["accepted", "unknown_charged"])))
            elif status == "processing":
                self.provider_webhook(order_id, data.draw(st.sampled_from(["paid", "failed"])), data)
            elif status in ("paid", "failed"):
                self.time_passes()

        @rule(order_id=orders)
        def allocate(self, order_id):
            self._stage("allocate", order_id)

        @rule(
            order_id=orders,
            answer=st.sampled_from(["accepted", "accepted", "rejected", "unknown_charged", "unknown_lost"]),
        )
        def charge(self, order_id, answer):
            provider.next_answer = answer
            self._stage("charge", order_id)

        @rule(
            order_id=orders,
            stage=st.sampled_from(sorted(STAGES)),
            answer=st.sampled_from(["accepted", "rejected", "unknown_charged"]),
        )
        def two_copies_at_once(self, order_id, stage, answer):
            """A duplicated delivery whose two copies run at the same time, in two workers."""
            provider.next_answer = answer
            barrier = threading.Barrier(2)
            errors: list[BaseException] = []

            def copy() -> None:
                try:
                    barrier.wait(10)
                    self._stage(stage, order_id)
                except BaseException as exc:
                    errors.append(exc)
                finally:
                    connections.close_all()

            threads = [threading.Thread(target=copy) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not any(thread.is_alive() for thread in threads), "a copy did not finish"
            if errors:
                raise errors[0]
            REACHED[f"two copies of {stage}"] += 1

        @rule(order_id=orders, status=st.sampled_from(["paid", "failed"]), data=st.data())
        def provider_webhook(self, order_id, status, data):
            """The provider's final word on a charge it made, through our signed endpoint."""
            keys = provider.charged_keys(order_id)
            if not keys:
                return
            key = data.draw(st.sampled_from(keys))
            with provider.lock:
                charge = provider.charges[key]
                if charge["status"] == "pending":
                    charge["status"] = status  # the provider's truth is its first word
                elif Order.objects.filter(pk=order_id, outcome__isnull=True).exists():
                    # Until the order has its outcome, the provider's webhooks tell its truth
                    # (settled silently or not); only late ones may contradict it (sandbox row 81).
                    status = charge["status"]
                channel = charge["channel"]
            body = json.dumps(
                {
                    "type": f"charge.{status}",
                    "data": {
                        "order_id": str(order_id),
                        "idempotency_key": key,
                        "channel": channel,
                        "status": status,
                        "failure_code": "card_declined" if status == "failed" else "",
                    },
                }
            ).encode()
            self._post_webhook(f"msg_{uuid.uuid4().hex}", body, data)

        @precondition(lambda self: self.sent_webhooks)
        @rule(data=st.data())
        def provider_resends_a_webhook(self, data):
            """The provider sends one of its webhooks again (same id): our filter drops it."""
            webhook_id, body = data.draw(st.sampled_from(self.sent_webhooks))
            self._post_webhook(webhook_id, body, data)

        def _post_webhook(self, webhook_id: str, body: bytes, data) -> None:
            # One moment for the signature and its header: two clock reads may straddle a second.
            now = datetime.now(UTC)
            signature = Webhook(SECRET).sign(webhook_id, now, body.decode())
            response = self.web.post(
                reverse("provider-webhook", kwargs={"provider": PROVIDER}),
                data=body,
                content_type="application/json",
                HTTP_WEBHOOK_ID=webhook_id,
                HTTP_WEBHOOK_TIMESTAMP=str(int(now.timestamp())),
                HTTP_WEBHOOK_SIGNATURE=signature,
            )
            assert response.status_code == 200, response.content
            self.sent_webhooks.append((webhook_id, body))
            # what our endpoint hands to the confirm task; a duplicate may still reach it twice
            # (a redelivered task message)
            if not response.json()["duplicate"] or data.draw(st.booleans()):
                event = json.loads(body)["data"]
                celery_app.tasks["gateway.confirm"].run(
                    {**event, "webhook_id": webhook_id, "provider": PROVIDER}
                )
            else:
                REACHED["duplicate webhook filtered"] += 1

        @rule(order_id=orders, status=st.sampled_from(["paid", "failed"]))
        def provider_settles_silently(self, order_id, status):
            with provider.lock:
                for charge in provider.charges.values():
                    if charge["order"] == str(order_id) and charge["status"] == "pending":
                        charge["status"] = status

        @rule(order_id=orders)
        def poll(self, order_id):
            self._stage("poll", order_id)

        @rule(order_id=orders, answer=st.sampled_from([200, 204, 500, 503, 302, "reset", "slow"]))
        def callback(self, order_id, answer):
            """The receiver changes its mind, and the callback stage is delivered (again)."""
            endpoint.mode = answer
            self._stage("callback", order_id)

        @rule()
        def events_delivered(self):
            self.pipeline.deliver_events(list(self.seen_rank))

        @rule()
        def time_passes(self):
            """Time moves to the next real due time; beat runs then."""
            if self.clock.advance_to_next_due(list(self.seen_rank)):
                self.pipeline.beat(list(self.seen_rank))

        @rule()
        def a_quiet_while(self):
            """Only time passes, through the next three due times: the provider and the receiver
            keep answering as they do now, so the sweep backs off (and may give up) on what is stuck."""
            for _ in range(3):
                self.time_passes()

        def needs_a_person(self) -> set[str]:
            """What the console lists: orders the sweep gave up on, and exhausted callbacks."""
            stuck = {
                str(s.order.pk)
                for s in orders_stuck(overdue_before=timezone.now() - timedelta(days=3650), limit=10_000)
            }
            exhausted = {
                str(pk)
                for pk in CallbackDelivery.objects.filter(status="exhausted").values_list(
                    "order_id", flat=True
                )
            }
            return (stuck | exhausted) & set(self.seen_rank)

        @invariant()
        def every_order_is_consistent(self):
            stuck = None
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
                # an unfinished order has a due time, unless the sweep gave up on it by its rule
                # and the console lists it as needing a person
                if order.status != "completed" and order.next_check_at is None:
                    assert order.check_count >= limit_of(order.status), (order.status, order.check_count)
                    stuck = self.needs_a_person() if stuck is None else stuck
                    assert order_id in stuck
                    REACHED["sweep gave up"] += 1
                if order.check_count >= 2:
                    REACHED["sweep backed off"] += 1
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
                # at most one charge per order at the provider; exactly one, and paid, when paid;
                # none that is (or may still become) paid when failed
                charged = provider.charged_keys(order_id)
                assert len(charged) <= 1, charged
                truths = [provider.charges[key]["status"] for key in charged]
                if order.outcome == "paid":
                    assert truths == ["paid"]
                    attempt = ChargeAttempt.objects.get(idempotency_key=charged[0])
                    assert attempt.channel == order.channel
                if order.outcome == "failed":
                    assert all(truth == "failed" for truth in truths), truths
                # a completed order: exactly one delivered callback, which the endpoint took
                delivered = list(
                    CallbackDelivery.objects.filter(order_id=order_id, status="delivered").values_list(
                        "webhook_id", flat=True
                    )
                )
                if order.status == "completed":
                    assert len(delivered) == 1
                    assert endpoint.took(delivered[0])
                else:
                    assert delivered == []

        def teardown(self):
            """Liveness: the world heals, time runs until nothing is due, every order finishes."""
            order_ids = list(self.seen_rank)
            already = self.needs_a_person()
            provider.next_answer = "accepted"
            provider.settles_when_asked = True
            endpoint.mode = 200
            for _ in range(400):
                self.pipeline.deliver_events(order_ids)
                if not self.clock.advance_to_next_due(order_ids):
                    break
                self.pipeline.beat(order_ids)
                self.every_order_is_consistent()
            else:
                raise AssertionError("still something due after 400 due times: the pipeline does not settle")
            unfinished = {
                str(pk): status
                for pk, status in Order.objects.filter(pk__in=order_ids)
                .exclude(status="completed")
                .values_list("pk", "status")
            }
            # every order not needing a person when the world healed is completed now
            assert set(unfinished) <= already, (unfinished, already)
            # and what is left is on the console's list
            assert set(unfinished) <= self.needs_a_person()
            REACHED["examples finished"] += 1
            REACHED["orders left to a person"] += len(unfinished)

    return OrderLifecycle


def lifecycle(provider, endpoint):
    """Three channels of the scripted provider (configured per example) and a merchant."""
    for priority, code in enumerate(CHANNELS, 1):
        ChannelFactory(
            code=code,
            provider=PROVIDER,
            currencies={"prop-1": list(CURRENCIES), "prop-2": ["SEK"], "prop-3": ["NOK"]}[code],
            min_amount=50 if code == "prop-3" else 1,
            priority=priority,
        )
    merchant = make_merchant(callback_url=endpoint.url).merchant
    return make_machine(provider, endpoint, merchant)


# CI: 40 examples of up to 30 steps, each ending in the liveness phase: under a minute here.
# Enough because every commit runs a different 40 (tests/conftest.py seeds from the commit), the
# run asserts it reached backoff and finished examples, and the give-up rule, which random
# examples reach rarely, has explicit examples below.
MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.django_db(transaction=True)
def test_order_lifecycle_state_machine(provider, endpoint):
    REACHED.clear()
    # when / then: any sequence of stage calls keeps every invariant after every step, and every
    # example ends with every order completed or on the console's list
    run_state_machine_as_test(lifecycle(provider, endpoint), settings=MACHINE_SETTINGS)
    # and the run reached what it is here for: the sweep backing off, concurrent copies
    assert REACHED["sweep backed off"] > 0, dict(REACHED)
    assert REACHED["examples finished"] > 0, dict(REACHED)


@pytest.mark.django_db(transaction=True)
def test_the_sweep_backs_off_gives_up_and_the_console_lists_the_order(provider, endpoint):
    """Explicit examples (the machine's own steps) for the sweep's give-up rule, which random
    examples reach rarely: a charge the provider never receives, and a receiver that never takes
    its callback."""
    REACHED.clear()
    state = lifecycle(provider, endpoint)()
    lost = state.channels_and_first_order(
        caps=(None, None), max_amount=None, third=False, amount=100, currency="SEK"
    )
    refused = state.create(amount=200, currency="SEK")
    state.allocate(order_id=lost)
    state.charge(order_id=lost, answer="unknown_lost")  # every resend is lost too
    state.allocate(order_id=refused)
    state.charge(order_id=refused, answer="accepted")
    state.provider_settles_silently(order_id=refused, status="paid")
    state.poll(order_id=refused)
    endpoint.mode = 500
    state.every_order_is_consistent()
    for _ in range(80):
        state.time_passes()
        state.every_order_is_consistent()
    # then: both given up by the rule and listed on the console, after time ran through the backoff
    assert Order.objects.get(pk=lost).status == "processing"
    assert Order.objects.get(pk=refused).status == "paid"
    assert state.needs_a_person() == {lost, refused}
    assert REACHED["sweep gave up"] > 0
    assert state.clock.moved > django_settings.POLL_MAX_COUNT * 60
    state.teardown()
