"""The broker transport on the real Redis: Celery's messages flow as with kombu's own, and its Redis
clients are built once per pool, not once per command."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from schema.queue import celery_config
from schema.settings import Settings
from tests.conftest import REDIS_URL


@pytest.fixture
def clients_built(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    built: list[int] = []
    init = redis.Redis.__init__

    def counting(self: redis.Redis, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", counting)
    yield built


def test_publishing_consuming_and_acking_reuse_one_redis_client(
    queue_name: str, clients_built: list[int]
) -> None:
    app = Celery("broker-check")
    app.conf.update(celery_config(Settings(broker_url=REDIS_URL, queue=queue_name)))
    with app.connection_for_write() as conn:
        producer = app.amqp.Producer(conn)
        for i in range(40):
            app.send_task("enrich.object", args=[{"key": str(i)}], queue=queue_name, producer=producer)
        queue = conn.SimpleQueue(queue_name, no_ack=False)
        keys, tags = [], []
        for _ in range(40):
            message = queue.get(timeout=5)  # delivered: kombu records it as unacknowledged ...
            keys.append(message.decode()[0][0]["key"])
            tags.append(message.delivery_tag)
            message.ack()  # ... and removes the record here
        queue.close()
    assert sorted(keys) == sorted(str(i) for i in range(40))
    client = redis.Redis.from_url(REDIS_URL)
    assert client.llen(queue_name) == 0
    assert not any(client.hexists("unacked", tag) for tag in tags)  # every ack landed
    client.close()
    # kombu's own channel builds one per publish, delivery and ack (~120 here, ~0.2 ms of Python each).
    assert len(clients_built) <= 6, len(clients_built)


def test_a_non_redis_broker_keeps_kombus_transport() -> None:
    assert "broker_transport" not in celery_config(Settings(broker_url="amqp://guest@127.0.0.1//"))
