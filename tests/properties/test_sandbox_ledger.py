"""Duplicated and interleaved stages against the real sandbox: the ledger agrees with every outcome.

Issue 10 item 1 as a property (SPEC 9): any interleaving of duplicated stage deliveries
(allocate, charge, confirm by webhook and by poll, sweeps), failovers (the sandbox's row 71:
the first channel asked answers 503, another accepts; row 72: every channel does), late and
duplicate webhooks, and a copy of `charge` held inside its provider call while other copies move
the order on. The provider is the real sandbox under gunicorn over HTTP; its webhooks arrive at
a local receiver and are posted, signed as the sandbox signed them, through our real webhook
endpoint and its duplicate filter. A local proxy between the gateway and the sandbox holds a
request in the network on demand (the only way to pause a copy mid-call without touching the
product). After every step, read from the sandbox's ledger (GET /sandbox/charges?order=<id>,
settled as the sandbox will settle it): an order whose outcome is `failed` has no paid charge at
the provider, a `paid` one exactly one; no order ever has two charges.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from django.db import connections
from django.test import Client
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
from config.celery_app import app as celery_app
from core import crypto
from core.redis import get_redis
from gateway.sandbox_server.secrets import channel_webhook_secret
from gateway.services import order_charge, order_poll
from orders.models import Order
from orders.services import order_create
from tests.factories import ChannelFactory, make_merchant
from tests.properties.pipeline import Pipeline, VirtualClock
from tests.sandbox.conftest import (
    MASTER_SECRET,
    Receiver,
    Sandbox,
    database_url_for,
    drop_database,
    free_port,
    reset_database,
    run_sandbox,
    running_receiver,
    wait_until,
)

CHANNELS = ("ledger-a", "ledger-b")
CURRENCY = "USD"
# The sandbox's rows (SPEC 5): amount % 100 picks what it does with a charge.
ROWS = {
    "paid": 0,
    "declined": 51,
    "paid_silently": 61,  # no webhook: only a poll learns it
    "slow": 62,  # answers after SLOW_SECONDS: our read times out, the charge is made
    "first_channel_503": 71,
    "every_channel_503": 72,
    "paid_then_late_failed": 81,
}
# Failover (71) is where decisions race: drawn about half the time.
ROW_CHOICE = st.one_of(st.just("first_channel_503"), st.sampled_from(sorted(ROWS)))
READ_TIMEOUT = 0.5
QUEUES = (
    "allocation",
    "gateway",
    "callbacks",
    "orders",
)  # shorter than the sandbox's SLOW_SECONDS, so row 62 is an unknown outcome


class HoldingProxy:
    """Forwards the gateway's requests to the sandbox; `hold_next` keeps the next charge request
    in the network (not yet at the sandbox) until released."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.armed: list[tuple[threading.Event, threading.Event]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if method == "POST":
                    with proxy.lock:
                        hold = proxy.armed.pop(0) if proxy.armed else None
                    if hold is not None:
                        arrived, release = hold
                        arrived.set()
                        release.wait(60)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() in ("content-type", "idempotency-key")
                }
                try:
                    answer = requests.request(
                        method, proxy.upstream + self.path, data=body or None, headers=headers, timeout=30
                    )
                except requests.RequestException:
                    self.close_connection = True
                    return
                self.send_response(answer.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def do_POST(self) -> None:
                self._forward("POST")

            def do_GET(self) -> None:
                self._forward("GET")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def hold_next(self) -> tuple[threading.Event, threading.Event]:
        hold = (threading.Event(), threading.Event())
        with self.lock:
            self.armed.append(hold)
        return hold

    def disarm(self, hold) -> None:
        with self.lock:
            if hold in self.armed:
                self.armed.remove(hold)

    def close(self) -> None:
        with self.lock:
            for _, release in self.armed:
                release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def ledger_sandbox(tmp_path_factory) -> Iterator[Sandbox]:
    suffix = f"_{os.environ['PYTEST_XDIST_WORKER']}" if "PYTEST_XDIST_WORKER" in os.environ else ""
    name = f"test_sandbox_props{suffix}"
    reset_database(name)
    log_path = tmp_path_factory.mktemp("sandbox-props") / "gunicorn.log"
    try:
        with run_sandbox(database_url_for(name), log_path, free_port()) as server:
            yield server
    finally:
        drop_database(name)


@pytest.fixture(scope="module")
def webhook_receiver() -> Iterator[Receiver]:
    with running_receiver() as receiver:
        yield receiver


@pytest.fixture
def proxy(ledger_sandbox) -> Iterator[HoldingProxy]:
    server = HoldingProxy(ledger_sandbox.base_url)
    yield server
    server.close()


class HeldCharge:
    """A copy of the charge stage running in a thread of its own, its request held in the proxy."""

    def __init__(self, proxy: HoldingProxy, order_id: str) -> None:
        self.order_id = order_id
        self.hold = proxy.hold_next()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(order_id,), daemon=True)
        self.thread.start()
        # Parked in the network, or finished without calling the provider.
        wait_until(lambda: self.hold[0].is_set() or not self.thread.is_alive(), timeout=30)
        proxy.disarm(self.hold)

    @property
    def parked(self) -> bool:
        return self.hold[0].is_set() and self.thread.is_alive()

    def _run(self, order_id: str) -> None:
        try:
            order_charge(order_id=order_id)
        except BaseException as exc:  # reported in the test's thread by finish()
            self.error = exc
        finally:
            connections.close_all()

    def finish(self) -> None:
        self.hold[1].set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "a released charge copy did not finish"
        if self.error is not None:
            raise self.error


_references = itertools.count(1)
REACHED: Counter[str] = Counter()  # what the examples reached, across one run


def settled_ledger(sandbox: Sandbox, order_id: str) -> list[tuple[str, str]]:
    """(charge id, status) of the order's ledger entries, each as the sandbox will settle it: the
    ledger's status once final, the sandbox's stored final status while it still shows pending."""
    entries = sandbox.ledger(order_id)
    if all(e["status"] != "pending" for e in entries):
        return [(e["id"], e["status"]) for e in entries]
    finals = {
        row["id"]: row["final_status"]
        for row in sandbox.query(
            "SELECT id, final_status FROM sandbox_charges WHERE order_id = %(order)s", {"order": order_id}
        )
    }
    return [(e["id"], e["status"] if e["status"] != "pending" else finals[e["id"]]) for e in entries]


def make_machine(sandbox: Sandbox, receiver: Receiver, proxy: HoldingProxy, merchant):
    class LedgerAgrees(RuleBasedStateMachine):
        orders = Bundle("orders")

        def __init__(self) -> None:
            super().__init__()
            # Each example starts alone: closed circuits, earlier examples' orders no longer due.
            PaymentChannel.objects.filter(code__in=CHANNELS).update(circuit_open_until=None)
            Order.objects.filter(merchant=merchant).update(next_check_at=None)
            for key in get_redis().scan_iter("circuit:ledger-*"):
                get_redis().delete(key)
            self.order_ids: list[str] = []
            self.held: list[HeldCharge] = []
            self.forwarded: set[str] = set()  # webhook-ids our endpoint took as new
            self.web = Client()
            self.pipeline = Pipeline()
            self.clock = VirtualClock("ledger-")
            self.seen_webhooks = len(receiver.records)

        @initialize(target=orders, row=ROW_CHOICE, base=st.integers(1, 50))
        def first_order(self, row, base):
            return self._create(row, base)

        @precondition(lambda self: len(self.order_ids) < 2)
        @rule(target=orders, row=ROW_CHOICE, base=st.integers(1, 50))
        def create(self, row, base):
            return self._create(row, base)

        def _create(self, row: str, base: int) -> str:
            reference = f"ledger-{os.getpid()}-{next(_references)}"
            result = order_create(
                merchant=merchant,
                idempotency_key=reference,
                fingerprint=reference,
                reference=reference,
                amount=base * 100 + ROWS[row],
                currency=CURRENCY,
                callback_url=receiver.url("merchant"),
            )
            self.order_ids.append(result.body["id"])
            return result.body["id"]

        @rule(order_id=orders)
        def advance(self, order_id):
            """The stage the order is at, delivered once more (what the pipeline does next)."""
            status = Order.objects.values_list("status", flat=True).get(pk=order_id)
            if status == "pending":
                order_allocate(order_id=order_id)
            elif status == "assigned":
                order_charge(order_id=order_id)
            elif status == "processing":
                order_poll(order_id=order_id)
            else:
                self.pipeline.deliver_events(self.order_ids)

        @rule(order_id=orders)
        def allocate(self, order_id):
            order_allocate(order_id=order_id)

        @rule(order_id=orders)
        def charge(self, order_id):
            order_charge(order_id=order_id)

        def _assigned(self) -> list[str]:
            return [
                str(pk)
                for pk in Order.objects.filter(pk__in=self.order_ids, status="assigned").values_list(
                    "pk", flat=True
                )
            ]

        # Which orders are assigned, and whether a copy got parked, depend on the real sandbox and
        # on timing: these rules draw the same shape of data whatever they find and do nothing
        # when there is nothing to do, so Hypothesis sees one consistent generation (preconditions
        # on that state made it report FlakyStrategyDefinition now and then). With no order
        # assigned, a pending one is allocated first (its allocate delivery came before the
        # charge copy): left to chance, about one run in seven never held a copy at all.
        def _pick_assigned(self, pick: int) -> str | None:
            assigned = sorted(self._assigned())
            if not assigned:
                pending = sorted(
                    str(pk)
                    for pk in Order.objects.filter(pk__in=self.order_ids, status="pending").values_list(
                        "pk", flat=True
                    )
                )
                if pending:
                    order_allocate(order_id=pending[pick % len(pending)])
                    assigned = sorted(self._assigned())
            return assigned[pick % len(assigned)] if assigned else None

        @rule(pick=st.integers(0, 1))
        def charge_held_in_the_network(self, pick):
            """A copy of charge sends its request, which the network keeps for a while."""
            order_id = self._pick_assigned(pick)
            if order_id is not None and len(self.held) < 2:
                self._charge_held(order_id)

        @rule(
            pick=st.integers(0, 1),
            meanwhile=st.lists(st.sampled_from(["advance", "advance", "events", "poll"]), max_size=4),
        )
        def charge_overtaken_while_held(self, pick, meanwhile):
            """A copy of charge is held in the network while other deliveries move the order on."""
            order_id = self._pick_assigned(pick)
            if order_id is None or self.held:
                return
            self._charge_held(order_id)
            for step in meanwhile:
                {
                    "advance": self.advance,
                    "poll": self.poll,
                    "events": lambda order_id: self.events_delivered(),
                }[step](order_id=order_id)
            while self.held:
                self.release_held(which=0)

        def _charge_held(self, order_id: str) -> None:
            copy = HeldCharge(proxy, order_id)
            REACHED[f"held copy parked: {copy.parked}"] += 1
            if copy.parked:
                self.held.append(copy)
            else:
                copy.finish()

        @rule(which=st.integers(0, 1))
        def release_held(self, which):
            if not self.held:
                return
            copy = self.held[which % len(self.held)]
            self.held.remove(copy)
            REACHED["held copy released, order " + Order.objects.get(pk=copy.order_id).status] += 1
            copy.finish()

        @rule(order_id=orders)
        def poll(self, order_id):
            order_poll(order_id=order_id)

        @rule(data=st.data())
        def provider_webhook(self, data):
            """One of the sandbox's webhooks, first time, again, or late, through our endpoint."""
            received = [r for r in receiver.records[self.seen_webhooks :] if r.path.startswith("/webhooks/")]
            if not received:
                return
            delivery = data.draw(st.sampled_from(received))
            headers = {
                f"HTTP_{k.upper().replace('-', '_')}": v
                for k, v in delivery.headers.items()
                if k.lower().startswith("webhook-")
            }
            response = self.web.post(
                delivery.path, data=delivery.body, content_type="application/json", **headers
            )
            assert response.status_code == 200, response.content
            if not response.json()["duplicate"]:
                self.forwarded.add(delivery.headers["webhook-id"])
                self._confirm(delivery.body)
            else:
                # our duplicate filter took it before: the confirm task may still run twice
                if data.draw(st.booleans()):
                    self._confirm(delivery.body)

        def _confirm(self, body: bytes) -> None:
            """The confirm task, given what our endpoint hands it (the verified channel included)."""
            event = json.loads(body)
            charge = event["data"]
            celery_app.tasks["gateway.confirm"].run(
                {
                    "order_id": charge["order_id"],
                    "idempotency_key": charge["idempotency_key"],
                    "status": {"charge.paid": "paid", "charge.failed": "failed"}[event["type"]],
                    "failure_code": charge.get("failure_code") or "",
                    "webhook_id": "",
                    "channel": charge["channel"],
                    "provider": "sandbox",
                }
            )

        @rule()
        def events_delivered(self):
            """Workers take every announced event (again, after the rules' own direct calls)."""
            self.pipeline.deliver_events(self.order_ids)

        @rule()
        def time_passes_to_the_next_due_check(self):
            self.clock.advance_to_next_due(self.order_ids)
            self.pipeline.beat(self.order_ids)

        @invariant()
        def ledger_agrees_with_every_outcome(self):
            for order_id in self.order_ids:
                order = Order.objects.get(pk=order_id)
                charges = settled_ledger(sandbox, order_id)
                assert len(charges) <= 1, f"order {order_id} charged twice: {charges}"
                paid = [c for c in charges if c[1] == "paid"]
                if order.outcome == "failed":
                    assert paid == [], (
                        f"order {order_id} failed ({order.failure_code}) but charged: {charges}"
                    )
                if order.outcome == "paid":
                    assert len(paid) == 1, f"order {order_id} paid but the ledger has {charges}"

        def teardown(self):
            for copy in self.held:
                copy.finish()
            self.held.clear()
            self.ledger_agrees_with_every_outcome()

    return LedgerAgrees


@pytest.mark.django_db(transaction=True)
def test_the_ledger_agrees_with_every_outcome(ledger_sandbox, webhook_receiver, proxy, settings_override):
    # given two sandbox channels, the gateway speaking to the sandbox through the proxy, and the
    # sandbox's webhooks going to a local receiver
    for priority, code in enumerate(CHANNELS, 1):
        ChannelFactory(
            code=code,
            currencies=[CURRENCY],
            priority=priority,
            webhook_secret_encrypted=crypto.encrypt(channel_webhook_secret(code, MASTER_SECRET)),
        )
    merchant = make_merchant(callback_url=webhook_receiver.url("merchant")).merchant
    # when / then
    run_state_machine_as_test(
        make_machine(ledger_sandbox, webhook_receiver, proxy, merchant), settings=MACHINE_SETTINGS
    )
    # and the run did race copies: a copy was held in the network while others moved the order
    assert REACHED["held copy parked: True"] > 0, dict(REACHED)


# CI: 50 examples of up to 12 steps against the real sandbox, 1-2 minutes on a loaded machine.
# Enough because every commit runs a different 50 (tests/conftest.py seeds from the commit), the
# rule that races a held copy reaches the interleaving in most examples (the run asserts it did),
# and what a run finds stays as an explicit test below.
MACHINE_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def settings_override(settings, proxy, webhook_receiver):
    settings.SANDBOX_URL = proxy.url
    settings.PUBLIC_BASE_URL = f"http://127.0.0.1:{webhook_receiver.port}"
    settings.GATEWAY_READ_TIMEOUT = READ_TIMEOUT
    yield settings
    # No workers here: drop what the committed transitions published to the broker.
    redis = get_redis()
    for key in itertools.chain(redis.scan_iter("circuit:ledger-*"), QUEUES):
        redis.delete(key)


@pytest.mark.django_db(transaction=True)
def test_found_a_charge_copy_held_in_the_network_fails_an_order_paid_on_another_channel(
    ledger_sandbox, webhook_receiver, proxy, settings_override
):
    """The example the machine found before issue 10 item 1 was fixed, kept as an explicit one.

    Found as: first_order(row='first_channel_503'), create(row='first_channel_503'),
    advance(orders_1) (-> assigned to ledger-a), charge_overtaken_while_held(orders_1,
    meanwhile=['advance', 'events', ...]): ledger-a refuses the unheld copy, the order fails over
    and is charged and paid on ledger-b; the held copy reaches ledger-a late, is refused too, and
    its "no channel left" decision, made for `assigned to ledger-a`, was applied to the processing
    order: failed / channel_unavailable with a paid charge on ledger-b. Below, the same race in
    its smallest form.
    """
    for priority, code in enumerate(CHANNELS, 1):
        ChannelFactory(
            code=code,
            currencies=[CURRENCY],
            priority=priority,
            webhook_secret_encrypted=crypto.encrypt(channel_webhook_secret(code, MASTER_SECRET)),
        )
    merchant = make_merchant(callback_url=webhook_receiver.url("merchant")).merchant
    state = make_machine(ledger_sandbox, webhook_receiver, proxy, merchant)()
    orders_0 = state.first_order(row="first_channel_503", base=1)
    state.allocate(order_id=orders_0)
    state._charge_held(orders_0)
    state.charge(order_id=orders_0)
    state.charge(order_id=orders_0)
    state.ledger_agrees_with_every_outcome()
    state.release_held(which=0)
    state.ledger_agrees_with_every_outcome()
    state.teardown()
