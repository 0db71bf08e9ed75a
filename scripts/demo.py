"""`make demo`: one order per row of the sandbox table, and one Stripe order (on localstripe),
through the running stack, and each one's journey; then one refund's journey: the request, its
statuses, the sandbox's ledger and the callback."""

import json
import os
import sys
import time
import uuid
from pathlib import Path

import requests

API = os.environ.get("API_URL", "http://127.0.0.1:8000")
SANDBOX = os.environ.get("SANDBOX_URL", "http://127.0.0.1:8001")
LOCALSTRIPE = os.environ.get("LOCALSTRIPE_URL", "http://127.0.0.1:8420")
ROWS = [
    (1000, "USD", "paid webhook"),
    (1051, "USD", "declined (card_declined)"),
    (1052, "EUR", "declined (insufficient_funds)"),
    (1061, "USD", "no webhook: settled by polling"),
    (1062, "GBP", "charge request times out, charge made"),
    (1071, "USD", "first channel 503: failover"),
    (1072, "USD", "every channel 503"),
    (1081, "USD", "paid x3 then late failed webhook"),
    (5000, "JPY", "zero-decimal currency on sandbox-jp"),
]
# Orders with a payment method go to Stripe channels only: stripe-test, on localstripe.
STRIPE_ROWS = [(1050, "USD", "pm_card_visa", "Stripe PaymentIntent on stripe-test (localstripe)")]


def main() -> int:
    creds = json.loads(Path(".run/demo-merchant.json").read_text())  # make demo runs from the root
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {creds['api_key']}"
    run = uuid.uuid4().hex[:6]
    orders = []
    rows = [(amount, currency, None, what) for amount, currency, what in ROWS] + STRIPE_ROWS
    for amount, currency, payment_method, what in rows:
        reference = f"demo-{run}-{amount}" + ("-stripe" if payment_method else "")
        body = {"amount": amount, "currency": currency, "reference": reference}
        if payment_method:
            body["payment_method"] = payment_method
        response = session.post(
            f"{API}/api/v1/orders", json=body, headers={"Idempotency-Key": reference}, timeout=10
        )
        response.raise_for_status()
        orders.append((response.json()["id"], amount, currency, what))
    deadline = time.monotonic() + 90
    pending = {order_id for order_id, *_ in orders}
    while pending and time.monotonic() < deadline:
        time.sleep(0.5)
        for order_id in list(pending):
            if session.get(f"{API}/api/v1/orders/{order_id}", timeout=10).json()["status"] == "completed":
                pending.discard(order_id)
    for order_id, amount, currency, what in orders:
        order = session.get(f"{API}/api/v1/orders/{order_id}", timeout=10).json()
        events = session.get(f"{API}/api/v1/orders/{order_id}/events", timeout=10).json()
        charges = requests.get(f"{SANDBOX}/sandbox/charges", params={"order": order_id}, timeout=10).json()
        callbacks = requests.get(
            f"{SANDBOX}/sandbox/callbacks", params={"order": order_id}, timeout=10
        ).json()
        print(f"\n{amount} {currency} — {what}")
        print(
            f"  order {order_id}: {order['status']}, outcome {order['outcome']}, "
            f"channel {order['channel']}, failure {order['failure_code']}"
        )
        for step in events:
            origin, channel = step["from"] or "-", step["channel"] or ""
            print(f"    {step['at']}  {origin:>10} -> {step['to']:<10} {channel:<10} {step['reason']}")
        if (order.get("provider_reference") or "").startswith("pi_"):
            intent = requests.get(
                f"{LOCALSTRIPE}/v1/payment_intents/{order['provider_reference']}",
                auth=("sk_test_localstripe", ""),
                timeout=10,
            ).json()
            print(
                f"  localstripe: {intent.get('id')} {intent.get('status')} {intent.get('amount')}"
                f" {intent.get('currency')}, metadata {intent.get('metadata')}"
            )
        print(f"  sandbox charges: {len(charges)}; callbacks received: {[c['type'] for c in callbacks]}")
    if pending:
        print(f"\nnot completed within 90 s: {sorted(pending)}", file=sys.stderr)
        return 1
    paid = next(order_id for order_id, amount, currency, _ in orders if (amount, currency) == (1000, "USD"))
    return refund_journey(session, paid, run)


def refund_journey(session: requests.Session, order_id: str, run: str) -> int:
    """Refund part of a paid order (SPEC 10) and show what happens to the refund."""
    body = {"amount": 400, "reason": "requested_by_customer", "reference": f"demo-{run}-rf"}
    print(f"\nrefund of order {order_id}: POST /api/v1/orders/{order_id}/refunds {json.dumps(body)}")
    response = session.post(
        f"{API}/api/v1/orders/{order_id}/refunds",
        json=body,
        headers={"Idempotency-Key": f"demo-{run}-rf"},
        timeout=10,
    )
    response.raise_for_status()
    refund = response.json()
    print(
        f"  {response.status_code}: refund {refund['id']}"
        f" {refund['amount']} {refund['currency']} {refund['status']}"
    )
    deadline = time.monotonic() + 60
    called_back: list[dict] = []
    while time.monotonic() < deadline and not called_back:
        time.sleep(0.5)
        refund = session.get(f"{API}/api/v1/refunds/{refund['id']}", timeout=10).json()
        if refund["status"] in ("succeeded", "failed"):
            called_back = requests.get(
                f"{SANDBOX}/sandbox/callbacks", params={"order": refund["id"]}, timeout=10
            ).json()
    for step in session.get(f"{API}/api/v1/refunds/{refund['id']}/events", timeout=10).json():
        print(f"    {step['at']}  {step['from'] or '-':>10} -> {step['to']:<10} {step['reason']}")
    order = session.get(f"{API}/api/v1/orders/{order_id}", timeout=10).json()
    ledger = requests.get(f"{SANDBOX}/sandbox/refunds", params={"order": order_id}, timeout=10).json()
    print(
        f"  order: {order['status']}, amount {order['amount']}, amount_refunded {order['amount_refunded']};"
        f" sandbox refund ledger: {[(e['amount'], e['status']) for e in ledger]}"
    )
    print(f"  callbacks received: {[(c['type'], c['webhook_id']) for c in called_back]}")
    if not called_back:
        print(f"\nrefund {refund['id']} not settled and called back within 60 s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
