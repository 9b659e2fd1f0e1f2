"""`enrich train` / `enrich evaluate` on input they cannot use: one error line and exit status 1, never a
traceback; what the read skipped or dropped is said and recorded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import typer

from tests.test_training_tiny import HEADER, make_catalogue
from training.cli import evaluate_command, train_command


def _train(data_dir: Path, out: Path) -> None:
    """`enrich train` with a tiny model (fails, if it does, before any epoch)."""
    train_command(
        data_dir,
        out=out,
        epochs=1,
        pretrained=False,
        decode_workers=1,
        input_size="64x48",
        d_model=32,
        n_layers=1,
        n_heads=2,
        d_ff=64,
        max_tokens=8,
    )


def _unreadable_catalogues(root: Path) -> dict[str, Path]:
    """A folder without styles.csv, an empty styles.csv, and one whose header has no id column."""
    out = {}
    for name, text in (("missing", None), ("empty", ""), ("no id", HEADER.replace("id,", "sku,", 1))):
        folder = root / name
        (folder / "images").mkdir(parents=True)
        if text is not None:
            (folder / "styles.csv").write_text(text)
        out[name] = folder
    return out


def _one_error_line(capsys: pytest.CaptureFixture[str], run: Callable[[], None]) -> str:
    with pytest.raises(typer.Exit) as exit_info:
        run()
    assert exit_info.value.exit_code == 1
    said = " ".join(capsys.readouterr().out.split())
    assert said.startswith("error:") or " error: " in said, said
    return said


@pytest.mark.parametrize("case", ["missing", "empty", "no id"])
def test_a_catalogue_without_a_readable_styles_csv_is_one_line(
    case: str, random_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _unreadable_catalogues(tmp_path)[case]
    # Each ended in a traceback: FileNotFoundError, or ValueError ("no 'id' column", for an empty file too).
    said = _one_error_line(
        capsys, lambda: evaluate_command(folder, bundle=random_bundle, out=tmp_path / "eval")
    )
    assert "styles.csv" in said
    said = _one_error_line(capsys, lambda: _train(folder, tmp_path / "bundle"))
    assert "styles.csv" in said
    assert not (tmp_path / "bundle").exists()


def test_training_with_no_decodable_image_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_catalogue(tmp_path / "catalogue", n=10)
    for path in (root / "images").iterdir():
        path.write_bytes(b"")
    # Every row reads (the files exist), so the command's own check passes; the first epoch then divided by
    # a batch size of 0 (ZeroDivisionError).
    said = _one_error_line(capsys, lambda: _train(root, tmp_path / "bundle"))
    assert "no training image" in said and "undecodable" in said
