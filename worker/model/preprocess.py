"""Image -> network input, shared by training, evaluation and serving so they cannot drift.

The CPU part (`preprocess_array`) only resizes and returns uint8; the float conversion and the
mean/std normalisation (`normalize`) run on the device, where they are nearly free and where a uint8
batch is a quarter of the bytes to copy. The module does not import torch at run time: decoding worker
processes import it, and each would otherwise pay torch's import time and memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from worker.model.config import PreprocessConfig

if TYPE_CHECKING:
    import torch

_RESAMPLE = Image.Resampling.BICUBIC


def _fit(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of `size` (w, h) scaled to fit inside `box` (h, w), keeping the aspect ratio."""
    w, h = size
    scale = min(box[0] / h, box[1] / w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def fit_size(size: tuple[int, int], pre: PreprocessConfig) -> tuple[int, int]:
    """(h, w) an image of `size` (h, w) is resized to before any letterbox padding."""
    if pre.resize == "stretch":
        return pre.input_size
    if pre.resize != "letterbox":
        raise ValueError(f"unknown resize mode {pre.resize!r}")
    w, h = _fit((size[1], size[0]), pre.input_size)
    return h, w


def reduce_detail(image: Image.Image, detail_size: tuple[int, int] | None) -> Image.Image:
    """Shrink an image larger than `detail_size` (h, w) to fit inside it; smaller ones pass unchanged."""
    if detail_size is None:
        return image
    w, h = image.size
    if h <= detail_size[0] and w <= detail_size[1]:
        return image
    # reducing_gap lets Pillow box-reduce by an integer factor first: a 1800x2400 photo costs ~2 ms, not ~60.
    return image.resize(_fit(image.size, detail_size), _RESAMPLE, reducing_gap=2.0)


def resize_to_input(image: Image.Image, pre: PreprocessConfig) -> Image.Image:
    """Resize (and pad, for letterbox) an RGB image to exactly pre.input_size."""
    out_h, out_w = pre.input_size
    new_h, new_w = fit_size((image.height, image.width), pre)
    resized = (
        image if (new_w, new_h) == image.size else image.resize((new_w, new_h), _RESAMPLE, reducing_gap=2.0)
    )
    if (new_w, new_h) == (out_w, out_h):
        return resized
    canvas = Image.new("RGB", (out_w, out_h), (pre.fill, pre.fill, pre.fill))
    canvas.paste(resized, ((out_w - new_w) // 2, (out_h - new_h) // 2))
    return canvas


def upscales(size: tuple[int, int], pre: PreprocessConfig) -> bool:
    """Whether an image of `size` (h, w), already at its level of detail, is enlarged (on no axis shrunk)
    on its way to the input: the resize worker/model/upscale.py can do on the device instead."""
    new_h, new_w = fit_size(size, pre)
    return (new_h, new_w) != size and new_h >= size[0] and new_w >= size[1]


def preprocess_array(image: Image.Image, pre: PreprocessConfig, *, defer_upscale: bool = False) -> np.ndarray:
    """An RGB PIL image -> uint8 array (3, H, W) at the network's input size; with `defer_upscale`, an
    image to be enlarged stays at its own size, smaller than the input (worker/model/upscale.py finishes
    it on the device)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = reduce_detail(image, pre.detail_size)
    if not (defer_upscale and upscales((image.height, image.width), pre)):
        image = resize_to_input(image, pre)
    # A copy in C order, always writable (a 1-pixel-wide transpose would otherwise be a read-only view).
    return np.array(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1), order="C")


def normalize(
    batch: torch.Tensor,
    pre: PreprocessConfig,
    dtype: torch.dtype | None = None,
    memory_format: torch.memory_format | None = None,
) -> torch.Tensor:
    """uint8 (or float 0..255) NCHW on the device -> normalised by the config's mean/std, in `dtype`
    (float32 by default) and `memory_format` (the input's by default).

    The arithmetic runs in float32 and is rounded to `dtype` once: a bf16 mean such as 0.485 * 255 would be
    off by a quarter of a grey level, and bf16 arithmetic with per-channel tensors takes a slow path on the
    CPU (3x the time of the float32 passes). The layout change rides on the first copy. bf16 moves half the
    bytes; its rounding is the one a bf16 network's first convolution would apply to a float32 input."""
    import torch  # here, not at the top: decoding processes import this module and never need torch

    # A copy even from float32: normalised in place below, and the caller's batch stays as it was.
    x = batch.to(torch.float32, memory_format=memory_format or torch.preserve_format, copy=True)
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1) * 255.0
    x = x.sub_(mean).div_(std)
    return x if dtype in (None, torch.float32) else x.to(dtype)
