"""Items -> tensors: decoded, preprocessed images (uint8) and label / token targets."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from schema.results import DERIVED_FIELDS, HEAD_FIELDS
from training.data import Item, load_rgb
from worker.model.config import PreprocessConfig
from worker.model.preprocess import preprocess_image
from worker.model.tokenizer import TitleCodec

IGNORE = -100  # target of a missing or unknown label: no loss, counted as wrong in evaluation

Source = bytes | str  # JPEG bytes (packed data) or a file path


def _decode_chunk(args: tuple[list[Source], PreprocessConfig]) -> np.ndarray:
    sources, pre = args
    h, w = pre.input_size
    out = np.empty((len(sources), 3, h, w), dtype=np.uint8)
    for i, src in enumerate(sources):
        image = load_rgb(src if isinstance(src, bytes) else open(src, "rb").read())  # noqa: SIM115
        out[i] = preprocess_image(image, pre).numpy()
    return out


def decode_images(
    sources: Sequence[Source],
    pre: PreprocessConfig,
    *,
    workers: int = 0,
    chunk: int = 256,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Decode + preprocess (the serving function) every image -> uint8 N x 3 x H x W, in worker processes."""
    workers = workers or min(16, os.cpu_count() or 1)
    parts = [list(sources[i : i + chunk]) for i in range(0, len(sources), chunk)]
    arrays: list[np.ndarray] = []
    if workers <= 1 or len(parts) <= 1:
        for p in parts:
            arrays.append(_decode_chunk((p, pre)))
            if progress:
                progress(len(p))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for p, arr in zip(parts, pool.map(_decode_chunk, [(p, pre) for p in parts]), strict=True):
                arrays.append(arr)
                if progress:
                    progress(len(p))
    if not arrays:
        return torch.empty((0, 3, *pre.input_size), dtype=torch.uint8)
    return torch.from_numpy(np.concatenate(arrays))


def build_labels(items: Sequence[Item]) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """Head label sets (sorted) and the articleType -> derived-field mapping (majority) seen in `items`."""
    labels = {f: sorted({v for it in items if (v := it.labels.get(f)) is not None}) for f in HEAD_FIELDS}
    derived: dict[str, dict[str, str]] = {}
    for f in DERIVED_FIELDS:
        votes: dict[str, Counter[str]] = {}
        for it in items:
            art, val = it.labels.get("articleType"), it.labels.get(f)
            if art is not None and val is not None:
                votes.setdefault(art, Counter())[val] += 1
        derived[f] = {art: c.most_common(1)[0][0] for art, c in sorted(votes.items())}
        for art in labels["articleType"]:
            derived[f].setdefault(art, "Unknown")  # an articleType seen without this field
    return labels, derived


@dataclass
class Targets:
    labels: dict[str, torch.Tensor]  # HEAD_FIELDS -> long (N,), IGNORE where missing/unknown
    tokens: torch.Tensor  # long (N, max_tokens): title ids + EOS, padded with IGNORE
    has_title: torch.Tensor  # bool (N,)


def build_targets(
    items: Sequence[Item], labels: dict[str, list[str]], codec: TitleCodec, max_tokens: int
) -> Targets:
    index = {f: {v: i for i, v in enumerate(vals)} for f, vals in labels.items()}
    out = {
        f: torch.tensor([index[f].get(it.labels.get(f) or "", IGNORE) for it in items], dtype=torch.long)
        for f in HEAD_FIELDS
    }
    tokens = torch.full((len(items), max_tokens), IGNORE, dtype=torch.long)
    has_title = torch.zeros(len(items), dtype=torch.bool)
    for i, it in enumerate(items):
        if it.title:
            ids = codec.encode(it.title, max_tokens)
            tokens[i, : len(ids)] = torch.tensor(ids)
            has_title[i] = True
    return Targets(labels=out, tokens=tokens, has_title=has_title)


def decoder_inputs(tokens: torch.Tensor, bos: int, pad: int) -> torch.Tensor:
    """Teacher forcing: BOS followed by the targets shifted right (IGNORE -> pad)."""
    shifted = torch.cat([torch.full_like(tokens[:, :1], bos), tokens[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == IGNORE, pad)
