"""Rows of the enrichments table as a rich table, CSV or JSON lines."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from schema.results import FIELDS
from schema.tables import FIELD_COLUMNS, Enrichment


def row_to_dict(row: Enrichment) -> dict[str, Any]:
    """The public JSON shape of one image: each field as {"value", "confidence"}."""
    document: dict[str, Any] = {
        "bucket": row.bucket,
        "key": row.key,
        "object_version": row.object_version,
        "status": row.status,
        "error": row.error,
        "caption": row.caption,
        "caption_confidence": _round(row.caption_confidence),
        "model_name": row.model_name,
        "model_version": row.model_version,
        "size": row.size,
        "width": row.width,
        "height": row.height,
        "content_sha256": row.content_sha256,
        "attempts": row.attempts,
        "updated_at": row.updated_at.isoformat() if row.updated_at else None,
    }
    for field_name in FIELDS:
        column = FIELD_COLUMNS[field_name]
        document[field_name] = {
            "value": getattr(row, column),
            "confidence": _round(getattr(row, f"{column}_confidence")),
        }
    document["top_k"] = row.top_k
    document["timings_ms"] = row.timings_ms
    return document


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def to_json_lines(rows: Sequence[Enrichment]) -> str:
    return "".join(json.dumps(row_to_dict(row), ensure_ascii=False) + "\n" for row in rows)


def to_csv(rows: Sequence[Enrichment]) -> str:
    buffer = io.StringIO()
    columns = ["bucket", "key", "status", "error", "caption", "model_version"]
    for field_name in FIELDS:
        columns += [field_name, f"{field_name}_confidence"]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        document = row_to_dict(row)
        for field_name in FIELDS:
            prediction = document.pop(field_name)
            document[field_name] = prediction["value"]
            document[f"{field_name}_confidence"] = prediction["confidence"]
        writer.writerow(document)
    return buffer.getvalue()


def to_table(rows: Sequence[Enrichment], *, title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False)
    for name in (
        "key",
        "status",
        "caption",
        "gender",
        "articleType",
        "baseColour",
        "season",
        "usage",
        "sub/master",
    ):
        table.add_column(name, overflow="fold")
    for row in rows:
        if row.status != "ok":
            table.add_row(row.key, f"[red]{row.status}[/red]", row.error or "", *[""] * 6)
            continue
        table.add_row(
            row.key,
            "ok",
            row.caption or "",
            _cell(row.gender, row.gender_confidence),
            _cell(row.article_type, row.article_type_confidence),
            _cell(row.base_colour, row.base_colour_confidence),
            _cell(row.season, row.season_confidence),
            _cell(row.usage, row.usage_confidence),
            f"{row.sub_category or '?'} / {row.master_category or '?'}",
        )
    return table


def _cell(value: str | None, confidence: float | None) -> str:
    shown = value if value is not None else "[dim]unknown[/dim]"
    return f"{shown} ({confidence:.2f})" if confidence is not None else shown
