"""Scoring a bundle's predictions: what macro-F1 and exact match count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from schema.results import FIELDS
from training.data import Item
from training.evaluate import score
from training.metrics import macro_f1
from worker.model.bundle import RawOutput


def test_macro_f1_counts_classes_predicted_but_never_true() -> None:
    # Class 2 is predicted and never true: it scores 0 in the mean, as scikit-learn counts it (was 0.5, 0.83).
    assert macro_f1(np.array([0, 0, 1]), np.array([0, 0, 2])) == pytest.approx((1 + 0 + 0) / 3)
    assert macro_f1(np.array([0, 1, 1]), np.array([0, 1, 2])) == pytest.approx((1 + 2 / 3 + 0) / 3)


def _raw(captions: list[str]) -> RawOutput:
    """Every field predicts its first label ("A") for every image."""
    n = len(captions)
    labels = {f: ["A", "B"] for f in FIELDS}
    probs = {f: torch.tensor([[0.9, 0.1]] * n) for f in FIELDS}
    best = {f: torch.zeros(n, dtype=torch.long) for f in FIELDS}
    return RawOutput(probs, labels, best, captions, torch.full((n,), 0.5))


def _item(i: int, label: str, title: str) -> Item:
    return Item(id=str(i), image=Path(f"{i}.jpg"), labels=dict.fromkeys(FIELDS, label), title=title)


def test_unknown_labels_are_classes_of_their_own_and_titles_match_across_spaces() -> None:
    items = [_item(0, "A", "Nike  Men A A"), _item(1, "X", "Puma Men A A"), _item(2, "Y", "Puma Men A A")]
    evaluation = score(_raw(["Nike Men A A", "Puma Men A A", "Adidas Men A A"]), items, {})
    gender = evaluation.fields["gender"]
    # X and Y were merged into one class: (0.5 + 0) / 2. As two classes, each scores 0 and A (one hit, two
    # false alarms) 0.5: (0.5 + 0 + 0) / 3.
    assert gender["n_unknown_labels"] == 2 and gender["accuracy"] == pytest.approx(1 / 3)
    assert gender["macro_f1"] == pytest.approx(0.5 / 3)
    # The reference's double space made a correct title count as wrong.
    assert evaluation.caption["exact_match"] == pytest.approx(2 / 3)


def test_the_summaries_warn_of_labels_the_bundle_has_no_class_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.cli import _print_summary
    from training.report import write_report

    items = [_item(0, "A", "A A A"), _item(1, "X", "A A A"), _item(2, "Y", "A A A")]
    evaluation = score(_raw(["A A A"] * 3), items, {})
    _print_summary(evaluation.to_dict())
    said = " ".join(capsys.readouterr().out.split())
    # n_unknown_labels was in report.json only: nothing on the console or in report.md said so.
    assert "warning: gender: 2 labels in the data that the bundle has no class for" in said
    write_report(evaluation, tmp_path, meta={})
    assert "- warning: articleType: 2 labels in the data" in (tmp_path / "report.md").read_text()
