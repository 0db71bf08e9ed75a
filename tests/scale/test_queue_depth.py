"""The queue-depth gauge reads the broker, not CACHE_URL's Redis (SPEC 12: rate limits and caches
may live on a Redis of their own). The Sentinel and RabbitMQ brokers are scraped in test_scale."""

import pytest

from core.broker import queue_depths
from core.redis import get_broker_redis, get_redis


@pytest.fixture
def apart(settings):
    """The broker on the test Redis, the cache on a Redis that is not there."""
    settings.CELERY_BROKER_URL = settings.REDIS_URL
    settings.CACHE_URL = "redis://127.0.0.1:1/0"
    settings.SERVICE_QUEUES = ("depth-test-q1", "depth-test-q2")
    get_redis.cache_clear()
    get_broker_redis.cache_clear()
    yield get_broker_redis()
    get_redis.cache_clear()
    get_broker_redis.cache_clear()


def test_queue_depth_reads_the_brokers_redis_when_the_cache_is_elsewhere(apart):
    broker = apart
    broker.delete("depth-test-q1", "depth-test-q2")
    try:
        broker.rpush("depth-test-q1", "a", "b", "c")
        assert queue_depths() == {"depth-test-q1": 3, "depth-test-q2": 0}
    finally:
        broker.delete("depth-test-q1")


def test_a_rabbitmq_broker_has_no_redis_to_read(settings):
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
    get_broker_redis.cache_clear()
    try:
        assert get_broker_redis() is None
    finally:
        get_broker_redis.cache_clear()
