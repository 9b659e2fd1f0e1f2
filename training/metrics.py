"""Classification metrics, calibration (temperature per field) and per-field thresholds."""

from __future__ import annotations

import numpy as np
import torch


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean F1 over every class that occurs in the truth or in the predictions (as scikit-learn counts it:
    a class the model predicts but the data never holds scores 0, instead of vanishing from the mean)."""
    classes = np.union1d(y_true, y_pred)
    if len(classes) == 0:
        return float("nan")
    scores = []
    for c in classes:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence (equal-width bins)."""
    if len(confidence) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(confidence[mask].mean() - correct[mask].mean())
    return float(total)


def fit_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The temperature minimising validation NLL (grid search: robust and cheap at this size)."""
    keep = target >= 0
    logits, target = logits[keep].float(), target[keep]
    if len(target) == 0:
        return 1.0
    grid = torch.exp(torch.linspace(np.log(0.2), np.log(5.0), 120))
    nll = [torch.nn.functional.cross_entropy(logits / t, target).item() for t in grid]
    return float(grid[int(np.argmin(nll))])


def pick_threshold(confidence: np.ndarray, correct: np.ndarray, *, precision: float, cap: float) -> float:
    """Lowest confidence t such that the predictions kept (confidence >= t) are right at least `precision`
    of the time; never above `cap`, so a weak field is reported "unknown" only where it is truly unsure."""
    if len(confidence) == 0:
        return 0.0
    order = np.argsort(-confidence)
    conf_sorted, correct_sorted = confidence[order], correct[order]
    running = np.cumsum(correct_sorted) / np.arange(1, len(order) + 1)
    ok = np.nonzero(running >= precision)[0]
    if len(ok) == 0:
        return cap
    t = float(conf_sorted[ok[-1]])
    return round(min(t, cap), 4)
