"""`enrich status`: where the work stands, from the broker and the table (what an operator checks first)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import redis
from rich.console import Group
from rich.table import Table
from rich.text import Text
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from schema.settings import Settings
from schema.tables import Enrichment

# kombu's Redis transport keeps every delivered, unacknowledged message in this hash (its default
# `unacked_key`), each value a JSON [message, exchange, routing key]: the routing key is our queue.
UNACKED_HASH = "unacked"


@dataclass(frozen=True, slots=True)
class QueueStatus:
    queue: str
    waiting: int  # the Redis list KEDA measures
    held: int  # delivered to a worker, not yet acknowledged: in a batch, or waiting out a retry's countdown


@dataclass(frozen=True, slots=True)
class TableStatus:
    since: datetime
    written_since: int
    latest_write: datetime | None
    # (model name, model version, status) -> rows, the latest model version first
    counts: dict[tuple[str, str, str], int]


def queue_status(settings: Settings) -> QueueStatus:
    client = redis.Redis.from_url(settings.broker_url)
    try:
        waiting = int(client.llen(settings.queue))
        entries = cast(list[bytes], client.hvals(UNACKED_HASH))
        held = sum(1 for entry in entries if _routing_key(entry) == settings.queue)
    finally:
        client.close()
    return QueueStatus(settings.queue, waiting, held)


def _routing_key(entry: bytes) -> str | None:
    try:
        return str(json.loads(entry)[2])
    except (ValueError, IndexError, TypeError):
        return None


def table_status(session: Session, since: datetime) -> TableStatus:
    written_since, latest_write = session.execute(
        select(func.count(), func.max(Enrichment.updated_at)).where(Enrichment.updated_at >= since)
    ).one()
    groups = list(
        session.execute(
            select(
                Enrichment.model_name,
                Enrichment.model_version,
                Enrichment.status,
                func.count(),
                func.max(Enrichment.updated_at),
            ).group_by(Enrichment.model_name, Enrichment.model_version, Enrichment.status)
        )
    )
    version_latest: dict[tuple[str, str], datetime] = {}
    for name, version, _status, _n, latest in groups:
        version_latest[name, version] = max(latest, version_latest.get((name, version), latest))
    groups.sort(key=lambda g: (g[2] != "ok", g[2]))  # ok first, then the failures by name
    groups.sort(key=lambda g: (version_latest[g[0], g[1]], g[0], g[1]), reverse=True)  # stable
    counts = {(name, version, status): int(n) for name, version, status, n, _latest in groups}
    return TableStatus(since, int(written_since), latest_write, counts)


def to_json(queue: QueueStatus, table: TableStatus) -> str:
    versions: dict[tuple[str, str], dict[str, int]] = {}
    for (name, version, status), n in table.counts.items():
        versions.setdefault((name, version), {})[status] = n
    document: dict[str, Any] = {
        "queue": {"name": queue.queue, "waiting": queue.waiting, "held": queue.held},
        "written_since": {
            "since": table.since.isoformat(),
            "rows": table.written_since,
            "latest": table.latest_write.isoformat() if table.latest_write else None,
        },
        "models": [
            {"model_name": name, "model_version": version, "rows": by_status}
            for (name, version), by_status in versions.items()
        ],
    }
    return json.dumps(document) + "\n"


def to_rich(queue: QueueStatus, table: TableStatus) -> Group:
    lines: Iterable[Text | Table] = [
        Text(
            f"queue '{queue.queue}': {queue.waiting:,} waiting (what KEDA scales on), "
            f"{queue.held:,} held by workers (in a batch or a retry's countdown)"
        ),
        Text(
            f"rows written since {table.since:%Y-%m-%d %H:%M:%S %Z}: {table.written_since:,}"
            + (f" (latest {table.latest_write:%Y-%m-%d %H:%M:%S %Z})" if table.latest_write else "")
        ),
    ]
    rows = Table("model", "version", "status", "rows", title="rows by model version and status")
    for (name, version, status), n in table.counts.items():
        rows.add_row(name, version, status, f"{n:,}")
    return Group(*lines, rows)
