"""Pillow's bicubic upscale, run on the model's device: the last step of preprocessing moved off the CPU.

A 60x80 catalogue photo (and a full-size photo, once reduced to the bundle's detail size) is upscaled to the
network's 256x192 input: 0.5 of a decoding process's 0.6 ms of CPU per catalogue photo, and a pipe carrying
147 kB instead of 14 kB. On a GPU worker the decoders are among what one machine's cores run out of, so
there they hand over the small image and the device does the upscale as two small matrix products with
Pillow's own fixed-point weights (libImaging/Resample.c), each pass rounded and clipped to 0..255 as
Pillow's 8-bit path does. In float64 every product and sum of those integers is exact, so the result is
Pillow's, bit for bit. On the CPU the same products cost more than Pillow's resize, so CPU serving keeps
Pillow's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from worker.model.config import PreprocessConfig
from worker.model.preprocess import fit_size

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point weights for 8-bit images (libImaging/Resample.c)


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@lru_cache(maxsize=64)
def bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of Pillow's BICUBIC weights for one axis (precompute_coeffs, then
    normalize_coeffs_8bpc): each an integer over 2**22, so exact in float64."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = [_bicubic((x - center + 0.5) / filterscale) for x in range(xmin, xmax)]
        total = sum(taps)
        if total:
            weights[xx, xmin:xmax] = [tap / total for tap in taps]
    one = float(1 << _PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(weights * one - 0.5), np.trunc(weights * one + 0.5))
    return fixed / one


@lru_cache(maxsize=64)
def _device_weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """bicubic_weights on the device, copied there once per size rather than once per batch."""
    return torch.from_numpy(bicubic_weights(in_size, out_size)).to(device)


def _round_to_uint8_range(x: torch.Tensor) -> torch.Tensor:
    return x.add_(0.5).floor_().clamp_(0.0, 255.0)


def upscale(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 NCHW -> uint8 N x C x size (h, w), Pillow's BICUBIC resize of each image, bit for bit."""
    n, c, h, w = batch.shape
    out_h, out_w = size
    # float64, not float32: a 24-bit mantissa rounds some sums of weight x pixel, and a tie then lands one
    # grey level off Pillow's integer arithmetic. The products are small (~15 MFLOP per image).
    x = batch.to(torch.float64)
    if out_w != w:  # horizontal pass first, as Pillow
        x = _round_to_uint8_range(torch.matmul(x, _device_weights(w, out_w, x.device).T))
    if out_h != h:
        wh = _device_weights(h, out_h, x.device)
        x = _round_to_uint8_range(torch.matmul(wh, x.reshape(n * c, h, out_w))).view(n, c, out_h, out_w)
    return x.to(torch.uint8)


def assemble(pixels: Sequence[torch.Tensor], pre: PreprocessConfig, device: torch.device) -> torch.Tensor:
    """The network's uint8 NCHW input batch on `device` from decoded images: each either at the input size
    already or smaller (its upscale and letterbox deferred by `preprocess_array(..., defer_upscale=True)`)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(pixels):
        groups.setdefault((image.shape[1], image.shape[2]), []).append(i)
    if len(groups) == 1:  # the usual batch: one catalogue's photos, all one size
        return _to_input([*pixels], pre, device)
    batch = torch.empty((len(pixels), 3, *pre.input_size), dtype=torch.uint8, device=device)
    for indices in groups.values():
        batch[torch.tensor(indices, device=device)] = _to_input([pixels[i] for i in indices], pre, device)
    return batch


def _to_input(images: list[torch.Tensor], pre: PreprocessConfig, device: torch.device) -> torch.Tensor:
    """Same-size uint8 CHW images -> uint8 NCHW at the input size on `device`."""
    stacked = torch.stack(images)
    x = stacked.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else stacked.to(device)
    size = (x.shape[2], x.shape[3])
    if size == pre.input_size:
        return x
    new_h, new_w = fit_size(size, pre)
    x = upscale(x, (new_h, new_w))
    if (new_h, new_w) == pre.input_size:
        return x
    out_h, out_w = pre.input_size
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    canvas = x.new_full((x.shape[0], 3, out_h, out_w), pre.fill)
    canvas[:, :, top : top + new_h, left : left + new_w] = x
    return canvas
