"""Batch augmentations on the device, applied after the shared `preprocess_array`.

They run on the GPU over a whole batch (no per-image Python), and aim at what differs between catalogue
photos and what users upload: framing (zoom in/out, shift, aspect), resolution (a lower-resolution source
upscaled), exposure. Colour hue is left alone: baseColour is a label.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(
    n: int, low: float, high: float, device: torch.device, gen: torch.Generator | None
) -> torch.Tensor:
    return torch.rand(n, device=device, generator=gen) * (high - low) + low


def augment(
    x: torch.Tensor,
    *,
    gen: torch.Generator | None = None,
    zoom: tuple[float, float] = (0.85, 1.25),
    aspect: tuple[float, float] = (0.9, 1.1),
    low_res_p: float = 0.3,
    low_res_scale: tuple[float, float] = (0.35, 0.8),
) -> torch.Tensor:
    """uint8 or float (0..255) NCHW -> augmented float (0..255) NCHW of the same size."""
    x = x.float()
    n, _, h, w = x.shape
    dev = x.device
    # Framing: one affine map per image (output -> input coordinates, so scale < 1 zooms in).
    z = _uniform(n, *zoom, dev, gen)
    a = torch.exp(_uniform(n, math.log(aspect[0]), math.log(aspect[1]), dev, gen))
    sx, sy = 1.0 / (z * a.sqrt()), 1.0 / (z / a.sqrt())
    flip = torch.where(torch.rand(n, device=dev, generator=gen) < 0.5, -1.0, 1.0)
    tx = (torch.rand(n, device=dev, generator=gen) * 2 - 1) * (1 - sx).abs() * 0.5
    ty = (torch.rand(n, device=dev, generator=gen) * 2 - 1) * (1 - sy).abs() * 0.5
    zeros = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx * flip, zeros, tx], 1), torch.stack([zeros, sy, ty], 1)], 1)
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    # Border padding: product photos are shot on a plain background, so the edge colour continues it.
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Resolution: a random subset is shrunk and blown up again, as a low-resolution upload would be.
    if low_res_p > 0:
        r = float(_uniform(1, *low_res_scale, dev, gen).item())
        small = F.interpolate(x, size=(max(8, round(h * r)), max(8, round(w * r))), mode="area")
        blurred = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        pick = (torch.rand(n, device=dev, generator=gen) < low_res_p).view(n, 1, 1, 1)
        x = torch.where(pick, blurred, x)
    # Exposure: mild brightness and contrast.
    bright = _uniform(n, 0.9, 1.1, dev, gen).view(n, 1, 1, 1)
    contrast = _uniform(n, 0.9, 1.1, dev, gen).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * bright
    return x.clamp_(0, 255)
