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
