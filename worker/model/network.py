"""The network: one EfficientNet-Lite backbone, one linear head per field, one caption decoder.

A batch pays for the image once: the backbone's spatial feature map is average-pooled for the heads and
projected into the decoder's cross-attention memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import timm
import torch
from torch import nn

from worker.model.config import BundleConfig
from worker.model.decoder import CaptionDecoder

# Backbones this code knows how to build; the registry keeps names in bundles honest.
BACKBONES: tuple[str, ...] = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
Factory = Callable[..., "EnrichNet"]
_REGISTRY: dict[str, Factory] = {}


class EnrichNet(nn.Module):
    def __init__(self, config: BundleConfig, vocab_size: int, *, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if config.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {config.backbone!r}; known: {', '.join(BACKBONES)}")
        # num_classes=0 + global_pool="" keeps the spatial map; pretrained=False: no hub downloads, ever.
        self.backbone = timm.create_model(
            config.backbone, pretrained=False, num_classes=0, global_pool="", drop_path_rate=drop_path_rate
        )
        channels = cast(int, self.backbone.num_features)
        d = config.decoder.d_model
        self.heads = nn.ModuleDict(
            {
                f: nn.Sequential(nn.Dropout(0.2), nn.Linear(channels, len(labels)))
                for f, labels in config.labels.items()
            }
        )
        h, w = config.preprocessing.input_size
        # The tf_ variants pad "same", so the stride-32 map is ceil(size / 32) on each side.
        n_positions = -(-h // 32) * -(-w // 32)
        self.memory_proj = nn.Sequential(nn.Linear(channels, d), nn.LayerNorm(d))
        self.memory_pos = nn.Parameter(torch.randn(n_positions, d) * 0.02)
        self.decoder = CaptionDecoder(config.decoder, vocab_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> spatial feature map (B, C, h, w)."""
        forward = cast(Callable[[torch.Tensor], torch.Tensor], self.backbone.forward_features)
        return forward(x)

    def head_logits(self, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = fmap.mean(dim=(2, 3))
        return {f: head(pooled) for f, head in self.heads.items()}

    def memory(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map -> decoder memory (B, h*w, d) with a learned position per cell."""
        seq = fmap.flatten(2).transpose(1, 2)
        return self.memory_proj(seq) + self.memory_pos[: seq.size(1)]

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Training pass: head logits and teacher-forced caption logits from one backbone pass."""
        fmap = self.features(x)
        return self.head_logits(fmap), self.decoder(tokens, self.memory(fmap))


def register(name: str) -> Callable[[Factory], Factory]:
    def wrap(fn: Factory) -> Factory:
        _REGISTRY[name] = fn
        return fn

    return wrap


@register("enrich-net")
def _enrich_net(config: BundleConfig, vocab_size: int, *, drop_path_rate: float = 0.0) -> EnrichNet:
    return EnrichNet(config, vocab_size, drop_path_rate=drop_path_rate)


def create_model(
    config: BundleConfig, vocab_size: int, *, architecture: str = "enrich-net", drop_path_rate: float = 0.0
) -> EnrichNet:
    """Build a network with random weights for this config (the bundle loader fills them in).
    drop_path_rate (stochastic depth) only acts in training mode."""
    try:
        factory = _REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}") from None
    net: EnrichNet = factory(config, vocab_size, drop_path_rate=drop_path_rate)
    return net
