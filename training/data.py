"""Reading a catalogue in the Kaggle "Fashion Product Images" layout, and the held-out split.

Layout: `styles.csv` (id, gender, masterCategory, subCategory, articleType, baseColour, season, year, usage,
productDisplayName) and `images/<id>.jpg` (or `<id>.jpg` beside styles.csv). The original file has lines
whose title contains unquoted commas; those are repaired (the extra fields are the title's), not dropped.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from schema.results import FIELDS

COLUMNS: tuple[str, ...] = (
    "id",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
)
TITLE = "productDisplayName"
UNDECODABLE = "image undecodable"  # the skip reason of a row whose image decoding rejects


@dataclass(frozen=True)
class Item:
    id: str
    image: Path
    labels: dict[str, str | None]  # FIELDS -> value, None where the row has none
    title: str | None


class CatalogueError(ValueError):
    """DATA_DIR cannot be read as a catalogue (no styles.csv, an empty one, no id column), or leaves nothing
    to work on: the commands end in this one line, not a traceback."""


@dataclass
class ReadReport:
    rows: int = 0  # data lines seen
    kept: int = 0
    repaired: int = 0  # lines with extra commas in the title, joined back
    not_utf8: int = 0  # lines read as Windows-1252 instead
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count
    missing_values: Counter[str] = field(default_factory=Counter)  # column -> rows kept without it

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.rows} rows kept"]
        if self.repaired:
            parts.append(f"{self.repaired} repaired (commas in the title)")
        if self.not_utf8:
            parts.append(f"{self.not_utf8} read as Windows-1252 (not UTF-8)")
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()))
        if self.missing_values:
            parts.append(
                "missing values: " + ", ".join(f"{c} {n}" for c, n in self.missing_values.most_common())
            )
        return "; ".join(parts)

    def to_dict(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "repaired": self.repaired,
            "not_utf8": self.not_utf8,
            "skipped": dict(self.skipped),
            "missing_values": dict(self.missing_values),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReadReport:
        """The inverse of to_dict (a pack's or a bundle's record; keys older records lack count 0)."""
        return cls(
            rows=int(d.get("rows", 0)),
            kept=int(d.get("kept", 0)),
            repaired=int(d.get("repaired", 0)),
            not_utf8=int(d.get("not_utf8", 0)),
            skipped=Counter(d.get("skipped") or {}),
            missing_values=Counter(d.get("missing_values") or {}),
        )

    def drop(self, reason: str, n: int) -> None:
        """Count n kept rows as skipped after all, for `reason` (an image found undecodable later)."""
        self.skipped[reason] += n
        self.kept -= n


def image_path(data_dir: Path, item_id: str) -> Path:
    nested = data_dir / "images" / f"{item_id}.jpg"
    return nested if nested.exists() else data_dir / f"{item_id}.jpg"


def _clean(value: str) -> str | None:
    value = value.strip()
    return value if value and value.upper() not in {"NA", "NAN", "NULL"} else None


def _text_lines(path: Path, report: ReadReport) -> list[str]:
    """The file's lines as text: UTF-8 (a BOM dropped), else the line read as Windows-1252 and counted."""
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines()):
        try:
            lines.append(raw.decode("utf-8-sig" if number == 0 else "utf-8"))
        except UnicodeDecodeError:
            lines.append(raw.decode("cp1252", errors="replace"))
            if number:
                report.not_utf8 += 1
    return lines


def _fields(line: str) -> list[str] | None:
    """One line's fields, or None where a quoted field is left open (a stray quote: csv would take the rest of
    the line as that field's text). A quote inside an unquoted field (`Levis Men 32" Jeans`) is plain text to
    csv, so counting quotes is not the test: a strict parse is, and one that fails only for lack of a closing
    quote marks the open field."""
    try:
        return next(csv.reader([line], strict=True))
    except csv.Error:
        pass
    try:
        next(csv.reader([line + '"'], strict=True))
    except csv.Error:
        return next(csv.reader([line]))  # a quote closed mid-field (`"Puma Men" Red`): read as csv always did
    return None


def read_catalogue(data_dir: Path, *, check_images: bool = True) -> tuple[list[Item], ReadReport]:
    """All usable rows of DATA_DIR/styles.csv, and a report of what was repaired or skipped and why."""
    report = ReadReport()
    items: list[Item] = []
    seen: set[str] = set()
    styles = data_dir / "styles.csv"
    try:
        lines = iter(_text_lines(styles, report))
    except OSError as error:  # no such file, a folder, no permission
        raise CatalogueError(f"{styles}: {error.strerror or error}") from None
    first = next(lines, None)
    if first is None:
        raise CatalogueError(f"{styles} is empty")
    # A spreadsheet's export starts with a BOM and may change the headers' case.
    header = [h.strip().lower() for h in next(csv.reader([first]), [])]
    col = {name: header.index(name.lower()) for name in COLUMNS if name.lower() in header}
    if "id" not in col:
        raise CatalogueError(f"{styles} has no 'id' column (its first line: {first[:80]!r})")
    # One physical line is one row: a stray quote must not swallow the lines after it.
    for line in lines:
        if not line.strip():
            continue
        report.rows += 1
        raw = _fields(line)
        if raw is None:
            report.skipped["unbalanced quote"] += 1
            continue
        if not any(x.strip() for x in raw):
            report.skipped["no values"] += 1
            continue
        if len(raw) < len(header):
            report.skipped["too few columns"] += 1
            continue
        if len(raw) > len(header):
            # Only the title is free text: the extra fields belong to it.
            title_at = col.get(TITLE, len(header) - 1)
            extra = len(raw) - len(header)
            raw = [
                *raw[:title_at],
                ",".join(raw[title_at : title_at + extra + 1]),
                *raw[title_at + extra + 1 :],
            ]
            report.repaired += 1
        item_id = raw[col["id"]].strip()
        if not item_id.isdigit():
            report.skipped["bad id"] += 1
            continue
        if item_id in seen:
            report.skipped["duplicate id"] += 1
            continue
        path = image_path(data_dir, item_id)
        if check_images and not path.exists():
            report.skipped["image missing"] += 1
            continue
        labels: dict[str, str | None] = {}
        for f in FIELDS:
            labels[f] = _clean(raw[col[f]]) if f in col else None
            if labels[f] is None:
                report.missing_values[f] += 1
        title = _clean(raw[col[TITLE]]) if TITLE in col else None
        if title is None:
            report.missing_values[TITLE] += 1
        seen.add(item_id)
        items.append(Item(id=item_id, image=path, labels=labels, title=title))
    report.kept = len(items)
    return items, report


def stratified_split(
    items: list[Item],
    *,
    val_fraction: float,
    seed: int,
    force_val: Iterable[str] = (),
    force_train: Iterable[str] = (),
) -> tuple[list[Item], list[Item]]:
    """Deterministic split stratified by articleType: round(val_fraction * n) of each class with at least two
    items (classes of one item stay in training), chosen by a seeded shuffle of the ids in sorted order.
    Ids in `force_val` always go to validation (e.g. the products of an evaluation set), those in
    `force_train` never (e.g. what the bundle a run starts from trained on: validation must be unseen)."""
    forced = set(force_val)
    by_class: dict[str, list[Item]] = defaultdict(list)
    for it in sorted(items, key=lambda x: int(x.id)):
        by_class[it.labels.get("articleType") or ""].append(it)
    rng = np.random.default_rng(seed)
    val_ids: set[str] = set()
    for cls in sorted(by_class):
        members = by_class[cls]
        order = rng.permutation(len(members))
        n_val = round(val_fraction * len(members)) if len(members) >= 2 else 0
        val_ids.update(members[i].id for i in order[:n_val])
    val_ids = (val_ids | (forced & {it.id for it in items})) - set(force_train)
    train = [it for it in items if it.id not in val_ids]
    val = [it for it in items if it.id in val_ids]
    return train, val


def fingerprint(items: Iterable[Item]) -> str:
    """sha256 over the rows used (id, labels, title): two trainings on the same data share it."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda x: int(x.id)):
        values = [it.id, *(it.labels.get(f) or "" for f in FIELDS), it.title or ""]
        h.update(("\x1f".join(values) + "\n").encode())
    return h.hexdigest()
