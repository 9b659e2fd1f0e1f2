"""The bundle format and serving API on a tiny random bundle (CPU, a few seconds)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from schema.results import DERIVED_FIELDS, FIELDS, HEAD_FIELDS
from worker.model.bundle import EnrichModel, clear_cache, load_bundle, resolve_bf16, save_bundle
from worker.model.config import BundleConfig
from worker.model.network import create_model
from worker.model.random_bundle import random_config, write_random_bundle
from worker.model.tokenizer import TitleCodec, train_tokenizer


def _images(n: int, size: tuple[int, int] = (60, 80)) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(1)
    return [
        Image.fromarray(
            torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
        )
        for _ in range(n)
    ]


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    clear_cache()
    return write_random_bundle(tmp_path / "bundle")


def test_files_and_config(bundle: Path) -> None:
    assert {p.name for p in bundle.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    raw = json.loads((bundle / "config.json").read_text())
    for key in ("labels", "derived", "preprocessing", "decoder", "thresholds", "name", "version", "data"):
        assert key in raw
    model = load_bundle(bundle)
    assert model.name == "enrich-random"
    assert model.version.count(".") == 2
    assert model.image_size == (64, 48)
    assert set(model.config.labels) == set(HEAD_FIELDS)


def test_preprocess_shape_and_dtype(bundle: Path) -> None:
    model = load_bundle(bundle)
    for size in ((60, 80), (53, 80), (1200, 1600), (100, 40)):
        x = model.preprocess(_images(1, size)[0])
        assert x.dtype == torch.uint8
        assert tuple(x.shape) == (3, *model.image_size)


def test_load_is_cached(bundle: Path) -> None:
    assert load_bundle(bundle) is load_bundle(bundle, device="cpu")


def test_round_trip_matches_in_memory_model(tmp_path: Path) -> None:
    clear_cache()
    torch.manual_seed(3)
    config = random_config()
    codec = TitleCodec(
        train_tokenizer(["Puma Men Black Backpack", "Nike Women White Tshirt"], min_frequency=1)
    )
    net = create_model(config, codec.vocab_size)
    path = save_bundle(net, config, codec, tmp_path / "b")
    in_memory = EnrichModel(net, config, codec, torch.device("cpu"))
    loaded = load_bundle(path)
    model_images = _images(4)
    batch = torch.stack([loaded.preprocess(im) for im in model_images])
    a, b = in_memory.predict(batch), loaded.predict(batch)
    assert len(a) == len(b) == 4
    for pa, pb in zip(a, b, strict=True):
        assert pa.caption == pb.caption
        assert pa.caption_confidence == pytest.approx(pb.caption_confidence, abs=1e-5)
        for f in FIELDS:
            assert pa.fields[f].value == pb.fields[f].value
            assert pa.fields[f].confidence == pytest.approx(pb.fields[f].confidence, abs=1e-5)


def test_prediction_contract(bundle: Path) -> None:
    model = load_bundle(bundle)
    preds = model.predict(torch.stack([model.preprocess(im) for im in _images(3)]))
    assert len(preds) == 3
    for p in preds:
        assert set(p.fields) == set(FIELDS)
        assert isinstance(p.caption, str)
        assert 0.0 <= p.caption_confidence <= 1.0
        for f in FIELDS:
            fp = p.fields[f]
            assert 1 <= len(fp.top_k) <= 3
            assert 0.0 <= fp.confidence <= 1.0 + 1e-6
            probs = [q for _, q in fp.top_k]
            assert probs == sorted(probs, reverse=True)
        article = p.fields["articleType"].value
        assert article is not None  # thresholds are 0 in a random bundle
        for f in DERIVED_FIELDS:
            # Derived values follow the reported articleType through the training mapping ...
            assert p.fields[f].value == model.config.derived[f][article]
            # ... with the summed probability of every articleType that maps to that value.
            members = {a for a, v in model.config.derived[f].items() if v == p.fields[f].value}
            art_top = dict(p.fields["articleType"].top_k)
            assert p.fields[f].confidence >= max((art_top.get(a, 0.0) for a in members), default=0.0) - 1e-6


def test_thresholds_give_unknown(tmp_path: Path) -> None:
    clear_cache()
    path = write_random_bundle(tmp_path / "b")
    config = BundleConfig.read(path)
    strict = replace(config, thresholds={"gender": 1.01, "masterCategory": 1.01, "usage": 0.0})
    strict.save(path / "config.json")
    model = load_bundle(path)
    for p in model.predict(torch.stack([model.preprocess(im) for im in _images(2)])):
        assert p.fields["gender"].value is None
        assert p.fields["gender"].confidence > 0.0  # still reported
        assert p.fields["masterCategory"].value is None
        assert p.fields["usage"].value is not None


def test_rejects_float_batches(bundle: Path) -> None:
    model = load_bundle(bundle)
    with pytest.raises(ValueError):
        model.predict(torch.zeros(1, 3, *model.image_size))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(bundle: Path) -> None:
    cpu = load_bundle(bundle, device="cpu")
    gpu = load_bundle(bundle, device="cuda")
    batch = torch.stack([cpu.preprocess(im) for im in _images(4)])
    for a, b in zip(cpu.predict(batch), gpu.predict(batch), strict=True):
        assert a.fields["articleType"].confidence == pytest.approx(
            b.fields["articleType"].confidence, abs=0.05
        )


def test_flip_tta_changes_only_the_heads(tmp_path: Path) -> None:
    clear_cache()
    path = write_random_bundle(tmp_path / "b")
    plain = load_bundle(path)
    batch = torch.stack([plain.preprocess(im) for im in _images(2)])
    a = plain.infer(batch)
    clear_cache()
    raw = json.loads((path / "config.json").read_text())
    raw["flip_tta"] = True
    (path / "config.json").write_text(json.dumps(raw))
    tta = load_bundle(path)
    assert tta.config.flip_tta
    b = tta.infer(batch)
    assert a.captions == b.captions
    assert not torch.allclose(a.probs["articleType"], b.probs["articleType"])


def test_precision_rules() -> None:
    cpu = torch.device("cpu")
    assert resolve_bf16("bf16", cpu) and not resolve_bf16("fp32", cpu)
    assert resolve_bf16("auto", torch.device("cuda"))
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_bf16("fp16", cpu)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"), [(False, False, False), (True, False, True), (False, True, True)]
)
def test_auto_precision_takes_bf16_only_where_the_cpu_computes_it_natively(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, expected: bool
) -> None:
    # An AVX512 CPU without BF16 (Skylake to Ice Lake) passes oneDNN's bf16 check by emulation, 1.8x slower
    # than fp32 on the default model: "auto" must keep fp32 there.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_bf16("auto", torch.device("cpu")) is expected


def test_fp32_and_bf16_models_are_cached_apart(bundle: Path) -> None:
    fp32 = load_bundle(bundle, precision="fp32")
    bf16 = load_bundle(bundle, precision="bf16")
    assert fp32 is not bf16 and not fp32.bf16 and bf16.bf16
    assert load_bundle(bundle, precision="fp32") is fp32


def test_beam_search_of_width_one_is_greedy_and_wider_beams_keep_the_contract(bundle: Path) -> None:
    model = load_bundle(bundle, precision="fp32")
    decoder, codec = model.net.decoder, model.codec
    special = {"bos": codec.bos, "eos": codec.eos, "pad": codec.pad}
    with torch.inference_mode():
        memory = model.net.memory(model.net.features(torch.randn(5, 3, *model.image_size)))
        greedy_ids, greedy_conf = decoder.greedy(memory, **special)
        one_ids, one_conf = decoder.beam(memory, beams=1, **special)
        wide_ids, wide_conf = decoder.beam(memory, beams=4, **special)
    assert torch.equal(greedy_ids, one_ids) and torch.allclose(greedy_conf, one_conf)
    assert wide_ids.shape == greedy_ids.shape and bool(((wide_conf > 0) & (wide_conf <= 1)).all())
    for row in wide_ids.tolist():  # pad only after EOS
        if codec.eos in row:
            assert set(row[row.index(codec.eos) + 1 :]) <= {codec.pad}


def test_a_title_never_shows_the_unknown_word_token() -> None:
    titles = ["Puma Men Black Backpack", "Nike Women White Tshirt"]
    codec = TitleCodec(train_tokenizer(titles, min_frequency=1))
    ids = codec.encode("Puma Men Zorblax Backpack", max_tokens=8)
    assert codec.unk in ids  # the rare word has no id of its own
    assert codec.decode(ids) == "Puma Men Backpack"


def test_a_save_that_fails_on_the_way_leaves_the_previous_bundle_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.model.bundle import build_from_bundle
    from worker.model.config import CONFIG_NAME, WEIGHTS_NAME

    old = write_random_bundle(tmp_path / "bundle", seed=0)
    before = {name: (old / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)}
    net, config, codec = build_from_bundle(write_random_bundle(tmp_path / "other", seed=1))

    def disk_full(self: TitleCodec) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TitleCodec, "to_json", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_bundle(net, config, codec, old)
    # The new weights were written over the old ones before the tokenizer failed: a bundle of mixed parts.
    assert {name: (old / name).read_bytes() for name in before} == before
    assert not list(old.glob(".*.partial"))
