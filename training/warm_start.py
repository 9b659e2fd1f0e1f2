"""Start a training run from a trained bundle instead of ImageNet (`enrich train --init-from BUNDLE`).

A catalogue of one's own rarely has exactly the classes and words of the bundle it starts from, so what
carries over is copied by meaning, not by position: the backbone whole; each head's rows for the classes
both know (by name); the caption decoder's layers where its shape matches, and the embedding rows of the
words both vocabularies hold (the output projection is tied to them). Everything else (a class or a word
new to this catalogue) starts as in a fresh run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from schema.results import HEAD_FIELDS
from training.data import Item, fingerprint
from training.pack import SplitRecipe, split_items
from worker.model.bundle import build_from_bundle
from worker.model.config import BundleConfig
from worker.model.network import EnrichNet
from worker.model.tokenizer import TitleCodec


@dataclass(frozen=True)
class WarmStart:
    """What a run took from the bundle it started from (recorded in the new bundle's training info)."""

    bundle: str  # "name version"
    classes: dict[str, list[int]]  # field -> [classes copied, classes in this catalogue]
    words: list[int]  # [embedding rows copied, words in this vocabulary]
    decoder_layers: bool  # the decoder's layers (same shape) and the memory projection
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        classes = ", ".join(f"{f} {copied}/{total}" for f, (copied, total) in self.classes.items())
        decoder = "decoder layers" if self.decoder_layers else "no decoder layers (another shape)"
        return (
            f"started from {self.bundle}: backbone, classes {classes}, "
            f"words {self.words[0]}/{self.words[1]}, {decoder}"
        )


_EMBEDDING = "decoder.tok_emb.weight"


def _copy_rows(target: torch.Tensor, source: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """target[j] = source[i] for each (j, i)."""
    if pairs:
        to, frm = (torch.tensor(side) for side in zip(*pairs, strict=True))
        target[to] = source[frm].to(target.dtype)


def _captioner_state(net: EnrichNet) -> dict[str, torch.Tensor]:
    """The captioner's tensors (memory projection and decoder) but the word embedding; views of the
    parameters, so copying into them fills the network."""
    return {
        name: tensor
        for name, tensor in net.state_dict().items()
        if name.startswith(("decoder.", "memory_")) and name != _EMBEDDING
    }


def warm_start(net: EnrichNet, config: BundleConfig, codec: TitleCodec, bundle: Path) -> WarmStart:
    """Fill `net` (built for `config` and `codec`, this run's classes and words) from `bundle`'s weights."""
    source_net, source, source_codec = build_from_bundle(bundle)
    if source.backbone != config.backbone:
        raise ValueError(f"{bundle} has a {source.backbone} backbone; this run builds {config.backbone}")
    classes: dict[str, list[int]] = {}
    own_state, source_state = net.state_dict(), source_net.state_dict()
    with torch.no_grad():
        net.backbone.load_state_dict(source_net.backbone.state_dict())
        for f in HEAD_FIELDS:
            known = {label: i for i, label in enumerate(source.labels.get(f, []))}
            pairs = [(j, known[label]) for j, label in enumerate(config.labels[f]) if label in known]
            for name in (f"heads.{f}.1.weight", f"heads.{f}.1.bias"):  # the Linear after the dropout
                _copy_rows(own_state[name], source_state[name], pairs)
            classes[f] = [len(pairs), len(config.labels[f])]
        # The captioner's layers carry over whole where every tensor has the same shape (the same width,
        # layers, heads, token limit and input size); the word embedding row by row wherever the width does.
        own, theirs = _captioner_state(net), _captioner_state(source_net)
        decoder_layers = own.keys() == theirs.keys() and all(own[k].shape == theirs[k].shape for k in own)
        if decoder_layers:
            for name, tensor in own.items():
                tensor.copy_(theirs[name])
        embedding, source_embedding = net.decoder.tok_emb.weight, source_net.decoder.tok_emb.weight
        pairs = []
        if embedding.shape[1] == source_embedding.shape[1]:
            vocabulary = source_codec.tokenizer.get_vocab()
            pairs = [(j, vocabulary[w]) for w, j in codec.tokenizer.get_vocab().items() if w in vocabulary]
            _copy_rows(embedding, source_embedding, pairs)
    return WarmStart(
        bundle=f"{source.name} {source.version}",
        classes=classes,
        words=[len(pairs), codec.vocab_size],
        decoder_layers=decoder_layers,
        path=str(bundle),
    )


def bundle_words(bundle: Path) -> list[str]:
    """The words of a bundle's title vocabulary, in id order."""
    config = BundleConfig.read(bundle)
    vocabulary = TitleCodec.from_json(config.tokenizer_json(bundle)).tokenizer.get_vocab()
    return sorted(vocabulary, key=vocabulary.__getitem__)


def trained_on(start: BundleConfig, items: list[Item]) -> set[str]:
    """The ids among `items` that the bundle `start` trained on, where they are the catalogue it was trained
    on (its recorded split, redone here, gives its recorded training fingerprint); empty for any other
    catalogue. A run that starts from the bundle keeps them out of validation, which must be unseen by both.
    A catalogue that only shares some rows with the bundle's (a copy with rows added) is not recognised."""
    recorded = start.data.get("split")
    if not isinstance(recorded, dict) or not start.data.get("fingerprint_train"):
        return set()
    train, _ = split_items(items, SplitRecipe.from_dict(recorded), limit=recorded.get("limit"))
    return {it.id for it in train} if fingerprint(train) == start.data["fingerprint_train"] else set()
