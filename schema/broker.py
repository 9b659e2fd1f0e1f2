"""kombu's Redis transport with one Redis client per connection pool instead of one per command.

kombu's Redis channel builds a new `redis.Redis` for every command it sends outside the consumer's BRPOP
(`Channel.conn_or_acquire`): the unacknowledged-message record when a task is delivered, its removal on
ack, every publish. Building one costs ~0.2 ms of Python on the development CPU (redis-py re-creates its
~170-entry response-callback table each time: redis-py issue #3624), so a worker paid ~0.4 ms of its one
GIL per image and ingest ~0.2 ms per event, for nothing. A Redis client is safe to share between threads
(each command checks a connection out of the pool; pipelines stay per use), so the channel keeps one and
builds a new one only when its pool is replaced (after a connection reset).
"""

from __future__ import annotations

from typing import Any

import redis.exceptions
from kombu.transport import redis as kombu_redis

# For Celery's `broker_transport`: a class path, which kombu resolves itself.
TRANSPORT = "schema.broker:Transport"


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if getattr(self.connection, "client", None) is None:
            # Celery (5.7) collects a lost broker connection, which drops the transport's settings, and then
            # closes it; closing the channel restores its unacknowledged messages through a new client,
            # which then failed with an AttributeError that Celery treats as fatal: a worker holding
            # messages died on a Redis restart. As a connection error the close goes on, and the messages
            # come back after the visibility timeout, as from any dead connection.
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        if asynchronous:  # the consumer's own BRPOP client, which kombu already keeps (`Channel.client`)
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel
