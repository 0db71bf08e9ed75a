"""Webhook sender of the sandbox: claims due rows from PostgreSQL, signs and POSTs them, records outcomes."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import requests
import requests.adapters
from standardwebhooks.webhooks import Webhook

from .secrets import channel_webhook_secret
from .store import ClaimedWebhook, DeliveryResult, Store

log = logging.getLogger("sandbox.dispatcher")

MAX_ATTEMPTS = 10
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 5.0
# Longer than connect + read timeout, so a live sender always finishes before its lease runs out.
LEASE_SECONDS = 30.0


def backoff_seconds(attempts: int) -> float:
    """Delay before the next try after `attempts` failed ones: 1, 2, 4, 8 … seconds."""
    return float(2 ** max(attempts - 1, 0))


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Dispatcher:
    """One per worker process: a polling loop thread plus a small pool of sender threads."""

    def __init__(
        self,
        store: Store,
        *,
        senders: int = 16,
        batch_size: int = 50,
        poll_interval: float = 0.05,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self._store = store
        self._senders = senders
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._max_attempts = max_attempts
        # Claim at most twice the sender count: enough to keep senders busy, few enough that rows leased
        # but still queued here are not held away from the other worker for long.
        self._max_in_flight = senders * 2
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: dict[str, Future[DeliveryResult]] = {}
        self._results: list[DeliveryResult] = []
        self._executor: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self._signers: dict[str, Webhook] = {}

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        if self._thread is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=self._senders, thread_name_prefix="sandbox-webhook")
        self._thread = threading.Thread(target=self._run, name="sandbox-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming, hand back rows not yet started, wait for sends under way, flush outcomes."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    def wake(self) -> None:
        """Ask the loop to poll now (a charge with an immediately due webhook was just stored)."""
        self._wake.set()

    # --- loop ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            claimed = 0
            limit = 0
            try:
                self._flush()
                with self._lock:
                    free = self._max_in_flight - len(self._in_flight)
                limit = min(free, self._batch_size)
                if limit > 0:
                    claimed = self._claim(limit)
            except Exception:
                # A database outage must not kill the thread: log, back off, keep unflushed outcomes.
                log.exception("webhook dispatcher iteration failed")
                self._stopping.wait(1.0)
                continue
            if limit > 0 and claimed == limit:
                continue  # a full batch: more may be due right now
            self._wake.wait(self._poll_interval)
            self._wake.clear()
        self._shutdown()

    def _claim(self, limit: int) -> int:
        now = _utcnow()
        rows = self._store.claim_webhooks(now, now + timedelta(seconds=LEASE_SECONDS), limit)
        assert self._executor is not None
        for row in rows:
            future = self._executor.submit(self._deliver_safely, row)
            with self._lock:
                self._in_flight[row.msg_id] = future
            future.add_done_callback(self._done)
        return len(rows)

    def _done(self, future: Future[DeliveryResult]) -> None:
        if future.cancelled():
            return  # handed back by _shutdown
        result = future.result()
        with self._lock:
            self._in_flight.pop(result.msg_id, None)
            self._results.append(result)
        # Flush promptly: the next message of an ordered sequence is claimable only once this is recorded.
        self._wake.set()

    def _flush(self) -> None:
        with self._lock:
            results, self._results = self._results, []
        if not results:
            return
        try:
            self._store.record_results(results)
        except Exception:
            with self._lock:
                self._results[:0] = results
            raise

    def _shutdown(self) -> None:
        now = _utcnow()
        with self._lock:
            pending = list(self._in_flight.items())
        released = []
        for msg_id, future in pending:
            if future.cancel():
                released.append(DeliveryResult(msg_id, "pending", now, -1, None, None, now))
                with self._lock:
                    self._in_flight.pop(msg_id, None)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        with self._lock:
            self._results.extend(released)
        try:
            self._flush()
        except Exception:
            log.exception("could not record webhook outcomes at shutdown; their leases will expire")

    # --- sending -------------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # No proxies or .netrc from the environment: receivers are addressed directly.
            session.trust_env = False
            adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=4, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def _signer(self, channel: str) -> Webhook:
        signer = self._signers.get(channel)
        if signer is None:
            signer = self._signers[channel] = Webhook(channel_webhook_secret(channel))
        return signer

    def _deliver_safely(self, row: ClaimedWebhook) -> DeliveryResult:
        # Every claimed row must come back with an outcome, or its in-flight slot would never be freed.
        try:
            return self._deliver(row)
        except Exception as exc:
            log.exception("webhook %s: unexpected error while sending", row.msg_id)
            return self._failure(row, None, f"{type(exc).__name__}: {exc}"[:500], _utcnow())

    def _failure(
        self, row: ClaimedWebhook, http_status: int | None, error: str, finished: datetime
    ) -> DeliveryResult:
        if row.attempts >= self._max_attempts:
            log.warning(
                "webhook %s to %s gave up after %d attempts: %s", row.msg_id, row.url, row.attempts, error
            )
            return DeliveryResult(row.msg_id, "dead", finished, 0, http_status, error, finished)
        delay = backoff_seconds(row.attempts)
        log.info(
            "webhook %s to %s failed (attempt %d): %s; retry in %.0f s",
            row.msg_id,
            row.url,
            row.attempts,
            error,
            delay,
        )
        return DeliveryResult(
            row.msg_id, "pending", finished + timedelta(seconds=delay), 0, http_status, error, finished
        )

    def _deliver(self, row: ClaimedWebhook) -> DeliveryResult:
        started = _utcnow()
        signature = self._signer(row.channel).sign(row.msg_id, started, row.payload)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": row.msg_id,
            "webhook-timestamp": str(int(started.timestamp())),
            "webhook-signature": signature,
        }
        http_status: int | None = None
        error: str | None
        try:
            response = self._session().post(
                row.url,
                data=row.payload.encode(),
                headers=headers,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                allow_redirects=False,
            )
            http_status = response.status_code
            if 200 <= response.status_code < 300:
                error = None
            else:
                error = f"HTTP {response.status_code}: {response.text[:200]}"
        except requests.RequestException as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        finished = _utcnow()
        if error is None:
            return DeliveryResult(row.msg_id, "sent", finished, 0, http_status, None, finished)
        return self._failure(row, http_status, error, finished)
