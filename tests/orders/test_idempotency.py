"""Idempotency-Key on POST /api/v1/orders (SPEC 3): replay, conflicts, takeover, pruning, races."""

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from orders import services
from orders.models import IdempotencyKey, Order
from orders.tasks import prune_idempotency_keys

URL = "/api/v1/orders"
BODY = {"amount": 1050, "currency": "USD", "reference": "inv-2041"}


def _post(client, body=BODY, **headers):
    return client.post(URL, body, format="json", **headers)


@pytest.mark.django_db
def test_missing_key_is_400_and_creates_nothing(api):
    response = _post(api)

    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "idempotency_key_missing"
    assert Order.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    "key",
    ["k" * 256, "", "tab\tkey", "new\nline", "caf\u00e9"],
    ids=["256", "empty", "tab", "nl", "non-ascii"],
)
def test_invalid_key_is_400_and_creates_nothing(api, key):
    response = _post(api, HTTP_IDEMPOTENCY_KEY=key)

    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "idempotency_key_invalid"
    assert Order.objects.count() == 0
    assert IdempotencyKey.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("key", ["k", "k" * 255, "order 42 / try #1 ~!"], ids=["1", "255", "printable"])
def test_key_of_1_to_255_printable_characters_is_accepted(api, key):
    response = _post(api, HTTP_IDEMPOTENCY_KEY=key)

    assert response.status_code == 201, response.content
    assert IdempotencyKey.objects.get().key == key


@pytest.mark.django_db
def test_same_key_and_body_replays_the_answer_without_a_second_order(api):
    # given
    first = _post(api, HTTP_IDEMPOTENCY_KEY="key-1")
    assert first.status_code == 201, first.content
    assert "Idempotent-Replayed" not in first
    # when
    second = _post(api, HTTP_IDEMPOTENCY_KEY="key-1")
    # then
    assert second.status_code == 201
    assert second["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    assert Order.objects.count() == 1
    assert str(Order.objects.get().pk) == first.json()["id"]


@pytest.mark.django_db
def test_a_replay_is_byte_for_byte_the_first_answer(api):
    # Metadata keys out of alphabetical order, as a merchant may send them.
    body = {**BODY, "metadata": {"zeta": "1", "alpha": "2", "mid": "3"}}
    first = _post(api, body, HTTP_IDEMPOTENCY_KEY="key-bytes")
    second = _post(api, body, HTTP_IDEMPOTENCY_KEY="key-bytes")

    assert (first.status_code, second.status_code) == (201, 201)
    assert second.content == first.content
    assert list(second.json()) == list(first.json())
    assert list(second.json()["metadata"]) == ["zeta", "alpha", "mid"]


@pytest.mark.django_db
def test_an_answer_stored_before_the_text_column_still_replays(api):
    first = _post(api, HTTP_IDEMPOTENCY_KEY="key-old")
    # As migration 0011 left the rows stored before it: the answer in jsonb only.
    IdempotencyKey.objects.filter(key="key-old").update(response_text=None, response_body=first.json())

    second = _post(api, HTTP_IDEMPOTENCY_KEY="key-old")

    assert (second.status_code, second["Idempotent-Replayed"]) == (201, "true")
    assert second.json() == first.json()
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_replay_still_answers_the_original_after_the_order_moved_on(api):
    # given: an order created, then moved on by the pipeline
    first = _post(api, HTTP_IDEMPOTENCY_KEY="key-1")
    Order.objects.filter(pk=first.json()["id"]).update(status="assigned", channel="sandbox-a")
    # when
    second = _post(api, HTTP_IDEMPOTENCY_KEY="key-1")
    # then: the stored answer, not the current state
    assert second.status_code == 201
    assert second.json() == first.json()
    assert second.json()["status"] == "pending"


@pytest.mark.django_db
def test_same_key_with_a_different_body_is_422(api):
    # given
    first = _post(api, HTTP_IDEMPOTENCY_KEY="key-1")
    assert first.status_code == 201, first.content
    # when
    second = _post(api, {**BODY, "amount": 2000}, HTTP_IDEMPOTENCY_KEY="key-1")
    # then
    assert second.status_code == 422, second.content
    assert second.json()["error"]["code"] == "idempotency_key_reused"
    assert "Idempotent-Replayed" not in second
    assert Order.objects.count() == 1
    assert Order.objects.get().amount == 1050


@pytest.mark.django_db
def test_a_rejected_body_does_not_use_up_the_key(api):
    # given: a request refused by validation
    bad = _post(api, {**BODY, "amount": "1050"}, HTTP_IDEMPOTENCY_KEY="key-1")
    assert bad.status_code == 400
    # when: the client fixes its body and retries with the same key
    good = _post(api, HTTP_IDEMPOTENCY_KEY="key-1")
    # then
    assert good.status_code == 201, good.content
    assert "Idempotent-Replayed" not in good
    assert Order.objects.count() == 1


def _in_flight(merchant, key: str, *, age_seconds: float) -> IdempotencyKey:
    # The fingerprint is the one the API computes from the validated body (currency upper case).
    return IdempotencyKey.objects.create(
        merchant=merchant,
        key=key,
        request_hash=services.request_fingerprint(BODY),
        state=IdempotencyKey.State.IN_FLIGHT,
        created_at=timezone.now() - timedelta(seconds=age_seconds),
    )


@pytest.mark.django_db
def test_key_still_in_flight_is_409(api, merchant_creds):
    # given: another request holds the key right now
    _in_flight(merchant_creds.merchant, "key-1", age_seconds=0)
    # when
    response = _post(api, HTTP_IDEMPOTENCY_KEY="key-1")
    # then
    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "idempotency_key_in_use"
    assert Order.objects.count() == 0
    assert IdempotencyKey.objects.get().state == IdempotencyKey.State.IN_FLIGHT


@pytest.mark.django_db
def test_stale_in_flight_key_is_taken_over(api, merchant_creds, settings):
    # given: a request that died holding the key, longer ago than the in-flight timeout
    timeout = settings.IDEMPOTENCY_IN_FLIGHT_TIMEOUT_SECONDS
    _in_flight(merchant_creds.merchant, "key-1", age_seconds=timeout + 5)
    # when
    response = _post(api, HTTP_IDEMPOTENCY_KEY="key-1")
    # then
    assert response.status_code == 201, response.content
    assert "Idempotent-Replayed" not in response
    assert Order.objects.count() == 1
    key = IdempotencyKey.objects.get()
    assert key.state == IdempotencyKey.State.DONE
    assert key.stored_answer() == response.json()
    # and the next retry is a plain replay
    replay = _post(api, HTTP_IDEMPOTENCY_KEY="key-1")
    assert replay.status_code == 201
    assert replay["Idempotent-Replayed"] == "true"
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_in_flight_key_just_under_the_timeout_is_not_taken_over(api, merchant_creds, settings):
    timeout = settings.IDEMPOTENCY_IN_FLIGHT_TIMEOUT_SECONDS
    _in_flight(merchant_creds.merchant, "key-1", age_seconds=timeout - 5)

    response = _post(api, HTTP_IDEMPOTENCY_KEY="key-1")

    assert response.status_code == 409, response.content
    assert Order.objects.count() == 0


@pytest.mark.django_db
def test_keys_are_per_merchant(api, other_api, merchant_creds):
    # when: two merchants use the same key with the same body
    mine = _post(api, HTTP_IDEMPOTENCY_KEY="shared-key")
    theirs = _post(other_api, HTTP_IDEMPOTENCY_KEY="shared-key")
    # then: two independent orders, neither a replay
    assert mine.status_code == 201, mine.content
    assert theirs.status_code == 201, theirs.content
    assert "Idempotent-Replayed" not in theirs
    assert mine.json()["id"] != theirs.json()["id"]
    assert Order.objects.filter(merchant=merchant_creds.merchant).count() == 1
    assert Order.objects.filter(merchant=other_api.creds.merchant).count() == 1


@pytest.mark.django_db
def test_another_merchants_in_flight_key_does_not_block(api, other_api):
    _in_flight(other_api.creds.merchant, "shared-key", age_seconds=0)

    response = _post(api, HTTP_IDEMPOTENCY_KEY="shared-key")

    assert response.status_code == 201, response.content


@pytest.mark.django_db
def test_a_day_old_key_survives_the_beat_prune_and_still_replays(api):
    # given: an order created a day ago (SPEC 3: a retry within 24 hours gets the same answer)
    first = _post(api, HTTP_IDEMPOTENCY_KEY="day-old")
    IdempotencyKey.objects.filter(key="day-old").update(created_at=timezone.now() - timedelta(hours=24))
    # when: beat's prune task runs with the deployed configuration
    prune_idempotency_keys()
    # then: the retry is still answered from the stored key, not created again
    retry = _post(api, HTTP_IDEMPOTENCY_KEY="day-old")
    assert retry.status_code == 201, retry.content
    assert retry.json()["id"] == first.json()["id"]
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_pruning_deletes_keys_older_than_the_ttl_and_keeps_newer(merchant_creds, settings):
    # given
    ttl = settings.IDEMPOTENCY_KEY_TTL_HOURS
    now = timezone.now()
    merchant = merchant_creds.merchant
    for key, age in [("old", timedelta(hours=ttl, minutes=1)), ("older", timedelta(days=30))]:
        IdempotencyKey.objects.create(merchant=merchant, key=key, request_hash="h", created_at=now - age)
    for key, age in [("young", timedelta(hours=ttl, minutes=-1)), ("fresh", timedelta(0))]:
        IdempotencyKey.objects.create(merchant=merchant, key=key, request_hash="h", created_at=now - age)
    # when
    deleted = services.idempotency_keys_prune(older_than_hours=ttl)
    # then
    assert deleted == 2
    assert set(IdempotencyKey.objects.values_list("key", flat=True)) == {"young", "fresh"}


@pytest.mark.django_db(transaction=True)
def test_sixteen_concurrent_requests_with_one_key_create_one_order(merchant_creds):
    # given
    threads = 16
    barrier = threading.Barrier(threads)
    answers: list[tuple[int, dict, str | None]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_request() -> None:
        try:
            client = APIClient()
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {merchant_creds.api_key}")
            barrier.wait(timeout=10)
            response = _post(client, HTTP_IDEMPOTENCY_KEY="one-key")
            with lock:
                answers.append((response.status_code, response.json(), response.get("Idempotent-Replayed")))
        except BaseException as exc:
            with lock:
                errors.append(exc)
        finally:
            connection.close()

    workers = [threading.Thread(target=client_request) for _ in range(threads)]
    # when
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    # then
    assert errors == []
    assert len(answers) == threads
    assert Order.objects.count() == 1
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {201, 409}, statuses
    created = [(body, replayed) for status, body, replayed in answers if status == 201]
    assert created, "at least one request must get the order"
    flags = [replayed for _, replayed in created]
    assert flags.count(None) == 1, "exactly one original answer; the others are replays"
    assert set(flags) <= {None, "true"}
    originals = [body for body, replayed in created if replayed is None]
    assert all(body == originals[0] for body, _ in created)
    assert originals[0]["id"] == str(Order.objects.get().pk)
    conflicts = [body for status, body, _ in answers if status == 409]
    assert all(body["error"]["code"] == "idempotency_key_in_use" for body in conflicts)


# --- a stale owner and its successor (issue 10 item 11) -------------------------------------

_BLOCKING_TRIGGER = """
CREATE OR REPLACE FUNCTION test_block_marked_insert() RETURNS trigger AS $$
BEGIN
    -- Only the connection that marked itself waits, on an advisory lock the test holds.
    IF current_setting('test.block_insert', true) = 'on' THEN
        PERFORM pg_advisory_xact_lock(4242);
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER test_block_marked_insert BEFORE INSERT ON orders_order
    FOR EACH ROW EXECUTE FUNCTION test_block_marked_insert();
"""


@pytest.fixture
def insert_gate(transactional_db):
    """A database-side pause: an order INSERT from a marked connection waits until released."""
    from django.db import connections

    holder = connections.create_connection("default")
    with holder.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(4242)")
    with connection.cursor() as cursor:
        cursor.execute(_BLOCKING_TRIGGER)

    def waiting() -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            return cursor.fetchone()[0] > 0

    def release() -> None:
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(4242)")

    yield waiting, release
    release_quietly = holder.cursor()
    release_quietly.execute("SELECT pg_advisory_unlock_all()")
    holder.close()
    with connection.cursor() as cursor:
        cursor.execute("DROP TRIGGER IF EXISTS test_block_marked_insert ON orders_order")
        cursor.execute("DROP FUNCTION IF EXISTS test_block_marked_insert()")


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_stale_owner_failing_late_leaves_its_successors_key_alone(merchant_creds, insert_gate, settings):
    waiting, release = insert_gate
    answers: dict[str, object] = {}

    def stale_request() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET test.block_insert = 'on'")
            client = APIClient()
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {merchant_creds.api_key}")
            answers["a"] = _post(client, HTTP_IDEMPOTENCY_KEY="key-1")
        except BaseException as exc:
            answers["a"] = exc
        finally:
            connection.close()

    # given: request A claimed the key and hangs inside its insert
    a = threading.Thread(target=stale_request)
    a.start()
    _wait_for(waiting, "request A to wait inside its insert")
    # and its claim grew older than the in-flight timeout meanwhile
    IdempotencyKey.objects.filter(key="key-1").update(
        created_at=timezone.now() - timedelta(seconds=settings.IDEMPOTENCY_IN_FLIGHT_TIMEOUT_SECONDS + 5)
    )
    # when: the client's retry B takes the key over and creates the order
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {merchant_creds.api_key}")
    b = _post(client, HTTP_IDEMPOTENCY_KEY="key-1")
    assert b.status_code == 201, b.content
    # and A wakes up, fails on the order B created, and runs its error path
    release()
    a.join(timeout=60)
    assert not a.is_alive()
    assert getattr(answers["a"], "status_code", answers["a"]) == 409
    # then B's completed key survived A's failure: a further retry replays B's answer
    key = IdempotencyKey.objects.get(key="key-1")
    assert key.state == IdempotencyKey.State.DONE
    replay = _post(client, HTTP_IDEMPOTENCY_KEY="key-1")
    assert replay.status_code == 201, replay.content
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.json() == b.json()
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_a_web_host_clock_ahead_of_the_database_does_not_take_over_a_fresh_key(
    api, merchant_creds, monkeypatch
):
    # given: a key claimed a moment ago, on the database's clock (as the API claims it)
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO orders_idempotencykey (merchant_id, key, request_hash, state, created_at)"
            " VALUES (%s, 'key-1', %s, 'in_flight', now())",
            [merchant_creds.merchant.id, services.request_fingerprint(BODY)],
        )
    # and a web host whose own clock runs an hour ahead
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(hours=1))
    # when the retry comes to that host
    response = _post(api, HTTP_IDEMPOTENCY_KEY="key-1")
    # then the key is still in flight: ages are measured on one clock, the database's
    assert response.status_code == 409, response.content
    assert Order.objects.count() == 0
