"""Kombu's Redis transport, with one Redis client per channel instead of one per command.

Kombu 5.7's Redis channel builds a new `redis.Redis` object for every publish and every ack
(`Channel.conn_or_acquire` calls `_create_client()` each time), and redis-py 8 fills a table of
about 165 response callbacks, upper-casing each key, in every `Redis.__init__`
(redis/redis-py#3624, still open). Measured with py-spy during `make bench`: 5 % of the gateway
worker's CPU went to building those clients. A `redis.Redis` object holds no connection of its
own (each command borrows one from the channel's pool) and is safe to share, so the channel
keeps one. The asynchronous client the consumer polls with is untouched.
"""

from kombu.transport import redis


class Channel(redis.Channel):
    def _create_client(self, asynchronous=False):
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self.__dict__.get("_shared_client")
        # A channel whose pool was replaced (closed and reopened) gets a client on the new pool.
        if client is None or client.connection_pool is not self.pool:
            client = self.__dict__["_shared_client"] = super()._create_client()
        return client


class Transport(redis.Transport):
    Channel = Channel


# --- the broker chosen by its URL (SPEC 12) ------------------------------------------------------

REDIS_SCHEMES = ("redis", "rediss")
SENTINEL_SCHEMES = ("sentinel",)
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


def broker_scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def broker_settings(
    url: str, *, sentinel_master: str, visibility_timeout: int, queues: tuple[str, ...]
) -> dict[str, object]:
    """The CELERY_* settings that depend on the kind of broker `url` names.

    - redis:// and rediss://: kombu's Redis transport with our one-client-per-channel fix above
      (rediss:// verifies the server's certificate; kombu's default would not).
    - sentinel://h1:p;sentinel://h2:p: kombu's Sentinel transport, master `sentinel_master`. Its
      clients are sentinel-managed and re-resolve the master after a failover; the fix above is
      for the plain Redis channel only, so it is not used here.
    - amqp://: RabbitMQ with quorum queues (replicated, durable) and publisher confirms: a
      publish returns once the broker has the message. Quorum queues take no priorities and no
      global QoS (Celery turns global QoS off when it sees them, worker_detect_quorum_queues).
    """
    from django.core.exceptions import ImproperlyConfigured
    from kombu import Queue

    scheme = broker_scheme(url)
    redis_options = {
        # An unacked message comes back after this long if its worker died; longer than any task.
        "visibility_timeout": visibility_timeout,
        # Every restore round (kombu: each 10 s) looks for such messages. kombu 5.7 scans only every
        # 10th round by default, which gives a dead worker's message back up to 100 s after its
        # timeout; a scan is one ZRANGE on the unacked index per worker, cheap each 10 s.
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
    }
    if scheme in REDIS_SCHEMES:
        result: dict[str, object] = {
            "CELERY_BROKER_TRANSPORT": "config.broker:Transport",
            "CELERY_BROKER_TRANSPORT_OPTIONS": redis_options,
            "CELERY_TASK_QUEUES": [Queue(name) for name in queues],
        }
        if scheme == "rediss":
            import ssl

            result["CELERY_BROKER_USE_SSL"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        return result
    if scheme in SENTINEL_SCHEMES:
        return {
            "CELERY_BROKER_TRANSPORT": None,
            "CELERY_BROKER_TRANSPORT_OPTIONS": {
                **redis_options,
                "master_name": sentinel_master,
                # the connections to the sentinels themselves: one dead sentinel costs 2 s, not a hang
                "sentinel_kwargs": {"socket_connect_timeout": 2, "socket_timeout": 2},
            },
            "CELERY_TASK_QUEUES": [Queue(name) for name in queues],
        }
    if scheme in AMQP_SCHEMES:
        return {
            "CELERY_BROKER_TRANSPORT": None,
            "CELERY_BROKER_TRANSPORT_OPTIONS": {"confirm_publish": True},
            "CELERY_TASK_QUEUES": [
                Queue(name, queue_arguments={"x-queue-type": "quorum"}) for name in queues
            ],
            "CELERY_TASK_DEFAULT_QUEUE_TYPE": "quorum",
        }
    raise ImproperlyConfigured(
        f"CELERY_BROKER_URL: unsupported scheme {scheme!r}; use redis://, rediss://, sentinel:// or amqp://"
    )
