"""Inference-time rewrites of the network: fewer, larger operations, the same predictions.

1. `fold_batch_norms`: in eval mode a BatchNorm is a fixed per-channel affine map, so it can live in the
   weights and bias of the convolution before it. Unfolded, it is a separate pass over every activation.
2. `fuse_conv_activations` (CPU only): a convolution and the ReLU6 after it become one oneDNN call with the
   clamp as a post-op, the call PyTorch's own compiler (inductor) emits for this pattern. A clamp on its
   own is a full read and write of the activation; on a CPU that memory traffic costs as much as the
   depthwise convolutions themselves. The tf_ variants' asymmetric "same" padding is expressed in the
   kernel (one zero tap) rather than as a padded copy of the input (`ConvReLU6._same`).

On the development CPU (2 cores, bf16, batch 64) the default model's backbone ran 60 images/s as trained,
92 folded and 140 folded and fused (docs/benchmarks.md). torch.compile fuses the same and more, but reached
118 images/s after compiling for 40 s per batch shape (over 15 minutes with dynamic shapes): too slow to
start for a worker that serves ragged batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import pairwise
from typing import cast

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

logger = logging.getLogger(__name__)


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    with torch.no_grad():
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
    conv.bias = nn.Parameter(bias.detach().to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What remains of a norm layer once its affine map is folded: timm's BatchNormAct2d keeps its
    activation (its dropout is a no-op in eval mode); a plain BatchNorm2d leaves nothing."""
    act = getattr(bn, "act", None)
    return act if isinstance(act, nn.Module) else nn.Identity()


def _neighbours(
    network: nn.Module,
) -> Iterator[tuple[nn.Module, tuple[str, nn.Module], tuple[str, nn.Module]]]:
    """(parent, first, second) for every two children registered one after the other, which in timm's
    blocks is the order they are called in. Both rewrites are for inference only."""
    if network.training:
        raise ValueError("inference rewrites are for networks in eval mode")
    for parent in list(network.modules()):
        for first, second in pairwise(list(parent.named_children())):
            yield parent, first, second


def fold_batch_norms(network: nn.Module) -> int:
    """Fold, in place, every BatchNorm2d that directly follows a Conv2d among its parent's children (the
    order timm's blocks register and call them in: conv, norm, conv, norm). Returns how many were folded.
    For inference only: the folded network no longer normalises by batch statistics when training."""
    folded = 0
    for parent, (_, conv), (norm_name, norm) in _neighbours(network):
        if (
            isinstance(conv, nn.Conv2d)
            and isinstance(norm, nn.BatchNorm2d)
            and norm.num_features == conv.out_channels
        ):
            _fold_into(conv, norm)
            setattr(parent, norm_name, _after_norm(norm))
            folded += 1
    return folded


def _pointwise_conv_available() -> bool:
    return hasattr(torch.ops.mkldnn, "_convolution_pointwise") and torch.backends.mkldnn.is_available()


def _onednn_bf16() -> bool:
    """Whether oneDNN convolves in bf16 on this CPU: AVX512BW/VL/DQ or AVX-NE-CONVERT. Without them (an
    AVX2-only CPU) the fused call raises for bf16 input, where PyTorch's own convolution still runs."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class ConvReLU6(nn.Module):
    """A convolution followed by ReLU6 as one oneDNN call (CPU, inference only)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        # "same" padding of the tf_ variants depends on the input size: worked out per call.
        self.pad_same = isinstance(conv, Conv2dSame)
        self.kernel = list(conv.kernel_size)
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.padding = [0, 0] if self.pad_same else list(conv.padding)
        self.groups = conv.groups
        # Weights with a zero first tap along (rows, columns), keyed by those flags, dtype and device.
        self._shifted: dict[tuple[bool, bool, torch.dtype, torch.device], torch.Tensor] = {}

    def _same(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Input, weight and symmetric padding that compute timm's "same" padding without padding x.

        "Same" pads (total // 2, total - total // 2): asymmetric when the total is odd, as for every
        stride-2 convolution on an even-sized map. The fused call takes only symmetric padding, and a
        padded copy of the input (plus the convolution over its odd, unaligned shape) cost more than the
        convolution itself here. An odd total t is instead a symmetric (t + 1) // 2 with the kernel one tap
        longer, its first tap zero: the extra position reads the extra padding and adds nothing.
        """
        if self.dilation != [1, 1]:  # not in any tf_ EfficientNet-Lite; the padded copy stays correct
            return pad_same(x, self.kernel, self.stride, self.dilation), self.weight, [0, 0]
        totals = [
            max((-(-size // s) - 1) * s + k - size, 0)
            for size, k, s in zip(x.shape[-2:], self.kernel, self.stride, strict=True)
        ]
        odd = (totals[0] % 2 == 1, totals[1] % 2 == 1)
        if not any(odd):
            return x, self.weight, [t // 2 for t in totals]
        key = (*odd, self.weight.dtype, self.weight.device)
        weight = self._shifted.get(key)
        if weight is None:
            weight = F.pad(self.weight, (int(odd[1]), 0, int(odd[0]), 0))
            self._shifted[key] = weight
        return x, weight, [(t + 1) // 2 for t in totals]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op has no autocast rule and needs input and weights in one dtype (a no-op when they are).
        x = x.to(self.weight.dtype)
        weight: torch.Tensor = self.weight
        padding = self.padding
        if self.pad_same:
            x, weight, padding = self._same(x)
        out: torch.Tensor = torch.ops.mkldnn._convolution_pointwise(
            x, weight, self.bias, padding, self.stride, self.dilation, self.groups,
            "hardtanh", [0.0, 6.0], "",
        )  # fmt: skip
        return out


def _fusable(conv: nn.Module) -> bool:
    """A convolution the fused call can stand in for: zero padding given as numbers, or timm's "same"."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.padding_mode == "zeros"
        and (isinstance(conv, Conv2dSame) or not isinstance(conv.padding, str))
    )


def fuse_conv_activations(network: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace, in place, every Conv2d directly followed by a ReLU6 with one ConvReLU6 (BatchNorms must be
    folded first, so that the two are neighbours), for a network that will run in `dtype`. Returns how many
    were fused; 0 where oneDNN's fused convolution is missing from this PyTorch build or cannot take `dtype`
    on this CPU."""
    if not _pointwise_conv_available():
        return 0
    if dtype == torch.bfloat16 and not _onednn_bf16():
        # Served all the same (evaluating at the GPU's precision is a reason to ask for bf16 here), but the
        # operator should know why it crawls: 1.5 images/s against 25 in fp32 on an AVX2 EPYC (2026-12-07).
        logger.warning(
            "bf16 on this CPU: oneDNN has no bf16 convolutions without AVX512 or AVX-NE-CONVERT, so the "
            "model runs unfused and about 15x slower than in fp32 (precision 'auto' picks fp32 here)"
        )
        return 0
    fused = 0
    for parent, (conv_name, conv), (act_name, act) in _neighbours(network):
        if _fusable(conv) and isinstance(act, nn.ReLU6):
            setattr(parent, conv_name, ConvReLU6(cast(nn.Conv2d, conv)))
            setattr(parent, act_name, nn.Identity())
            fused += 1
    return fused
