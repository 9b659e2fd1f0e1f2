"""Items -> tensors: decoded, preprocessed images (uint8) and label / token targets."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from schema.results import DERIVED_FIELDS, HEAD_FIELDS
from training.data import Item
from worker.decode import DecodeError, decode_to_input
from worker.model.config import PreprocessConfig
from worker.model.tokenizer import TitleCodec

IGNORE = -100  # target of a missing or unknown label: no loss, counted as wrong in evaluation

Source = bytes | str  # JPEG bytes (packed data) or a file path
_TRUSTED_MAX_PIXELS = 1_000_000_000  # a training catalogue is the user's own data, not a stranger's upload


def _init_worker() -> None:
    # Decoding workers never need more than their one core (torch is imported, but unused, here).
    torch.set_num_threads(1)


def _decode_chunk(args: tuple[list[Source], PreprocessConfig]) -> tuple[np.ndarray, list[int]]:
    """The chunk's pixels, and the indices of the images that could not be read or decoded (left zero):
    one empty, truncated or mislabelled file in a catalogue must not end a whole training run."""
    sources, pre = args
    h, w = pre.input_size
    out = np.zeros((len(sources), 3, h, w), dtype=np.uint8)
    bad = []
    for i, src in enumerate(sources):
        try:
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            out[i] = decode_to_input(data, pre=pre, max_pixels=_TRUSTED_MAX_PIXELS).pixels
        except (DecodeError, OSError):
            bad.append(i)
    return out, bad


def _decode_into(args: tuple[str, tuple[int, ...], int, list[Source], PreprocessConfig]) -> list[int]:
    """Worker: decode a chunk straight into the shared output file (pickling arrays back is slow)."""
    path, shape, start, sources, pre = args
    out = np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
    pixels, bad = _decode_chunk((sources, pre))
    out[start : start + len(sources)] = pixels
    out.flush()
    del out
    return [start + i for i in bad]


@dataclass(frozen=True)
class Decoded:
    images: torch.Tensor  # uint8 N x 3 x H x W; an undecodable image's slot is zero
    undecodable: list[int]  # indices into the sources

    def kept(self, items: Sequence[Item]) -> tuple[list[Item], torch.Tensor]:
        """`items` and their images without the undecodable ones."""
        if not self.undecodable:
            return list(items), self.images
        drop = set(self.undecodable)
        keep = [i for i in range(len(items)) if i not in drop]
        return [items[i] for i in keep], self.images[keep]


def decode_images(
    sources: Sequence[Source],
    pre: PreprocessConfig,
    *,
    workers: int = 0,
    chunk: int = 256,
    progress: Callable[[int], None] | None = None,
) -> Decoded:
    """Decode + preprocess (the serving function) every image -> uint8 N x 3 x H x W, in worker processes."""
    workers = workers or min(16, os.cpu_count() or 1)
    shape = (len(sources), 3, *pre.input_size)
    if len(sources) == 0:
        return Decoded(torch.empty(shape, dtype=torch.uint8), [])
    starts = range(0, len(sources), chunk)
    undecodable: list[int] = []
    if workers <= 1 or len(starts) <= 1:
        arrays = []
        for i in starts:
            pixels, bad = _decode_chunk((list(sources[i : i + chunk]), pre))
            arrays.append(pixels)
            undecodable += [i + j for j in bad]
            if progress:
                progress(len(pixels))
        return Decoded(torch.from_numpy(np.concatenate(arrays)), undecodable)
    with tempfile.TemporaryDirectory(prefix="enrich-decode-") as tmp:
        path = str(Path(tmp) / "images.u8")
        np.memmap(path, dtype=np.uint8, mode="w+", shape=shape).flush()
        jobs = [(path, shape, i, list(sources[i : i + chunk]), pre) for i in starts]
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
            for job, bad in zip(jobs, pool.map(_decode_into, jobs), strict=True):
                undecodable += bad
                if progress:
                    progress(len(job[3]))
        images = torch.from_numpy(np.array(np.memmap(path, dtype=np.uint8, mode="r", shape=shape)))
        return Decoded(images, undecodable)


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
