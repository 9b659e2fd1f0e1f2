"""Evaluation reports: report.json, report.md and PNG plots."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: CI and GPU machines have no display
import matplotlib.pyplot as plt
import numpy as np

from schema.results import FIELDS
from training.evaluate import Evaluation

# The quality bars of issue 3 (accuracy per field, caption BLEU / exact match) on a held-out split.
BARS: dict[str, float] = {
    "articleType": 0.90,
    "gender": 0.95,
    "usage": 0.93,
    "subCategory": 0.97,
    "masterCategory": 0.995,
    "baseColour": 0.72,
    "season": 0.80,
}
CAPTION_BARS: dict[str, float] = {"bleu": 35.0, "exact_match": 0.15}


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def unknown_label_warnings(fields: dict[str, dict[str, Any]]) -> list[str]:
    """One line per field whose data holds labels the bundle has no class for: those images can only be
    scored wrong, so the field's accuracy says as much about the data as about the model."""
    return [
        f"{f}: {n} label{'s' if n > 1 else ''} in the data that the bundle has no class for "
        "(their images count as wrong)"
        for f, m in fields.items()
        if (n := int(m.get("n_unknown_labels") or 0))
    ]


def plot_fields(ev: Evaluation, path: Path) -> None:
    names = [f for f in FIELDS if f in ev.fields]
    acc = [ev.fields[f]["accuracy"] for f in names]
    f1 = [ev.fields[f]["macro_f1"] for f in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(x - 0.2, acc, 0.4, label="accuracy")
    ax.bar(x + 0.2, f1, 0.4, label="macro-F1")
    for i, f in enumerate(names):
        if f in BARS:
            ax.plot([i - 0.4, i], [BARS[f], BARS[f]], color="black", linewidth=1.5)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylim(0, 1.02)
    ax.set_title("Per-field accuracy and macro-F1 (black line: accuracy bar)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(ev: Evaluation, path: Path, top: int = 15) -> None:
    true, pred = ev.true.get("articleType", []), ev.pred.get("articleType", [])
    counts = Counter(t for t in true if t is not None)
    classes = [c for c, _ in counts.most_common(top)]
    index = {c: i for i, c in enumerate(classes)}
    other = len(classes)
    m = np.zeros((len(classes), len(classes) + 1))
    for t, p in zip(true, pred, strict=True):
        if t in index:
            m[index[t], index.get(p, other)] += 1
    m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(10, 8))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes) + 1), [*classes, "(other)"], rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j] >= 0.01:
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if m[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"articleType confusion, top {len(classes)} classes (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    for key in ("train_head_loss", "train_caption_loss", "val_caption_loss"):
        if key in history[0]:
            a1.plot(epochs, [h[key] for h in history], label=key)
    a1.set_xlabel("epoch")
    a1.set_title("losses")
    a1.legend()
    for key in sorted(k for k in history[0] if k.startswith("val_acc_") or k == "val_token_acc"):
        a2.plot(epochs, [h[key] for h in history], label=key.removeprefix("val_acc_"))
    a2.set_xlabel("epoch")
    a2.set_title("validation accuracy (EMA weights, teacher-forced tokens)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(ev: Evaluation, meta: dict[str, Any]) -> str:
    lines = [f"# Evaluation: {meta.get('model', '')} on {meta.get('dataset', '')}", ""]
    for k in ("bundle", "split", "device", "precision", "seconds"):
        if k in meta:
            lines.append(f"- {k}: {meta[k]}")
    lines += [
        f"- images: {ev.n_images}",
        "",
        "| field | accuracy | bar | macro-F1 | ECE | threshold | coverage | accuracy above threshold |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in FIELDS:
        m = ev.fields.get(f)
        if not m:
            continue
        bar = BARS.get(f)
        verdict = "" if bar is None else (f"{bar} ✅" if m["accuracy"] >= bar else f"{bar} ❌")
        lines.append(
            f"| {f} | {_fmt(m['accuracy'])} | {verdict} | {_fmt(m['macro_f1'])} | {_fmt(m['ece'])} | "
            f"{_fmt(m['threshold'], 2)} | {_fmt(m['coverage_at_threshold'])} | "
            f"{_fmt(m['accuracy_at_threshold'])} |"
        )
    warnings = unknown_label_warnings(ev.fields)
    if warnings:
        lines += ["", *(f"- warning: {w}" for w in warnings)]
    c = ev.caption
    if c:
        lines += [
            "",
            "| caption | sacreBLEU | exact match |",
            "| --- | --- | --- |",
            f"| generated title | {_fmt(c['bleu'], 1)} (bar {CAPTION_BARS['bleu']}) | "
            f"{_fmt(c['exact_match'])} (bar {CAPTION_BARS['exact_match']}) |",
            '| template "{gender} {baseColour} {articleType}" from the heads | '
            f"{_fmt(c['template_bleu'], 1)} "
            f"| {_fmt(c['template_exact_match'])} |",
            f"| margin of the captioner over the template | {_fmt(c['bleu_margin_over_template'], 1)} | |",
            "",
            "Examples (reference -> generated):",
            "",
        ]
        lines += [f"- `{e['title']}` -> `{e['caption']}`" for e in ev.examples(12)]
    lines += [
        "",
        "Plots: `fields.png`, `confusion_articleType.png`"
        + (", `training_curves.png`" if meta.get("has_history") else ""),
        "",
    ]
    return "\n".join(lines)


def write_report(
    ev: Evaluation, out: Path, *, meta: dict[str, Any], history: list[dict[str, float]] | None = None
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    report = {**ev.to_dict(), "meta": meta, "bars": {"fields": BARS, "caption": CAPTION_BARS}}
    report["passes"] = {
        **{f: ev.fields[f]["accuracy"] >= b for f, b in BARS.items() if f in ev.fields},
        **{f"caption.{k}": ev.caption.get(k, float("nan")) >= b for k, b in CAPTION_BARS.items()},
    }
    report["examples"] = ev.examples(25)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    meta = {**meta, "has_history": bool(history)}
    (out / "report.md").write_text(markdown(ev, meta))
    if ev.fields:
        plot_fields(ev, out / "fields.png")
        plot_confusion(ev, out / "confusion_articleType.png")
    if history:
        plot_history(history, out / "training_curves.png")
    return out / "report.json"
