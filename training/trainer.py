"""Joint training of the heads and the captioner, calibration, and export of a bundle.

Data lives on the device as one uint8 tensor (decoded once, through the serving `preprocess_array`), so an
epoch is index gathers + GPU augmentation + one forward/backward per batch: no loader processes, no
per-image Python in the loop.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from schema.results import HEAD_FIELDS
from training.augment import augment
from training.data import UNDECODABLE, CatalogueError, Item, ReadReport
from training.evaluate import Evaluation, fit_thresholds, run_model, score
from training.metrics import fit_temperature
from training.pretrained import load_imagenet
from training.tensors import (
    IGNORE,
    Source,
    Targets,
    build_labels,
    build_targets,
    decode_images,
    decoder_inputs,
)
from training.warm_start import WarmStart, bundle_words, warm_start
from worker.model.bundle import EnrichModel, RawOutput, save_bundle
from worker.model.config import CONFIG_NAME, BundleConfig, DecoderConfig, PreprocessConfig
from worker.model.network import EnrichNet, create_model
from worker.model.preprocess import normalize
from worker.model.tokenizer import TitleCodec, train_tokenizer, with_words

_RESERVE_S = 45.0  # kept from the time budget for calibration, export and the final evaluation


@dataclass
class Recipe:
    """Every knob of a training run; recorded verbatim in the bundle."""

    name: str = "enrich-lite0"
    version: str = "1.0.0"
    backbone: str = "tf_efficientnet_lite0"
    input_size: tuple[int, int] = (256, 192)
    detail_size: tuple[int, int] | None = (80, 60)
    epochs: int = 30
    batch_size: int = 256
    # Images per forward/backward pass; their gradients add up to one step of batch_size. 0: the whole
    # batch on a GPU, 32 on a CPU, where a batch of 256 lite2 images at 256x192 needs ~29 GB (4.6 GB at 32,
    # measured peak RSS) and was killed for memory on a 24 GB machine.
    micro_batch_size: int = 0
    lr: float = 2e-3  # new layers (heads, decoder); the pretrained backbone gets lr * backbone_lr_scale
    backbone_lr_scale: float = 0.5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    # Class-imbalance handling: loss weight of a class ~ count^-power (0: plain CE, 1: fully balanced).
    # A mild power lifts rare classes (macro-F1) without trading away overall accuracy.
    class_weight_power: float = 0.25
    caption_weight: float = 1.0
    ema_decay: float = 0.999
    grad_clip: float = 2.0
    drop_path_rate: float = 0.1  # stochastic depth in the backbone: regularises long fine-tunes
    augment: bool = True
    d_model: int = 384
    n_layers: int = 3
    n_heads: int = 6
    d_ff: int = 1536
    max_tokens: int = 16
    decoder_dropout: float = 0.1
    min_word_frequency: int = 2
    threshold_precision: float = 0.9  # per-field thresholds keep predictions right >= 90% of the time ...
    threshold_cap: float = 0.5  # ... but never require more than this confidence
    weights_dtype: str = "float16"
    pretrained: bool = True
    init_from: str | None = None  # a bundle to start from instead of ImageNet (training/warm_start.py)
    seed: int = 0
    max_minutes: float | None = None  # if the epochs would take longer, fewer are run (schedule rescaled)

    def decoder(self) -> DecoderConfig:
        return DecoderConfig(
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            max_tokens=self.max_tokens,
            dropout=self.decoder_dropout,
        )


@dataclass
class TrainResult:
    bundle: Path
    config: BundleConfig
    evaluation: Evaluation
    raw_val: RawOutput
    history: list[dict[str, float]] = field(default_factory=list)


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=console is None,
    )


def _class_weights(y: torch.Tensor, n_classes: int, power: float) -> torch.Tensor:
    counts = torch.bincount(y[y >= 0], minlength=n_classes).float().clamp(min=1)
    w = counts.pow(-power)
    # Normalised so the average sample weight is 1: the loss scale does not depend on the power.
    return w * counts.sum() / (w * counts).sum()


def _param_groups(net: EnrichNet, recipe: Recipe) -> list[dict[str, Any]]:
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in net.named_parameters():
        is_backbone = name.startswith("backbone.")
        # No weight decay on norms, biases, embeddings and position tables.
        decay = p.ndim >= 2 and "emb" not in name and "pos" not in name
        groups.setdefault((is_backbone, decay), []).append(p)
    return [
        {
            "params": params,
            "lr_scale": recipe.backbone_lr_scale if backbone else 1.0,
            "weight_decay": recipe.weight_decay if decay else 0.0,
        }
        for (backbone, decay), params in groups.items()
    ]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def _losses(
    net: EnrichNet,
    x: torch.Tensor,
    idx: torch.Tensor,
    targets: Targets,
    class_w: dict[str, torch.Tensor],
    codec: TitleCodec,
    recipe: Recipe,
) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = targets.tokens[idx]
    heads, cap_logits = net(x, decoder_inputs(tokens, codec.bos, codec.pad))
    head_loss = x.new_zeros(())
    for f in HEAD_FIELDS:
        y = targets.labels[f][idx]
        per = F.cross_entropy(
            heads[f].float(),
            y,
            weight=class_w[f],
            ignore_index=IGNORE,
            label_smoothing=recipe.label_smoothing,
            reduction="none",
        )
        # Weighted mean by hand: no NaN (and no host sync) when a batch has no label for a field.
        denom = (class_w[f][y.clamp(min=0)] * (y != IGNORE)).sum().clamp(min=1e-6)
        head_loss = head_loss + per.sum() / denom
    cap = F.cross_entropy(
        cap_logits.float().flatten(0, 1),
        tokens.flatten(),
        ignore_index=IGNORE,
        label_smoothing=recipe.label_smoothing,
        reduction="sum",
    )
    cap_loss = cap / (tokens != IGNORE).sum().clamp(min=1)
    return head_loss, cap_loss


@torch.no_grad()
def _validate(
    net: EnrichNet, images: torch.Tensor, targets: Targets, codec: TitleCodec, pre: PreprocessConfig, bs: int
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Head accuracy and teacher-forced caption loss / token accuracy; also returns the head logits."""
    net.eval()
    cuda = images.device.type == "cuda"
    logits: dict[str, list[torch.Tensor]] = {f: [] for f in HEAD_FIELDS}
    cap_loss = torch.zeros((), device=images.device)
    tok_right = torch.zeros((), device=images.device)
    n_tok = torch.zeros((), device=images.device)
    for start in range(0, len(images), bs):
        idx = torch.arange(start, min(start + bs, len(images)), device=images.device)
        x = normalize(images[idx], pre)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        tokens = targets.tokens[idx]
        with torch.autocast(images.device.type, torch.bfloat16, enabled=cuda):
            heads, cap = net(x, decoder_inputs(tokens, codec.bos, codec.pad))
        for f in HEAD_FIELDS:
            logits[f].append(heads[f].float())
        flat = cap.float().flatten(0, 1)
        cap_loss += F.cross_entropy(flat, tokens.flatten(), ignore_index=IGNORE, reduction="sum")
        mask = tokens.flatten() != IGNORE
        tok_right += ((flat.argmax(-1) == tokens.flatten()) & mask).sum()
        n_tok += mask.sum()
    out = {f: torch.cat(v) for f, v in logits.items()}
    stats = {
        f"val_acc_{f}": float((out[f].argmax(1) == targets.labels[f]).float().mean()) for f in HEAD_FIELDS
    }
    stats["val_caption_loss"] = float(cap_loss / n_tok.clamp(min=1))
    stats["val_token_acc"] = float(tok_right / n_tok.clamp(min=1))
    net.train()
    return stats, out


def _replace_config(config: BundleConfig, out: Path) -> None:
    """Rewrite OUT's config.json (now with the metrics) beside its name, then rename it over the old one: a
    run killed here leaves the valid config save_bundle wrote, not half a JSON file that no worker loads."""
    partial = out / f".{CONFIG_NAME}.partial"
    try:
        config.save(partial)
        os.replace(partial, out / CONFIG_NAME)
    finally:
        partial.unlink(missing_ok=True)


def train(
    train_items: Sequence[Item],
    val_items: Sequence[Item],
    source: Callable[[Item], Source],
    recipe: Recipe,
    out: Path,
    *,
    device: str = "auto",
    backbone_weights: Path | None = None,
    data_info: dict[str, Any] | None = None,
    command: str = "",
    console: Console | None = None,
    decode_workers: int = 0,
) -> TrainResult:
    """Train on `train_items`, calibrate and score on `val_items`, write the bundle to `out`."""
    t_start = time.time()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    cuda = dev.type == "cuda"
    torch.manual_seed(recipe.seed)
    say = console.print if console else (lambda *a, **k: None)

    pre = PreprocessConfig(input_size=recipe.input_size, detail_size=recipe.detail_size)
    # Decoded first: an undecodable image's row adds no class, word or title to the bundle, and the bundle's
    # read report counts it as skipped, as `enrich evaluate` does.
    with _progress(console) as progress:
        total = len(train_items) + len(val_items)
        task = progress.add_task("decode + preprocess", total=total, info="")
        t0 = time.time()
        tr_decoded = decode_images(
            [source(it) for it in train_items],
            pre,
            workers=decode_workers,
            progress=lambda n: progress.advance(task, n),
        )
        va_decoded = decode_images(
            [source(it) for it in val_items],
            pre,
            workers=decode_workers,
            progress=lambda n: progress.advance(task, n),
        )
        progress.update(task, info=f"{total / max(1e-9, time.time() - t0):.0f} images/s")
    dropped = [train_items[i].id for i in tr_decoded.undecodable] + [
        val_items[i].id for i in va_decoded.undecodable
    ]
    train_items, tr_images = tr_decoded.kept(train_items)
    val_items, va_images = va_decoded.kept(val_items)
    data = dict(data_info or {})
    if dropped and "read" in data:
        read = ReadReport.from_dict(data["read"])
        read.drop(UNDECODABLE, len(dropped))
        data["read"] = read.to_dict()
    if dropped:
        shown = ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else "")
        say(
            f"[yellow]skipped {len(dropped)} undecodable images[/yellow] "
            f"(empty, truncated or not an image: ids {shown})"
        )
    if not train_items:
        # Without this check the first epoch divides by a batch size of 0.
        raise CatalogueError(
            f"no training image left to train on ({len(tr_decoded.undecodable)} undecodable: empty, truncated"
            " or not an image)"
        )

    tokenizer = train_tokenizer(
        (it.title for it in train_items if it.title), min_frequency=recipe.min_word_frequency
    )
    if recipe.init_from:
        # The words the bundle knows stay known: a brand too rare in this catalogue for its own vocabulary
        # was otherwise forgotten (3,014 titles kept 962 of the default bundle's 3,912 words, and the
        # captioner fell from sacreBLEU 31.1 to 28.7 on unseen photos of the same catalogue).
        tokenizer = with_words(tokenizer, bundle_words(Path(recipe.init_from)))
    codec = TitleCodec(tokenizer)
    labels, derived = build_labels(train_items)
    config = BundleConfig(
        name=recipe.name,
        version=recipe.version,
        backbone=recipe.backbone,
        preprocessing=pre,
        labels=labels,
        derived=derived,
        decoder=recipe.decoder(),
        weights_dtype=recipe.weights_dtype,
        data=data,
    )
    say(
        f"vocabulary {codec.vocab_size} words; classes "
        + ", ".join(f"{f} {len(v)}" for f, v in labels.items())
    )
    tr_targets = build_targets(train_items, labels, codec, recipe.max_tokens)
    va_targets = build_targets(val_items, labels, codec, recipe.max_tokens)

    net = create_model(config, codec.vocab_size, drop_path_rate=recipe.drop_path_rate)
    started_from: WarmStart | None = None
    if recipe.init_from:
        started_from = warm_start(net, config, codec, Path(recipe.init_from))
        say(started_from.summary())
    elif recipe.pretrained:
        load_imagenet(net.backbone, recipe.backbone, backbone_weights)
    net = net.to(dev)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).eval()
    ema_state = [t for t in ema.state_dict().values() if t.is_floating_point()]
    net_state = [t for t in net.state_dict().values() if t.is_floating_point()]

    tr_images, va_images = tr_images.to(dev), va_images.to(dev)
    tr_t = Targets(
        {f: v.to(dev) for f, v in tr_targets.labels.items()}, tr_targets.tokens.to(dev), tr_targets.has_title
    )
    va_t = Targets(
        {f: v.to(dev) for f, v in va_targets.labels.items()}, va_targets.tokens.to(dev), va_targets.has_title
    )
    class_w = {
        f: _class_weights(tr_t.labels[f], len(labels[f]), recipe.class_weight_power) for f in HEAD_FIELDS
    }

    groups = _param_groups(net, recipe)
    opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.99), fused=cuda)
    n = len(tr_images)
    bs = min(recipe.batch_size, n)
    micro = min(recipe.micro_batch_size or (bs if cuda else 32), bs)
    steps_per_epoch = max(1, n // bs)
    epochs = recipe.epochs
    warmup = max(1, round(recipe.warmup_epochs * steps_per_epoch))
    gen = torch.Generator(device=dev).manual_seed(recipe.seed)
    history: list[dict[str, float]] = []
    step = 0
    train_started = time.time()
    with _progress(console) as progress:
        task = progress.add_task("train", total=epochs * steps_per_epoch, info="")
        epoch = 0
        while epoch < epochs:
            t_epoch = time.time()
            net.train()
            perm = torch.randperm(n, device=dev, generator=gen)
            sums = torch.zeros(2, device=dev)
            for i in range(steps_per_epoch):
                idx = perm[i * bs : (i + 1) * bs]
                for g in opt.param_groups:
                    g["lr"] = recipe.lr * g["lr_scale"] * _lr_factor(step, warmup, epochs * steps_per_epoch)
                opt.zero_grad(set_to_none=True)
                for part in idx.split(micro):
                    x = tr_images[part]
                    x = augment(x, gen=gen) if recipe.augment else x.float()
                    x = normalize(x, pre)
                    if cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(dev.type, torch.bfloat16, enabled=cuda):
                        head_loss, cap_loss = _losses(net, x, part, tr_t, class_w, codec, recipe)
                    # Each part's mean loss, weighted by its share of the batch: the batch's mean.
                    share = len(part) / len(idx)
                    ((head_loss + recipe.caption_weight * cap_loss) * share).backward()
                    sums += torch.stack([head_loss.detach(), cap_loss.detach()]) * share
                if recipe.grad_clip:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip, foreach=True)
                opt.step()
                decay = min(recipe.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    torch._foreach_lerp_(ema_state, net_state, 1 - decay)
                step += 1
                progress.advance(task)
            means = (sums / steps_per_epoch).tolist()
            stats, _ = _validate(ema, va_images, va_t, codec, pre, 512) if len(va_images) else ({}, {})
            entry = {
                "epoch": epoch + 1,
                "lr": opt.param_groups[0]["lr"],
                "train_head_loss": means[0],
                "train_caption_loss": means[1],
                "train_loss": means[0] + recipe.caption_weight * means[1],
                "seconds": time.time() - t_epoch,
                **stats,
            }
            history.append(entry)
            info = f"loss {entry['train_loss']:.3f}"
            if stats:
                info += (
                    f" val articleType {stats['val_acc_articleType']:.3f} tok {stats['val_token_acc']:.3f}"
                )
            progress.update(task, info=info)
            say(
                f"epoch {epoch + 1}/{epochs}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k != "epoch")
            )
            epoch += 1
            if recipe.max_minutes and epoch >= 2 and epoch < epochs:
                # Fit the run into its time budget: fewer epochs, the cosine schedule rescaled. Epoch 1
                # is left out of the estimate: it pays one-time costs (cuDNN autotuning, allocator warm-up).
                per_epoch = sum(h["seconds"] for h in history[1:]) / len(history[1:])
                left = recipe.max_minutes * 60 - (time.time() - t_start) - _RESERVE_S
                affordable = epoch + max(0, int(left / per_epoch))
                if affordable < epochs:
                    say(f"[yellow]time budget: running {affordable} epochs instead of {epochs}[/]")
                    epochs = affordable
                    progress.update(task, total=epochs * steps_per_epoch)
    train_seconds = time.time() - train_started

    # Export whichever of the EMA and the raw weights validates better on articleType.
    chosen = ema
    if len(va_images):
        raw_stats, _ = _validate(net, va_images, va_t, codec, pre, 512)
        if raw_stats["val_acc_articleType"] > history[-1]["val_acc_articleType"]:
            chosen = net
    chosen.eval()
    # Calibration on the validation split: one temperature per head (fitted on logits, cheap).
    temperatures: dict[str, float] = {}
    if len(va_images):
        _, va_logits = _validate(chosen, va_images, va_t, codec, pre, 512)
        temperatures = {f: fit_temperature(va_logits[f].cpu(), va_t.labels[f].cpu()) for f in HEAD_FIELDS}
    config = replace(config, temperatures=temperatures)

    model = EnrichModel(chosen, config, codec, dev)
    raw = run_model(model, va_images.cpu(), batch_size=256) if len(va_images) else None
    thresholds = (
        fit_thresholds(raw, val_items, precision=recipe.threshold_precision, cap=recipe.threshold_cap)
        if raw is not None
        else {}
    )
    training_info = {
        "command": command,
        "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(recipe).items()},
        "epochs_run": epochs,
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "init_from": started_from.to_dict() if started_from else None,
        "n_train": len(train_items),
        "n_val": len(val_items),
        "history": history,
    }
    config = replace(config, thresholds=thresholds, training=training_info)
    # save_bundle rounds the weights in place to the storage dtype, so evaluate after it: what is scored
    # here is exactly what load_bundle will serve.
    save_bundle(chosen, config, codec, out)
    model = EnrichModel(chosen, config, codec, dev)
    raw = run_model(model, va_images.cpu(), batch_size=256) if len(va_images) else None
    evaluation = score(raw, val_items, thresholds) if raw is not None else Evaluation(0, {}, {})
    config = replace(config, metrics=evaluation.to_dict())
    _replace_config(config, out)
    return TrainResult(
        bundle=out,
        config=config,
        evaluation=evaluation,
        raw_val=raw if raw is not None else RawOutput({}, {}, {}, [], torch.zeros(0)),
        history=history,
    )
