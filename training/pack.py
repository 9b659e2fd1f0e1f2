"""A packed copy of a catalogue: one blob of JPEG bytes + offsets, labels, titles and the split.

Made to travel: a GPU machine gets the repo and at most 64 MiB beside it, and 35k small JPEGs as files
would be slow to send and to open. `images.bin` holds the original bytes (no re-encoding) and
`meta.json.gz` everything else, including the split computed here, so training there uses the same split.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schema.results import FIELDS
from training.data import Item, ReadReport, fingerprint, read_catalogue, stratified_split

META = "meta.json.gz"
BLOB = "images.bin"
PACK_FORMAT = 1


def is_pack(path: Path) -> bool:
    return (path / META).exists() and (path / BLOB).exists()


@dataclass(frozen=True)
class SplitRecipe:
    val_fraction: float = 0.12
    seed: int = 0
    force_val_ids: tuple[str, ...] = ()
    force_train_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "force_val_ids": list(self.force_val_ids),
            "force_train_ids": list(self.force_train_ids),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitRecipe:
        return cls(
            float(d["val_fraction"]),
            int(d["seed"]),
            tuple(str(x) for x in d.get("force_val_ids", ())),
            tuple(str(x) for x in d.get("force_train_ids", ())),
        )


@dataclass
class Dataset:
    """A catalogue split for training: items, where their bytes come from, and what to record about it."""

    train: list[Item]
    val: list[Item]
    source: Callable[[Item], bytes | str]
    info: dict[str, Any]


def ids_of(data_dirs: Sequence[Path]) -> tuple[str, ...]:
    """The ids of other catalogues (e.g. an evaluation set), to keep out of training."""
    ids: set[str] = set()
    for d in data_dirs:
        items, _ = read_catalogue(d, check_images=False)
        ids.update(it.id for it in items)
    return tuple(sorted(ids, key=int))


def _info(
    data_dir: Path,
    report: ReadReport,
    split: SplitRecipe,
    train: list[Item],
    val: list[Item],
    limit: int | None,
) -> dict[str, Any]:
    return {
        "dataset": data_dir.name,
        "read": report.to_dict(),
        "split": {
            **split.to_dict(),
            "stratified_by": "articleType",
            "limit": limit,
            "n_train": len(train),
            "n_val": len(val),
        },
        "fingerprint_train": fingerprint(train),
        "fingerprint_val": fingerprint(val),
    }


def split_items(
    items: list[Item], split: SplitRecipe, *, limit: int | None = None
) -> tuple[list[Item], list[Item]]:
    """(train, validation) of a catalogue's items by a split recipe; `limit`: the first N by id only."""
    if limit:
        items = sorted(items, key=lambda it: int(it.id))[:limit]
    return stratified_split(
        items,
        val_fraction=split.val_fraction,
        seed=split.seed,
        force_val=split.force_val_ids,
        force_train=split.force_train_ids,
    )


def split_catalogue(
    data_dir: Path, split: SplitRecipe, *, limit: int | None = None
) -> tuple[list[Item], list[Item], ReadReport]:
    items, report = read_catalogue(data_dir)
    train, val = split_items(items, split, limit=limit)
    return train, val, report


def open_catalogue(data_dir: Path, split: SplitRecipe, *, limit: int | None = None) -> Dataset:
    """A catalogue directory (styles.csv + images) as a Dataset."""
    train, val, report = split_catalogue(data_dir, split, limit=limit)
    return Dataset(
        train=train,
        val=val,
        source=lambda it: str(it.image),
        info=_info(data_dir, report, split, train, val, limit),
    )


def write_pack(data_dir: Path, out: Path, split: SplitRecipe, *, limit: int | None = None) -> Path:
    train, val, report = split_catalogue(data_dir, split, limit=limit)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[list[Any]] = []
    offset = 0
    with (out / BLOB).open("wb") as blob:
        for part, items in (("train", train), ("val", val)):
            for it in items:
                data = it.image.read_bytes()
                blob.write(data)
                rows.append([it.id, part, offset, len(data), [it.labels.get(f) for f in FIELDS], it.title])
                offset += len(data)
    meta = {
        "format": PACK_FORMAT,
        "fields": list(FIELDS),
        "info": _info(data_dir, report, split, train, val, limit),
        "rows": rows,
    }
    with gzip.open(out / META, "wt", encoding="utf-8") as fh:
        json.dump(meta, fh)
    return out


def open_pack(path: Path) -> Dataset:
    with gzip.open(path / META, "rt", encoding="utf-8") as fh:
        meta = json.load(fh)
    if meta.get("format") != PACK_FORMAT:
        raise ValueError(f"{path}: pack format {meta.get('format')} is not {PACK_FORMAT}")
    blob = (path / BLOB).read_bytes()
    fields = meta["fields"]
    where: dict[str, tuple[int, int]] = {}
    parts: dict[str, list[Item]] = {"train": [], "val": []}
    for item_id, part, offset, length, values, title in meta["rows"]:
        where[item_id] = (offset, length)
        labels = dict(zip(fields, values, strict=True))
        parts[part].append(Item(id=item_id, image=path / BLOB, labels=labels, title=title))

    def source(it: Item) -> bytes:
        off, length = where[it.id]
        return blob[off : off + length]

    return Dataset(train=parts["train"], val=parts["val"], source=source, info=dict(meta["info"]))
