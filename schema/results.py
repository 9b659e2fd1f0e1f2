"""Value types that flow between pipeline stages and into the table."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

FIELDS: tuple[str, ...] = (
    "gender",
    "baseColour",
    "season",
    "usage",
    "articleType",
    "masterCategory",
    "subCategory",
)
# Fields with a head of their own; the other two are derived from articleType.
HEAD_FIELDS: tuple[str, ...] = ("gender", "baseColour", "season", "usage", "articleType")
DERIVED_FIELDS: tuple[str, ...] = ("masterCategory", "subCategory")
# Keys a listing (backfill, local folder) treats as images; events are trusted whatever the suffix.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class Status(StrEnum):
    OK = "ok"
    FAILED_FETCH = "failed_fetch"
    FAILED_DECODE = "failed_decode"
    FAILED_INFER = "failed_infer"
    FAILED_LIMIT = "failed_limit"
    # The service itself could not end the job (its row refused, the worker failing on it): see `error`.
    FAILED_WORKER = "failed_worker"


# S3 names the version of an object written while versioning was off or suspended "null": a literal that
# every such write of the key shares, so it identifies no bytes (the ETag does).
NULL_VERSION_ID = "null"


def real_version_id(value: str | None) -> str | None:
    """A version id that names these bytes, else None (absent, empty, or S3's shared "null")."""
    return None if value in (None, "", NULL_VERSION_ID) else value


def bare_etag(value: str | None) -> str | None:
    """An ETag without the quotes S3 puts around it in headers and listings; None when absent."""
    return (value or "").strip('"') or None


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One object to enrich: what an S3 event, a listing or a local folder names."""

    bucket: str
    key: str
    version_id: str | None = None
    etag: str | None = None
    size: int | None = None
    sequencer: str | None = None

    @property
    def sort_sequencer(self) -> str | None:
        """S3 sequencers of one key compare as hex strings once left-padded to one length."""
        return self.sequencer.upper().rjust(32, "0") if self.sequencer else None

    @property
    def object_version(self) -> str:
        """The identity of these bytes: S3 version id, else ETag, else empty (unversioned, unknown)."""
        return self.version_id or (self.etag or "").strip('"')


@dataclass(frozen=True, slots=True)
class FieldPrediction:
    value: str | None  # None: below the field's confidence threshold ("unknown")
    confidence: float
    top_k: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ImagePrediction:
    fields: dict[str, FieldPrediction]
    caption: str
    caption_confidence: float


@dataclass(slots=True)
class EnrichmentResult:
    """Exactly one per job: either a prediction or a failure status with its reason."""

    ref: ObjectRef
    status: Status
    model_name: str
    model_version: str
    error: str | None = None
    prediction: ImagePrediction | None = None
    content_sha256: str | None = None
    size: int | None = None
    last_modified: datetime | None = None  # of the fetched object version
    width: int | None = None
    height: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
