"""Model bundles on disk (`model.safetensors` + `config.json` [+ `tokenizer.json`]) and the serving model."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from schema.results import DERIVED_FIELDS, FIELDS, HEAD_FIELDS, FieldPrediction, ImagePrediction
from worker.device import resolve_device as resolve_device_name
from worker.model.config import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, BundleConfig
from worker.model.fuse import fold_batch_norms, fuse_conv_activations
from worker.model.network import EnrichNet, create_model
from worker.model.preprocess import normalize, preprocess_array
from worker.model.tokenizer import TitleCodec
from worker.model.upscale import assemble

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    # One rule for "auto", and every load path refuses CUDA in a forked child.
    return torch.device(resolve_device_name(device))


def derived_matrix(config: BundleConfig, field: str) -> tuple[torch.Tensor, list[str]]:
    """(n_articleTypes x n_values) 0/1 matrix mapping articleType probabilities onto a derived field."""
    mapping = config.derived[field]
    values = sorted(set(mapping.values()))
    index = {v: i for i, v in enumerate(values)}
    m = torch.zeros(len(config.labels["articleType"]), len(values))
    for a, article in enumerate(config.labels["articleType"]):
        m[a, index[mapping[article]]] = 1.0
    return m, values


@dataclass
class RawOutput:
    """Calibrated class probabilities per field (FIELDS, on CPU), the class each field reports, and the
    decoded captions. `best` is the one rule for the reported value, shared by serving and evaluation."""

    probs: dict[str, torch.Tensor]
    labels: dict[str, list[str]]
    best: dict[str, torch.Tensor]  # field -> long (N,): index into labels[field]
    captions: list[str]
    caption_confidence: torch.Tensor


PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX. Not oneDNN's `_is_mkldnn_bf16_supported`: that is true on any AVX512 CPU, where
    oneDNN emulates bf16, and the emulation ran the default model 1.8x slower than fp32 (an Ice Lake Xeon,
    2026-12-07). An unknown CPU (these probes are private to torch) counts as without."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(torch.cpu, name)()) for name in probes if hasattr(torch.cpu, name))
    except RuntimeError:
        return False


def resolve_bf16(precision: str, device: torch.device) -> bool:
    """Whether to run under bf16 autocast. "auto": on CUDA, and on CPUs with native bf16 (AVX512-BF16 or
    AMX: 2.1x faster than fp32 on an AVX512-BF16 EPYC; every held-out accuracy within 0.003 of fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or cpu_has_native_bf16()


class EnrichModel:
    """A loaded bundle: preprocess on the CPU, predict a uint8 batch on the device."""

    def __init__(
        self,
        net: EnrichNet,
        config: BundleConfig,
        codec: TitleCodec,
        device: torch.device,
        *,
        precision: str = "auto",
    ) -> None:
        self.config = config
        self.name = config.name
        self.version = config.version
        self.preprocessing = config.preprocessing
        self.image_size: tuple[int, int] = config.preprocessing.input_size
        self.device = device
        self.codec = codec
        self._cuda = device.type == "cuda"
        # Where the decoders leave the upscale to `collate` (worker/model/upscale.py): on a GPU, where it is
        # nearly free; on the CPU Pillow's resize in the decoding processes is cheaper.
        self.upscales_on_device = self._cuda
        self.bf16 = resolve_bf16(precision, device)
        # The served network is a copy (the caller's, e.g. the trainer's, keeps its BatchNorms and dtype)
        # rewritten for inference (worker/model/fuse.py), in bf16 when autocast would run it in bf16
        # anyway: autocast otherwise re-casts every weight on every call (one decoder step at a time).
        served = copy.deepcopy(net).eval()
        fold_batch_norms(served)
        if device.type == "cpu":
            fuse_conv_activations(served, torch.bfloat16 if self.bf16 else torch.float32)
        if self.bf16:
            served = served.to(torch.bfloat16)
        # channels_last on every device: 1.7x faster on this CPU too (oneDNN's preferred layout).
        self.net = served.to(memory_format=torch.channels_last).to(device)
        self._derived = {f: derived_matrix(config, f) for f in DERIVED_FIELDS}
        self._temps = {f: float(config.temperatures.get(f, 1.0)) for f in HEAD_FIELDS}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess_array(image, self.config.preprocessing))

    def collate(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decoded uint8 CHW images (at the input size, or smaller where the decoders deferred the
        upscale) -> the uint8 NCHW input batch, on the device."""
        return assemble(pixels, self.preprocessing, self.device)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8 or batch.dim() != 4:
            raise ValueError(f"expected a uint8 NCHW batch, got {batch.dtype} {tuple(batch.shape)}")
        if self._cuda and batch.device.type == "cpu":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch

    def infer(self, batch: torch.Tensor) -> RawOutput:
        """The full distributions (for evaluation) and captions of a uint8 NCHW batch (on the CPU, or on
        the device from `collate`)."""
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            x = normalize(
                self._to_device(batch),
                self.config.preprocessing,
                torch.bfloat16 if self.bf16 else torch.float32,
                torch.channels_last,
            )
            fmap = self.net.features(x)
            logits = self.net.head_logits(fmap)
            if self.config.flip_tta:
                mirrored = self.net.head_logits(self.net.features(x.flip(3)))
                logits = {f: (logits[f] + mirrored[f]) / 2 for f in logits}
            memory = self.net.memory(fmap)
            special = {"bos": self.codec.bos, "eos": self.codec.eos, "pad": self.codec.pad}
            if self.config.caption_beams > 1:
                ids, conf = self.net.decoder.beam(memory, beams=self.config.caption_beams, **special)
            else:
                ids, conf = self.net.decoder.greedy(memory, **special)
            probs = {f: torch.softmax(logits[f].float() / self._temps[f], dim=-1).cpu() for f in HEAD_FIELDS}
        labels = {f: self.config.labels[f] for f in HEAD_FIELDS}
        best = {f: probs[f].argmax(dim=1) for f in HEAD_FIELDS}
        for f, (matrix, values) in self._derived.items():
            probs[f] = probs["articleType"] @ matrix
            labels[f] = values
            # Consistent with the reported articleType: the value its best class maps to (whose confidence
            # is the summed probability of every articleType mapping to that value).
            best[f] = matrix.argmax(dim=1)[best["articleType"]]
        captions = [self.codec.decode(row) for row in ids.cpu().tolist()]
        return RawOutput(
            probs=probs, labels=labels, best=best, captions=captions, caption_confidence=conf.float().cpu()
        )

    def predict(self, batch: torch.Tensor) -> list[ImagePrediction]:
        raw = self.infer(batch)
        k = self.config.top_k
        # Whole-batch tensor ops, then plain lists: indexing a tensor per image and field cost ~120 µs of
        # the worker's one GIL per image.
        columns: dict[str, tuple[list[list[float]], list[list[int]], list[int], list[float]]] = {}
        for f in FIELDS:
            probs = raw.probs[f]
            top_p, top_i = probs.topk(min(k, probs.size(1)), dim=1)
            best = raw.best[f]
            conf = probs.gather(1, best.unsqueeze(1)).squeeze(1)
            columns[f] = (top_p.tolist(), top_i.tolist(), best.tolist(), conf.tolist())
        caption_confidence = raw.caption_confidence.tolist()
        out: list[ImagePrediction] = []
        for i, caption in enumerate(raw.captions):
            fields: dict[str, FieldPrediction] = {}
            for f, (ps, js, picks, confs) in columns.items():
                labels = raw.labels[f]
                threshold = self.config.thresholds.get(f, 0.0)
                fields[f] = FieldPrediction(
                    value=labels[picks[i]] if confs[i] >= threshold else None,
                    confidence=confs[i],
                    top_k=tuple((labels[j], p) for j, p in zip(js[i], ps[i], strict=True)),
                )
            out.append(
                ImagePrediction(fields=fields, caption=caption, caption_confidence=caption_confidence[i])
            )
        return out


def save_bundle(net: EnrichNet, config: BundleConfig, codec: TitleCodec, path: Path) -> Path:
    """Write a bundle. The network's weights are first rounded in place to the storage dtype, so the
    in-memory model and the saved one predict exactly alike."""
    path.mkdir(parents=True, exist_ok=True)
    dtype = _DTYPES[config.weights_dtype]
    state = {}
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.is_floating_point():
                stored = tensor.detach().to("cpu", dtype).contiguous()
                tensor.copy_(stored.to(tensor.dtype))
            else:
                stored = tensor.detach().cpu().contiguous()
            state[name] = stored
    # Every file is written beside its final name first, then all are renamed at once: a save killed on the
    # way (a full disk, a lost machine) leaves the previous bundle whole instead of new weights under an old
    # config. The folder's other files (a README, reports) stay.
    staged = {name: path / f".{name}.partial" for name in (WEIGHTS_NAME, TOKENIZER_NAME, CONFIG_NAME)}
    try:
        save_file(state, str(staged[WEIGHTS_NAME]), metadata={"name": config.name, "version": config.version})
        staged[TOKENIZER_NAME].write_text(codec.to_json())
        replace(config, tokenizer=None).save(staged[CONFIG_NAME])
        for name, partial in staged.items():
            os.replace(partial, path / name)
    finally:
        for partial in staged.values():
            partial.unlink(missing_ok=True)
    return path


def build_from_bundle(path: Path) -> tuple[EnrichNet, BundleConfig, TitleCodec]:
    config = BundleConfig.read(path)
    codec = TitleCodec.from_json(config.tokenizer_json(path))
    net = create_model(config, codec.vocab_size)
    state = load_file(str(path / WEIGHTS_NAME))
    own = net.state_dict()
    net.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}, strict=True)
    return net, config, codec


_cache: dict[tuple[str, str, str], EnrichModel] = {}
_lock = threading.Lock()


def load_bundle(path: Path, *, device: str = "cpu", precision: str = "auto") -> EnrichModel:
    """Load a bundle once per (path, device, precision); later calls return the same model. Thread-safe."""
    dev = resolve_device(device)
    key = (str(Path(path).resolve()), str(dev), precision)
    with _lock:
        model = _cache.get(key)
        if model is None:
            net, config, codec = build_from_bundle(Path(path))
            model = EnrichModel(net, config, codec, dev, precision=precision)
            _cache[key] = model
        return model


def clear_cache() -> None:
    """Forget loaded bundles (tests that rewrite a bundle in place)."""
    with _lock:
        _cache.clear()
