"""Load generation over the order API: a closed-loop burst and an open-loop steady rate.

Threads share one urllib3 keep-alive pool (one connection per thread), so the client spends
little CPU per request on a machine it shares with the stack under test.
"""

import json
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import urllib3

CURRENCIES = ("USD", "EUR", "GBP")
MAX_TRIES = 5


@dataclass
class LoadResult:
    ids: list[str] = field(default_factory=list)
    started: float = 0.0  # wall clock (time.time()) before the first request
    finished: float = 0.0  # wall clock after the last answer
    create_ms: list[float] = field(default_factory=list)  # client-side round trip of each 201
    retries: int = 0
    failures: list[str] = field(default_factory=list)  # orders never created, with the last answer
    lag_ms: list[float] = field(default_factory=list)  # open loop: how late each request was sent


class OrderApi:
    def __init__(self, *, base_url: str, api_key: str, connections: int) -> None:
        url = urllib3.util.parse_url(base_url)
        self.pool = urllib3.HTTPConnectionPool(
            url.host,
            url.port or 80,
            maxsize=connections,
            block=True,
            retries=False,
            timeout=urllib3.Timeout(connect=5.0, read=30.0),
        )
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    def create(self, *, key: str, rng: random.Random) -> tuple[str | None, int, str]:
        """POST one order that the sandbox will pay (amount % 100 in 00-49). (id, retries, last error)."""
        amount = rng.randint(1, 9999) * 100 + rng.randint(0, 49)
        body = json.dumps({"amount": amount, "currency": rng.choice(CURRENCIES), "reference": key}).encode()
        headers = {**self.headers, "Idempotency-Key": key}
        error = ""
        for attempt in range(MAX_TRIES):
            try:
                response = self.pool.urlopen("POST", "/api/v1/orders", body=body, headers=headers)
            except urllib3.exceptions.HTTPError as exc:
                error = f"{exc.__class__.__name__}: {exc}"
                time.sleep(0.05 * (attempt + 1))
                continue
            if response.status in (200, 201):
                return json.loads(response.data)["id"], attempt, ""
            error = f"HTTP {response.status}: {response.data[:200]!r}"
            if response.status == 429:
                time.sleep(float(response.headers.get("Retry-After") or 0.1))
            elif response.status in (409, 502, 503, 504) or response.status >= 500:
                # 409: our own earlier try is still in flight; the same key replays it once done.
                time.sleep(0.05 * (attempt + 1))
            else:
                break
        return None, MAX_TRIES, error

    def close(self) -> None:
        self.pool.close()


def _record(result: LoadResult, lock: threading.Lock, created: tuple, sent: float, key: str) -> None:
    order_id, retries, error = created
    elapsed_ms = (time.monotonic() - sent) * 1000
    with lock:
        result.retries += retries if order_id else 0
        if order_id:
            result.ids.append(order_id)
            result.create_ms.append(elapsed_ms)
        else:
            result.failures.append(f"{key}: {error}")


def burst(*, api: OrderApi, orders: int, concurrency: int, prefix: str, seed: int = 1) -> LoadResult:
    """Create `orders` orders as fast as the API takes them, `concurrency` requests at a time."""
    result = LoadResult()
    lock = threading.Lock()
    next_index = iter(range(orders))

    def worker(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            key = f"{prefix}-{index}"
            sent = time.monotonic()
            _record(result, lock, api.create(key=key, rng=rng), sent, key)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(concurrency)]
    result.started = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.finished = time.time()
    return result


def steady(*, api: OrderApi, rate: float, seconds: float, prefix: str, max_in_flight: int) -> LoadResult:
    """Offer `rate` orders/s for `seconds`, on schedule whatever the answers take (open loop).

    A scheduler hands each order to an idle sender at its due time; if every sender is busy, the
    order goes out late and the lag is recorded, so a system that does not keep up shows it.
    """
    result = LoadResult()
    lock = threading.Lock()
    due: queue.Queue = queue.Queue()
    total = int(rate * seconds)

    def sender(number: int) -> None:
        rng = random.Random(7000 + number)
        while True:
            item = due.get()
            if item is None:
                return
            index, due_at = item
            sent = time.monotonic()
            with lock:
                result.lag_ms.append((sent - due_at) * 1000)
            key = f"{prefix}-{index}"
            _record(result, lock, api.create(key=key, rng=rng), sent, key)

    threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(max_in_flight)]
    for thread in threads:
        thread.start()
    result.started = time.time()
    start = time.monotonic()
    for index in range(total):
        due_at = start + index / rate
        pause = due_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        due.put((index, due_at))
    for _ in threads:
        due.put(None)
    for thread in threads:
        thread.join()
    result.finished = time.time()
    return result
