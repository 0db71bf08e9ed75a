"""What the broker holds: messages waiting in each service queue, on Redis, Sentinel or RabbitMQ.

Read by /metrics and the dashboard (the `celery_queue_depth` gauge), and by the beat sweeps, which
hold off re-announcing into a queue that is already deep (orders/services.py).
"""

from amqp.exceptions import AMQPError
from django.conf import settings
from kombu.exceptions import KombuError

# A RabbitMQ broker that cannot be reached (the Redis ones raise redis.RedisError).
BROKER_ERRORS = (OSError, KombuError, AMQPError)

# kombu's Redis transport keeps one list per queue and priority step; the plain name is step 0.
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (3, 6, 9)


def redis_queue_keys(queue: str) -> tuple[str, ...]:
    """The Redis lists that hold a queue's waiting messages on a Redis or Sentinel broker."""
    return (queue, *(f"{queue}{_KOMBU_PRIORITY_SEP}{step}" for step in _KOMBU_PRIORITY_STEPS))


def queue_depths() -> dict[str, int]:
    """Messages waiting in each service's Celery queue, read from the broker (SPEC 12): Redis list
    lengths on a Redis or Sentinel broker, a passive queue declare on RabbitMQ. Raises
    redis.RedisError or one of BROKER_ERRORS."""
    from core.redis import get_broker_redis

    queues = tuple(settings.SERVICE_QUEUES)
    client = get_broker_redis()
    if client is None:
        return _amqp_queue_depths(queues)
    keys = {queue: redis_queue_keys(queue) for queue in queues}
    pipe = client.pipeline(transaction=False)
    for key in (key for per_queue in keys.values() for key in per_queue):
        pipe.llen(key)
    lengths = iter(pipe.execute())
    return {queue: sum(next(lengths) for _ in per_queue) for queue, per_queue in keys.items()}


def _amqp_queue_depths(queues: tuple[str, ...]) -> dict[str, int]:
    from celery import current_app

    depths = {}
    with current_app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1)
        for queue in queues:
            # a channel per queue: a passive declare of a queue not declared yet closes its channel
            with conn.channel() as channel:
                try:
                    depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                except conn.channel_errors:
                    depths[queue] = 0
    return depths
