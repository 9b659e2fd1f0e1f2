"""Inference rewrites (BatchNorms folded, conv + ReLU6 fused): same outputs, the caller's net intact."""

from __future__ import annotations

import copy
from typing import TypeVar, cast

import pytest
import timm
import torch
from timm.models.efficientnet import EfficientNet
from torch import nn

import worker.model.fuse
from worker.model.bundle import EnrichModel
from worker.model.fuse import fold_batch_norms, fuse_conv_activations
from worker.model.network import BACKBONES, create_model
from worker.model.random_bundle import random_config
from worker.model.tokenizer import TitleCodec, train_tokenizer

Net = TypeVar("Net", bound=nn.Module)


def _with_trained_statistics(net: Net, seed: int) -> Net:
    """Fresh BatchNorms are the identity map; give them the non-trivial statistics a trained net has."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=gen) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)
    return net.eval()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_rewritten_backbone_computes_the_same_features(backbone: str) -> None:
    # float64: the folded arithmetic differs from the original only by rounding, which through ~50 layers
    # of random weights would swamp a float32 comparison.
    net = _with_trained_statistics(
        cast(EfficientNet, timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="")),
        seed=1,
    ).double()
    folded = copy.deepcopy(net)
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert fold_batch_norms(folded) == n_norms > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 96, 72, dtype=torch.float64)  # odd map sizes too: "same" padding must line up
    with torch.inference_mode():
        expected = net.forward_features(x)
        assert torch.allclose(folded.forward_features(x), expected, rtol=0, atol=1e-9)
    # oneDNN's fused convolution has no float64: it is checked against the folded network in float32.
    folded = folded.float()
    fused = copy.deepcopy(folded)
    assert fuse_conv_activations(fused) == sum(isinstance(m, nn.ReLU6) for m in folded.modules()) > 0
    assert not any(isinstance(m, nn.ReLU6) for m in fused.modules())
    with torch.inference_mode():
        x32 = x.float()
        assert torch.allclose(fused.forward_features(x32), folded.forward_features(x32), atol=1e-5)


def test_fold_refuses_a_network_in_training_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_serving_folds_a_copy_and_predicts_what_the_unfolded_network_does() -> None:
    torch.manual_seed(0)
    config = random_config()
    codec = TitleCodec(
        train_tokenizer(["Puma Men Black Backpack", "Nike Women White Tshirt"], min_frequency=1)
    )
    net = _with_trained_statistics(create_model(config, codec.vocab_size), seed=2)
    state_before = {k: v.clone() for k, v in net.state_dict().items()}
    model = EnrichModel(net, config, codec, torch.device("cpu"), precision="fp32")
    # The caller's network (the trainer's, which saves it next) keeps its norms and weights.
    assert net.state_dict().keys() == state_before.keys()
    assert all(torch.equal(v, state_before[k]) for k, v in net.state_dict().items())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.net.modules())
    batch = torch.randint(0, 256, (3, 3, *config.preprocessing.input_size), dtype=torch.uint8)
    raw = model.infer(batch)
    with torch.inference_mode():
        x = (batch.float() - 127.5) / 127.5  # the config's mean = std = 0.5
        logits = net.head_logits(net.features(x))
    for field, values in logits.items():
        expected = torch.softmax(values / model.config.temperatures.get(field, 1.0), dim=-1)
        assert torch.allclose(raw.probs[field], expected, atol=1e-4)


def test_only_convolutions_the_fused_call_can_express_are_fused() -> None:
    padded_by_name = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU6()).eval()
    reflected = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU6()).eval()
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6()).eval()
    assert fuse_conv_activations(padded_by_name) == fuse_conv_activations(reflected) == 0
    x = torch.randn(1, 3, 9, 7)
    with torch.inference_mode():
        expected = plain(x)
        assert fuse_conv_activations(plain) == 1
        assert torch.allclose(plain(x), expected, atol=1e-6)


def test_bf16_is_served_unfused_where_onednn_cannot_convolve_in_bf16(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An AVX2-only CPU: oneDNN's fused call raised "bf16 path needs the cpu support avx_ne_convert or
    # avx512bw, avx512vl and avx512dq" for every batch of an ENRICH_PRECISION=bf16 worker.
    monkeypatch.setattr(worker.model.fuse, "_onednn_bf16", lambda: False)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6()).eval()
    assert fuse_conv_activations(plain, torch.bfloat16) == 0
    assert "bf16 on this CPU" in caplog.text
    assert fuse_conv_activations(plain, torch.float32) == 1

    torch.manual_seed(0)
    config = random_config()
    codec = TitleCodec(train_tokenizer(["Puma Men Black Backpack"], min_frequency=1))
    net = _with_trained_statistics(create_model(config, codec.vocab_size), seed=3)
    served = {p: EnrichModel(net, config, codec, torch.device("cpu"), precision=p) for p in ("fp32", "bf16")}
    assert any(isinstance(m, worker.model.fuse.ConvReLU6) for m in served["fp32"].net.modules())
    assert not any(isinstance(m, worker.model.fuse.ConvReLU6) for m in served["bf16"].net.modules())
    batch = torch.randint(0, 256, (2, 3, *config.preprocessing.input_size), dtype=torch.uint8)
    raw = served["bf16"].infer(batch)  # raised on that CPU; how close bf16 comes: test_shipped_bundle.py
    assert len(raw.captions) == 2
    assert all(torch.allclose(probs.sum(dim=1), torch.ones(2), atol=1e-3) for probs in raw.probs.values())
