"""`enrich status`: where the work stands, from the broker and the table (what an operator checks first)."""

from __future__ import annotations

import json
import time
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
# `unacked_key`), each value a JSON [message, exchange, routing key]: the routing key is our queue. Its
# `unacked_index` sorted set scores each delivery tag with the time it was delivered.
UNACKED_HASH = "unacked"
UNACKED_INDEX = "unacked_index"


@dataclass(frozen=True, slots=True)
class HeldJob:
    what: str  # the task's argsrepr: s3://bucket/key
    held_s: float  # since it was delivered


@dataclass(frozen=True, slots=True)
class QueueStatus:
    queue: str
    waiting: int  # the Redis list KEDA measures
    held: int  # delivered to a worker, not yet acknowledged: in a batch, or waiting out a retry's countdown
    longest_held: list[HeldJob]  # the jobs held longest, longest first: what a stuck worker sits on


@dataclass(frozen=True, slots=True)
class TableStatus:
    since: datetime
    written_since: int
    latest_write: datetime | None
    # (model name, model version, status) -> rows, the latest model version first
    counts: dict[tuple[str, str, str], int]


def queue_status(settings: Settings, *, longest: int = 5) -> QueueStatus:
    client = redis.Redis.from_url(settings.broker_url)
    try:
        waiting = int(client.llen(settings.queue))
        entries = cast(dict[bytes, bytes], client.hgetall(UNACKED_HASH))
        mine = {tag: entry for tag, entry in entries.items() if _field(entry, 2) == settings.queue}
        delivered = (
            cast(list[float | None], client.zmscore(UNACKED_INDEX, [tag.decode() for tag in mine]))
            if mine
            else []
        )
    finally:
        client.close()
    now = time.time()
    held = [
        HeldJob(str(_field(entry, 0, "headers", "argsrepr")), now - when)
        for entry, when in zip(mine.values(), delivered, strict=True)
        if when is not None
    ]
    held.sort(key=lambda job: job.held_s, reverse=True)
    return QueueStatus(settings.queue, waiting, len(mine), held[:longest])


def _field(entry: bytes, *path: int | str) -> object:
    """A value inside one unacked entry, or None where it has none (a message not sent by Celery)."""
    try:
        value: Any = json.loads(entry)
        for step in path:
            value = value[step]
        return value
    except (ValueError, LookupError, TypeError):
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
        "queue": {
            "name": queue.queue,
            "waiting": queue.waiting,
            "held": queue.held,
            "longest_held": [{"job": job.what, "held_s": round(job.held_s, 1)} for job in queue.longest_held],
        },
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
    lines: list[Text | Table] = [
        Text(
            f"queue '{queue.queue}': {queue.waiting:,} waiting (what KEDA scales on), "
            f"{queue.held:,} held by workers (in a batch or a retry's countdown)"
        ),
        Text(
            f"rows written since {table.since:%Y-%m-%d %H:%M:%S %Z}: {table.written_since:,}"
            + (f" (latest {table.latest_write:%Y-%m-%d %H:%M:%S %Z})" if table.latest_write else "")
        ),
    ]
    if queue.longest_held:
        lines.append(
            Text(
                "held longest: "
                + ", ".join(f"{job.what} ({job.held_s:,.0f} s)" for job in queue.longest_held)
            )
        )
    rows = Table("model", "version", "status", "rows", title="rows by model version and status")
    for (name, version, status), n in table.counts.items():
        rows.add_row(name, version, status, f"{n:,}")
    return Group(*lines, rows)
