"""The broker contract shared by ingest (which sends) and worker (which consumes)."""

from __future__ import annotations

import socket
from typing import Any

from schema import broker
from schema.results import ObjectRef
from schema.settings import Settings


def keepalive_options() -> dict[int, int]:
    """Idle 10 s, then a probe every 5 s; the third unanswered probe closes the connection (Linux's names;
    elsewhere the system's defaults apply)."""
    wanted = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


def celery_config(settings: Settings) -> dict[str, Any]:
    redis = settings.broker_url.split("://", 1)[0] in ("redis", "rediss")
    return {
        "broker_url": settings.broker_url,
        # kombu's Redis transport, sharing one client instead of building one per command (schema/broker.py).
        **({"broker_transport": broker.TRANSPORT} if redis else {}),
        "task_default_queue": settings.queue,
        # The Redis list KEDA measures is the queue name; keep every task on it.
        "task_create_missing_queues": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        # Ack after the row is committed; a killed worker's messages come back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Hold few messages beyond the running ones, so KEDA's LLEN sees the real backlog.
        "worker_prefetch_multiplier": 1,
        # A retry is a message with an ETA, held unacknowledged until due, and Celery raises the prefetch
        # for each one it holds: uncapped, a worker retrying through an outage drains the whole list into
        # its memory, and KEDA, reading 0, scales the fleet down. Capped at what the worker runs at once.
        "worker_eta_task_limit": settings.effective_concurrency,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for a dead worker's unacknowledged messages every 10 s (kombu's default scans only
            # every 10th sweep, so they would come back up to 100 s after the visibility timeout).
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # A broker that vanishes without closing the connection: a command's reply is given up on
            # after the socket timeout (a connection error, retried on a new connection), an idle
            # connection is probed by TCP keepalives (dead after ~25 s), and kombu drops a consumer's BRPOP
            # that stays unanswered for brpop_timeout + health_check_interval (about 11-21 s, not 26-51).
            "socket_timeout": settings.broker_socket_timeout_s,
            "socket_connect_timeout": settings.broker_socket_timeout_s,
            "socket_keepalive": True,
            "socket_keepalive_options": keepalive_options(),
            "health_check_interval": 10,
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


# Set by the worker on a retried message: the attempts the image itself has spent (transient fetch and pool
# failures). Celery's own counter (`request.retries`) counts every retry, the free ones for a database
# outage or a worker-side failure too, so it cannot say when the image's attempts are used up. A new
# message (an event, a backfill, `enrich retry`) starts without it, at zero.
ATTEMPTS_SPENT = "attempts_spent"


def ref_to_message(ref: ObjectRef) -> dict[str, Any]:
    return {
        "bucket": ref.bucket,
        "key": ref.key,
        "version_id": ref.version_id,
        "etag": ref.etag,
        "size": ref.size,
        "sequencer": ref.sequencer,
    }


def ref_from_message(message: dict[str, Any]) -> ObjectRef:
    return ObjectRef(
        bucket=str(message["bucket"]),
        key=str(message["key"]),
        version_id=message.get("version_id"),
        etag=message.get("etag"),
        size=message.get("size"),
        sequencer=message.get("sequencer"),
    )
