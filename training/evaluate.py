"""Scoring a model on labelled items: per-field accuracy / macro-F1 / ECE, caption BLEU and exact match."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sacrebleu
import torch

from schema.results import FIELDS
from training.data import Item
from training.metrics import accuracy, ece, macro_f1, pick_threshold
from worker.model.bundle import EnrichModel, RawOutput


def run_model(
    model: EnrichModel,
    images: torch.Tensor,
    *,
    batch_size: int = 128,
    progress: Callable[[int], None] | None = None,
) -> RawOutput:
    """The serving model's `infer` over uint8 images, batch by batch, outputs concatenated."""
    parts: list[RawOutput] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        parts.append(model.infer(batch))
        if progress:
            progress(len(batch))
    if not parts:
        raise ValueError("no images to evaluate")
    return RawOutput(
        probs={f: torch.cat([p.probs[f] for p in parts]) for f in parts[0].probs},
        labels=parts[0].labels,
        best={f: torch.cat([p.best[f] for p in parts]) for f in parts[0].best},
        captions=[c for p in parts for c in p.captions],
        caption_confidence=torch.cat([p.caption_confidence for p in parts]),
    )


def template_title(gender: str, colour: str, article: str) -> str:
    return f"{gender} {colour} {article}"


@dataclass
class Evaluation:
    n_images: int
    fields: dict[str, dict[str, float]]
    caption: dict[str, float]
    # For plots and for checking that serving predicts what training-time evaluation did.
    true: dict[str, list[str | None]] = field(default_factory=dict)
    pred: dict[str, list[str]] = field(default_factory=dict)
    captions: list[str] = field(default_factory=list)
    titles: list[str | None] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"n_images": self.n_images, "fields": self.fields, "caption": self.caption}

    def examples(self, n: int = 12) -> list[dict[str, Any]]:
        return [
            {"id": self.ids[i], "title": self.titles[i], "caption": self.captions[i]}
            for i in range(min(n, self.n_images))
        ]


def score(raw: RawOutput, items: Sequence[Item], thresholds: dict[str, float]) -> Evaluation:
    n = len(items)
    fields: dict[str, dict[str, float]] = {}
    true: dict[str, list[str | None]] = {}
    pred: dict[str, list[str]] = {}
    for f in FIELDS:
        labels = raw.labels[f]
        probs = raw.probs[f].numpy()
        best = raw.best[f].numpy()  # what serving reports (derived fields follow articleType)
        conf = probs[np.arange(len(best)), best]
        pred[f] = [labels[i] for i in best]
        true[f] = [it.labels.get(f) for it in items]
        has = np.array([t is not None for t in true[f]])
        # Labels unknown to the model are scored as wrong: they are real errors for a user.
        index = {v: i for i, v in enumerate(labels)}
        # Each unknown label is a class of its own (never predicted, F1 0), not one merged class.
        unknown = sorted({t for t in true[f] if t is not None and t not in index})
        index.update({v: len(labels) + k for k, v in enumerate(unknown)})
        y_true = np.array([index[t] if t is not None else -1 for t in true[f]])[has]
        y_pred = best[has]
        correct = (y_true == y_pred).astype(float)
        t = thresholds.get(f, 0.0)
        kept = conf[has] >= t
        fields[f] = {
            "accuracy": accuracy(y_true, y_pred),
            "macro_f1": macro_f1(y_true, y_pred),
            "ece": ece(conf[has], correct),
            "mean_confidence": float(conf[has].mean()) if has.any() else float("nan"),
            "threshold": t,
            "coverage_at_threshold": float(kept.mean()) if has.any() else float("nan"),
            "accuracy_at_threshold": float(correct[kept].mean()) if kept.any() else float("nan"),
            "n": int(has.sum()),
            "n_unknown_labels": len(unknown),  # true labels the bundle has no class for
        }
    titled = [i for i, it in enumerate(items) if it.title]
    # Whitespace normalised on both sides: 418 of fashion-small's 35,261 titles hold a double space, which no
    # generated title can match though any reader would call them the same title.
    refs = [_words(items[i].title or "") for i in titled]
    hyps = [_words(raw.captions[i]) for i in titled]
    templates = [
        _words(template_title(pred["gender"][i], pred["baseColour"][i], pred["articleType"][i]))
        for i in titled
    ]
    caption = {
        "bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score) if refs else float("nan"),
        "exact_match": float(np.mean([h == r for h, r in zip(hyps, refs, strict=True)]))
        if refs
        else float("nan"),
        "template_bleu": float(sacrebleu.corpus_bleu(templates, [refs]).score) if refs else float("nan"),
        "template_exact_match": (
            float(np.mean([h == r for h, r in zip(templates, refs, strict=True)])) if refs else float("nan")
        ),
        "mean_confidence": float(raw.caption_confidence.mean()),
        "n": len(refs),
    }
    caption["bleu_margin_over_template"] = caption["bleu"] - caption["template_bleu"]
    return Evaluation(
        n_images=n,
        fields=fields,
        caption=caption,
        true=true,
        pred=pred,
        captions=list(raw.captions),
        titles=[it.title for it in items],
        ids=[it.id for it in items],
    )


def fit_thresholds(
    raw: RawOutput, items: Sequence[Item], *, precision: float, cap: float
) -> dict[str, float]:
    """Per-field confidence thresholds from validation outputs (see metrics.pick_threshold)."""
    scored = score(raw, items, {})
    out: dict[str, float] = {}
    for f in scored.fields:
        best = raw.best[f].numpy()
        conf = raw.probs[f].numpy()[np.arange(len(best)), best]
        has = np.array([t is not None for t in scored.true[f]])
        correct = np.array([p == t for p, t in zip(scored.pred[f], scored.true[f], strict=True)], dtype=float)
        out[f] = pick_threshold(conf[has], correct[has], precision=precision, cap=cap)
    return out


def _words(title: str) -> str:
    return " ".join(title.split())
