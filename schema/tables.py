"""SQLAlchemy 2.0 tables. The table is the product: one row per (image version, model version)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from schema.results import FIELDS

# SQL column names are snake_case so that users can query them unquoted in Postgres.
FIELD_COLUMNS: dict[str, str] = {
    "gender": "gender",
    "baseColour": "base_colour",
    "season": "season",
    "usage": "usage",
    "articleType": "article_type",
    "masterCategory": "master_category",
    "subCategory": "sub_category",
}
assert tuple(FIELD_COLUMNS) == FIELDS

JsonType = JSON().with_variant(JSONB(), "postgresql")
# The latest row per (bucket, key): the newest object version (LastModified, then sequencer, over all the
# version's rows), then the newest write of it. A view made by the migrations (0003), so SQL users and
# `enrich query` share one definition.
LATEST_VIEW = "enrichments_latest"


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Enrichment(Base):
    __tablename__ = "enrichments"
    __table_args__ = (
        # The idempotency key: a redelivered task or a duplicate event lands on the same row.
        UniqueConstraint("bucket", "key", "object_version", "model_version", name="uq_enrichment_identity"),
        Index("ix_enrichments_bucket_key", "bucket", "key"),
        Index("ix_enrichments_status", "status"),
        Index("ix_enrichments_updated_at", "updated_at"),
        Index("ix_enrichments_article_type", "article_type"),
        # Identical bytes are enriched once: the worker reuses an ok row's prediction (migration 0004).
        Index(
            "ix_enrichments_content_sha256_model",
            "content_sha256",
            "model_name",
            "model_version",
            postgresql_where=text("status = 'ok'"),
            sqlite_where=text("status = 'ok'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    # Long enough for a local folder path, which `enrich run` records as the bucket.
    bucket: Mapped[str] = mapped_column(String(1024))
    key: Mapped[str] = mapped_column(String(1024))
    # version id, else ETag, else '' : which bytes were enriched.
    object_version: Mapped[str] = mapped_column(String(1024), default="")
    version_id: Mapped[str | None] = mapped_column(String(1024))
    etag: Mapped[str | None] = mapped_column(String(255))
    size: Mapped[int | None] = mapped_column(BigInteger)
    # Orders versions of one key: the event's sequencer (padded), else the object's LastModified.
    sequencer: Mapped[str | None] = mapped_column(String(64))
    object_last_modified: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)

    status: Mapped[str] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)

    gender: Mapped[str | None] = mapped_column(String(64))
    gender_confidence: Mapped[float | None] = mapped_column(Float)
    base_colour: Mapped[str | None] = mapped_column(String(64))
    base_colour_confidence: Mapped[float | None] = mapped_column(Float)
    season: Mapped[str | None] = mapped_column(String(64))
    season_confidence: Mapped[float | None] = mapped_column(Float)
    usage: Mapped[str | None] = mapped_column(String(64))
    usage_confidence: Mapped[float | None] = mapped_column(Float)
    article_type: Mapped[str | None] = mapped_column(String(128))
    article_type_confidence: Mapped[float | None] = mapped_column(Float)
    master_category: Mapped[str | None] = mapped_column(String(64))
    master_category_confidence: Mapped[float | None] = mapped_column(Float)
    sub_category: Mapped[str | None] = mapped_column(String(64))
    sub_category_confidence: Mapped[float | None] = mapped_column(Float)
    top_k: Mapped[dict[str, list[list[object]]] | None] = mapped_column(JsonType)
    caption: Mapped[str | None] = mapped_column(Text)
    caption_confidence: Mapped[float | None] = mapped_column(Float)

    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    timings_ms: Mapped[dict[str, float] | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
