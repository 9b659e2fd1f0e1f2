"""The bundle's `config.json`, as typed, frozen dataclasses.

Everything the serving side needs to rebuild the network and to preprocess exactly as training did lives
here; the weights file holds only tensors. The JSON layout is documented in docs/models.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"


@dataclass(frozen=True)
class PreprocessConfig:
    """How a decoded RGB image becomes the network's uint8 input tensor."""

    input_size: tuple[int, int]  # (height, width) of the network input
    # "letterbox": fit inside input_size keeping the aspect ratio, pad with `fill`;
    # "stretch": resize to input_size ignoring the aspect ratio.
    resize: str = "letterbox"
    # Images larger than this (h, w) are first reduced to fit inside it. The catalogue's training photos are
    # 60x80, so reducing a 1800x2400 photo to that level of detail first makes full-size photos look like the
    # training distribution instead of sharper than anything the network has seen. None disables it.
    detail_size: tuple[int, int] | None = (80, 60)
    fill: int = 255  # product photos are shot on white
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        detail = d.get("detail_size")
        return cls(
            input_size=(int(d["input_size"][0]), int(d["input_size"][1])),
            resize=str(d.get("resize", "letterbox")),
            detail_size=None if detail is None else (int(detail[0]), int(detail[1])),
            fill=int(d.get("fill", 255)),
            mean=tuple(float(x) for x in d.get("mean", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d.get("std", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of the caption decoder (a pre-norm transformer decoder with cross-attention)."""

    d_model: int = 384
    n_layers: int = 3
    n_heads: int = 6
    d_ff: int = 1536
    max_tokens: int = 24  # generated tokens at most, EOS included
    dropout: float = 0.1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class BundleConfig:
    """The parsed `config.json` of a model bundle."""

    name: str
    version: str  # semantic version of the trained model
    backbone: str  # timm model name, e.g. "tf_efficientnet_lite0"
    preprocessing: PreprocessConfig
    labels: dict[str, list[str]]  # HEAD_FIELDS -> class names, index = logit position
    # DERIVED_FIELDS -> {articleType: value}: the mapping seen in the training data.
    derived: dict[str, dict[str, str]]
    decoder: DecoderConfig
    # The tokenizers JSON (a string), or None when it lives in tokenizer.json beside config.json.
    tokenizer: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)  # FIELDS -> min confidence to report
    temperatures: dict[str, float] = field(default_factory=dict)  # HEAD_FIELDS -> logit divisor
    top_k: int = 3
    # Average the head logits of the image and its mirror image (the caption uses the image as is):
    # a second backbone pass for a steadier classification.
    flip_tta: bool = False
    # Beam search width for the title (1: greedy). Wider beams pay the decoder once per beam.
    caption_beams: int = 1
    weights_dtype: str = "float32"  # dtype of the tensors in model.safetensors
    data: dict[str, Any] = field(default_factory=dict)  # training data fingerprint, split recipe
    training: dict[str, Any] = field(default_factory=dict)  # command, recipe, machine, duration
    metrics: dict[str, Any] = field(default_factory=dict)  # validation metrics at export
    format_version: int = FORMAT_VERSION

    def to_json_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocessing"]["input_size"] = list(self.preprocessing.input_size)
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> BundleConfig:
        version = int(d.get("format_version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"bundle format {version} is newer than this code understands ({FORMAT_VERSION})"
            )
        return cls(
            name=str(d["name"]),
            version=str(d["version"]),
            backbone=str(d["backbone"]),
            preprocessing=PreprocessConfig.from_dict(d["preprocessing"]),
            labels={k: list(v) for k, v in d["labels"].items()},
            derived={k: dict(v) for k, v in d.get("derived", {}).items()},
            decoder=DecoderConfig.from_dict(d["decoder"]),
            tokenizer=d.get("tokenizer"),
            thresholds={k: float(v) for k, v in d.get("thresholds", {}).items()},
            temperatures={k: float(v) for k, v in d.get("temperatures", {}).items()},
            top_k=int(d.get("top_k", 3)),
            flip_tta=bool(d.get("flip_tta", False)),
            caption_beams=int(d.get("caption_beams", 1)),
            weights_dtype=str(d.get("weights_dtype", "float32")),
            data=dict(d.get("data", {})),
            training=dict(d.get("training", {})),
            metrics=dict(d.get("metrics", {})),
            format_version=version,
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json_dict(), indent=1, sort_keys=False) + "\n")

    @classmethod
    def read(cls, bundle_dir: Path) -> BundleConfig:
        return cls.from_json_dict(json.loads((bundle_dir / CONFIG_NAME).read_text()))

    def tokenizer_json(self, bundle_dir: Path | None) -> str:
        """The tokenizer, inline or from tokenizer.json beside config.json."""
        if self.tokenizer is not None:
            return self.tokenizer
        if bundle_dir is None:
            raise ValueError("config has no inline tokenizer and no bundle directory to read it from")
        return (bundle_dir / TOKENIZER_NAME).read_text()
