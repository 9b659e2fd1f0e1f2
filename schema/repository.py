"""Keyword-only functions over the enrichments table. Callers own the session and the transaction."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Select, Table, column, func, select, table, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from schema.results import FIELDS, EnrichmentResult, FieldPrediction, ImagePrediction, ObjectRef, Status
from schema.tables import FIELD_COLUMNS, LATEST_VIEW, Enrichment

_latest_view = table(LATEST_VIEW, column("id"), column("bucket"), column("key"))


def result_to_row(result: EnrichmentResult) -> dict[str, Any]:
    ref = result.ref
    row: dict[str, Any] = {
        "bucket": ref.bucket,
        "key": ref.key,
        "object_version": ref.object_version,
        "version_id": ref.version_id,
        "etag": ref.etag.strip('"') if ref.etag else None,
        "size": result.size if result.size is not None else ref.size,
        "sequencer": ref.sort_sequencer,
        "object_last_modified": result.last_modified,
        "content_sha256": result.content_sha256,
        "width": result.width,
        "height": result.height,
        "status": result.status.value,
        "error": result.error,
        "model_name": result.model_name,
        "model_version": result.model_version,
        "timings_ms": result.timings_ms or None,
        "caption": None,
        "caption_confidence": None,
        "top_k": None,
    }
    for name in FIELD_COLUMNS.values():
        row[name] = None
        row[f"{name}_confidence"] = None
    prediction = result.prediction
    if prediction is not None:
        row["caption"] = prediction.caption
        row["caption_confidence"] = prediction.caption_confidence
        row["top_k"] = {
            name: [[label, round(p, 5)] for label, p in fp.top_k] for name, fp in prediction.fields.items()
        }
        for field_name, fp in prediction.fields.items():
            column = FIELD_COLUMNS[field_name]
            row[column] = fp.value
            row[f"{column}_confidence"] = fp.confidence
    return row


# Columns an upsert never overwrites with NULL (see upsert_enrichments).
_KEPT_WHEN_NULL: tuple[str, ...] = ("sequencer", "object_last_modified")


def upsert_enrichments(*, session: Session, results: Sequence[EnrichmentResult]) -> int:
    """Write a batch in one round trip. Returns how many rows were inserted or changed.

    Idempotent on (bucket, key, object_version, model_version): a duplicate never overwrites an `ok`
    row, so an image is enriched once per model version, while a retry may replace an earlier failure.

    One single-row statement executed for many parameter sets (psycopg pipelines them), not one
    statement with a VALUES row per image: that one had to be compiled by SQLAlchemy and parsed by psycopg
    afresh for every batch, 0.9 ms of the worker's CPU per image.
    """
    if not results:
        return 0
    rows = _dedupe_rows([result_to_row(r) for r in results])
    enrichments = cast(Table, Enrichment.__table__)
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert_fn(enrichments)
    excluded = statement.excluded
    updatable = [c for c in rows[0] if c not in ("bucket", "key", "object_version", "model_version")]
    statement = statement.on_conflict_do_update(
        index_elements=["bucket", "key", "object_version", "model_version"],
        set_={
            **{column: excluded[column] for column in updatable},
            # What orders this version among the key's versions is a fact about the bytes, not the try:
            # a retry or a backfill (no event, so no sequencer; a failed fetch, no LastModified) keeps it.
            **{column: func.coalesce(excluded[column], enrichments.c[column]) for column in _KEPT_WHEN_NULL},
            "attempts": enrichments.c.attempts + 1,
            "updated_at": func.now(),  # the clock the insert used (SQLite: UTC wall time)
        },
        where=enrichments.c.status != Status.OK.value,
    )
    cursor = session.connection().execute(statement, rows)
    return int(getattr(cursor, "rowcount", 0) or 0)


def _dedupe_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One statement may not touch the same row twice: keep the best outcome per identity."""
    best: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for row in rows:
        identity = (row["bucket"], row["key"], row["object_version"], row["model_version"])
        kept = best.get(identity)
        if kept is None or (kept["status"] != Status.OK.value and row["status"] == Status.OK.value):
            best[identity] = row
    return list(best.values())


def already_enriched(*, session: Session, refs: Iterable[ObjectRef], model_version: str) -> set[ObjectRef]:
    """Refs that already have an `ok` row for this model version: skip them before spending GPU time."""
    wanted = {(r.bucket, r.key, r.object_version): r for r in refs}
    if not wanted:
        return set()
    identity = tuple_(Enrichment.bucket, Enrichment.key, Enrichment.object_version)
    found = session.execute(
        select(Enrichment.bucket, Enrichment.key, Enrichment.object_version).where(
            identity.in_(list(wanted)),
            Enrichment.model_version == model_version,
            Enrichment.status == Status.OK.value,
        )
    )
    return {wanted[(b, k, v)] for b, k, v in found}


def ok_predictions_by_content(
    *, session: Session, digests: Iterable[str], model_name: str, model_version: str
) -> dict[str, ImagePrediction]:
    """The stored prediction of this model for each digest that already has an ok row: identical bytes
    (another key, a re-uploaded version, a copy in another bucket) need no second forward pass."""
    wanted = sorted(set(digests))
    if not wanted:
        return {}
    rows = session.scalars(
        select(Enrichment).where(
            Enrichment.content_sha256.in_(wanted),
            Enrichment.model_name == model_name,
            Enrichment.model_version == model_version,
            Enrichment.status == Status.OK.value,
        )
    )
    found: dict[str, ImagePrediction] = {}
    for row in rows:
        if row.content_sha256 is not None and row.content_sha256 not in found:
            found[row.content_sha256] = row_to_prediction(row)
    return found


def row_to_prediction(row: Enrichment) -> ImagePrediction:
    """The inverse of result_to_row's prediction columns (alternatives as stored: 5 decimals)."""
    top_k = row.top_k or {}
    fields = {
        name: FieldPrediction(
            value=getattr(row, column),
            confidence=float(getattr(row, f"{column}_confidence") or 0.0),
            top_k=tuple((str(label), float(p)) for label, p in top_k.get(name, [])),  # type: ignore[arg-type]
        )
        for name, column in FIELD_COLUMNS.items()
    }
    return ImagePrediction(
        fields=fields, caption=row.caption or "", caption_confidence=float(row.caption_confidence or 0.0)
    )


def without_rows(*, session: Session, refs: Iterable[ObjectRef], model_version: str) -> list[ObjectRef]:
    """Refs with no row at all (of any status) for this model version: jobs that never reached an end."""
    wanted = {(r.bucket, r.key, r.object_version): r for r in refs}
    if not wanted:
        return []
    identity = tuple_(Enrichment.bucket, Enrichment.key, Enrichment.object_version)
    found = set(
        session.execute(
            select(Enrichment.bucket, Enrichment.key, Enrichment.object_version).where(
                identity.in_(list(wanted)), Enrichment.model_version == model_version
            )
        ).tuples()
    )
    return [ref for identity_, ref in wanted.items() if identity_ not in found]


@dataclass(frozen=True, slots=True)
class EnrichmentQuery:
    """Filters of `enrich query`; every value reaches SQL as a bound parameter."""

    equals: dict[str, str] = field(default_factory=dict)  # field name (as in FIELDS) -> value
    min_confidence: float | None = None
    status: str | None = None  # a Status value, or "failed" for every failure
    since: datetime | None = None
    until: datetime | None = None
    bucket: str | None = None
    key_prefix: str | None = None
    model_version: str | None = None
    all_versions: bool = False
    limit: int = 100


def build_query(query: EnrichmentQuery, dialect: str = "postgresql") -> Select[Enrichment]:
    conditions: list[ColumnElement[bool]] = []
    if not query.all_versions:
        # Correlated on (bucket, key), the view's partition: the database evaluates the view for the key of
        # each candidate row only (an index lookup), where `id IN (SELECT id FROM view)` ranked every row of
        # the table first: 11 s per `enrich query` on a million rows, 0.1 s now (docs/benchmarks.md).
        latest = (
            select(_latest_view.c.id)
            .where(_latest_view.c.bucket == Enrichment.bucket, _latest_view.c.key == Enrichment.key)
            .scalar_subquery()
        )
        conditions.append(Enrichment.id == latest)
    for field_name, value in query.equals.items():
        if field_name not in FIELDS:
            raise ValueError(f"unknown field {field_name!r}; choose from {', '.join(FIELDS)}")
        conditions.append(getattr(Enrichment, FIELD_COLUMNS[field_name]) == value)
    if query.min_confidence is not None:
        # On the filtered fields; with no filter, every field must be that confident.
        for field_name in query.equals or FIELDS:
            column = getattr(Enrichment, f"{FIELD_COLUMNS[field_name]}_confidence")
            conditions.append(column >= query.min_confidence)
    if query.status == "failed":
        conditions.append(Enrichment.status != Status.OK.value)
    elif query.status:
        conditions.append(Enrichment.status == query.status)
    if query.since:
        conditions.append(Enrichment.updated_at >= query.since)
    if query.until:
        conditions.append(Enrichment.updated_at < query.until)
    if query.bucket:
        conditions.append(Enrichment.bucket == query.bucket)
    if query.key_prefix:
        conditions.extend(_key_starts_with(query.key_prefix, dialect))
    if query.model_version:
        conditions.append(Enrichment.model_version == query.model_version)
    return (
        select(Enrichment)
        .where(*conditions)
        .order_by(Enrichment.updated_at.desc(), Enrichment.id.desc())
        .limit(query.limit)
    )


def query_enrichments(*, session: Session, query: EnrichmentQuery) -> list[Enrichment]:
    return list(session.scalars(build_query(query, session.get_bind().dialect.name)))


def key_range(prefix: str) -> tuple[str, str | None]:
    """The keys that start with `prefix` are exactly [low, high) in code-point order (high None: no
    bound), where high is the prefix with its last character incremented: an index range, unlike LIKE."""
    stem = prefix
    while stem:
        last = ord(stem[-1])
        if last < 0x10FFFF:
            # Surrogates are not characters: UTF-8 (and so the database) cannot hold them.
            successor = 0xE000 if 0xD800 <= last + 1 <= 0xDFFF else last + 1
            return prefix, stem[:-1] + chr(successor)
        stem = stem[:-1]
    return prefix, None


def _key_starts_with(prefix: str, dialect: str) -> list[ColumnElement[bool]]:
    if dialect not in ("postgresql", "sqlite"):
        return [Enrichment.key.startswith(prefix, autoescape=True)]
    # Compared in code-point order, which index ix_enrichments_key_codepoint (migration 0005) keeps:
    # Postgres's "C" collation; SQLite's default already is.
    key = Enrichment.key.collate("C") if dialect == "postgresql" else Enrichment.key
    low, high = key_range(prefix)
    return [key >= low] if high is None else [key >= low, key < high]
