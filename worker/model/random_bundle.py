"""A tiny random-weight bundle in the real format, for pipeline tests that need a model but no quality."""

from __future__ import annotations

from pathlib import Path

import torch

from worker.model.bundle import save_bundle
from worker.model.config import BundleConfig, DecoderConfig, PreprocessConfig
from worker.model.network import create_model
from worker.model.tokenizer import TitleCodec, train_tokenizer

# A few real labels of the catalogue, so rows written by tests look like production rows.
_LABELS: dict[str, list[str]] = {
    "gender": ["Boys", "Girls", "Men", "Unisex", "Women"],
    "baseColour": ["Black", "Blue", "Navy Blue", "Red", "White"],
    "season": ["Fall", "Spring", "Summer", "Winter"],
    "usage": ["Casual", "Ethnic", "Formal", "Sports"],
    "articleType": ["Backpacks", "Casual Shoes", "Jackets", "Tshirts", "Watches"],
}
_DERIVED: dict[str, dict[str, str]] = {
    "masterCategory": {
        "Backpacks": "Accessories",
        "Casual Shoes": "Footwear",
        "Jackets": "Apparel",
        "Tshirts": "Apparel",
        "Watches": "Accessories",
    },
    "subCategory": {
        "Backpacks": "Bags",
        "Casual Shoes": "Shoes",
        "Jackets": "Topwear",
        "Tshirts": "Topwear",
        "Watches": "Watches",
    },
}
_TITLES = [
    "Puma Men Navy Blue Backpack",
    "Nike Men Black Casual Shoes",
    "Adidas Women White Tshirt",
    "Titan Men Black Watch",
    "Puma Unisex Red Jacket",
]


def random_config(image_size: tuple[int, int] = (64, 48)) -> BundleConfig:
    return BundleConfig(
        name="enrich-random",
        version="0.0.1",
        backbone="tf_efficientnet_lite0",
        preprocessing=PreprocessConfig(input_size=image_size),
        labels={f: list(v) for f, v in _LABELS.items()},
        derived={f: dict(v) for f, v in _DERIVED.items()},
        decoder=DecoderConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_tokens=8, dropout=0.0),
        thresholds={},
        data={"fingerprint": "random", "note": "random weights: predictions are meaningless"},
        training={"command": "write_random_bundle()"},
    )


def write_random_bundle(path: Path, *, image_size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """Write a random-weight bundle to `path` (created if missing) and return it."""
    torch.manual_seed(seed)
    config = random_config(image_size)
    codec = TitleCodec(train_tokenizer(_TITLES, min_frequency=1))
    net = create_model(config, codec.vocab_size)
    with torch.no_grad():
        # Titles drop [UNK]; keep random titles non-empty by never letting it win (its logit stays 0 while
        # the words' are random, the output projection being tied to the embedding).
        net.decoder.tok_emb.weight[codec.unk].zero_()
    return save_bundle(net, config, codec, Path(path))
