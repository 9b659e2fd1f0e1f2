"""The upscale a GPU worker runs on its device instead of in the decoding processes: Pillow's, pixel for
pixel (worker/model/upscale.py), through the real decoding processes and pipeline."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import Engine, delete

from schema.settings import Settings
from schema.tables import Enrichment
from tests.conftest import sample_jpegs
from worker.decode import decode_to_input
from worker.image_pool import ImagePool
from worker.model.bundle import EnrichModel, build_from_bundle
from worker.model.config import PreprocessConfig
from worker.model.preprocess import preprocess_array
from worker.model.random_bundle import write_random_bundle
from worker.model.upscale import assemble
from worker.pipeline import Job
from worker.runtime import build_pipeline
from worker.storage import LocalStore

CPU = torch.device("cpu")
INPUT = (256, 192)


def _odd_images() -> list[Image.Image]:
    """Random pixels in shapes a catalogue does not have: square, wide, tall, tiny, larger than the input."""
    rng = np.random.default_rng(0)
    shapes = [(60, 60), (100, 40), (33, 97), (1, 1), (200, 300), (61, 79), (190, 255), (192, 256)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in shapes]


def _photos() -> list[Image.Image]:
    return [Image.open(io.BytesIO(data)).convert("RGB") for data in sample_jpegs(8)]


@pytest.mark.parametrize(
    "pre",
    [
        PreprocessConfig(input_size=INPUT),
        PreprocessConfig(input_size=INPUT, resize="stretch"),
        PreprocessConfig(input_size=INPUT, detail_size=None, fill=0),
    ],
    ids=["letterbox", "stretch", "no-detail-size"],
)
def test_the_device_upscale_gives_pillows_pixels(pre: PreprocessConfig) -> None:
    images = _photos() + _odd_images()
    pillow = torch.stack([torch.from_numpy(preprocess_array(image, pre)) for image in images])
    deferred = [torch.from_numpy(preprocess_array(image, pre, defer_upscale=True)) for image in images]
    # The catalogue's 60x80 photos reach the device at 60x80: the decoders did not upscale them.
    assert all(tuple(d.shape) == (3, 80, 60) for d in deferred[:8])
    assert sum(tuple(d.shape[1:]) != INPUT for d in deferred) >= 12
    on_device = assemble(deferred, pre, CPU)
    assert on_device.dtype == torch.uint8
    assert torch.equal(on_device, pillow)  # bit for bit, whatever the mix of sizes in the batch
    assert torch.equal(assemble(deferred[:8], pre, CPU), pillow[:8])  # one size: the usual batch


def test_an_image_that_shrinks_is_resized_by_pillow_even_when_upscales_are_deferred() -> None:
    pre = PreprocessConfig(input_size=(64, 48))  # the 60x80 photos shrink to 64x48
    photo = _photos()[0]
    deferred = preprocess_array(photo, pre, defer_upscale=True)
    assert np.array_equal(deferred, preprocess_array(photo, pre))


def test_the_decoding_processes_hand_over_small_images_that_collate_to_pillows_input() -> None:
    pre = PreprocessConfig(input_size=INPUT)
    blobs = sample_jpegs(6)
    pool = ImagePool(
        store=LocalStore(Path.cwd()),
        preprocessing=pre,
        max_pixels=10_000_000,
        processes=2,
        fetch_processes=1,
        timeout_s=10.0,
        memory_mb=1024,
        defer_upscale=True,
    )
    try:
        decoded = [pool.result(pool.submit(data)) for data in blobs]
    finally:
        pool.close()
    assert all(d.pixels.shape == (3, 80, 60) for d in decoded)  # a tenth of the bytes through the pipe
    pillow = torch.stack(
        [torch.from_numpy(decode_to_input(data, pre=pre, max_pixels=10_000_000).pixels) for data in blobs]
    )
    assert torch.equal(assemble([torch.from_numpy(d.pixels) for d in decoded], pre, CPU), pillow)


def test_a_pipeline_that_upscales_on_the_device_writes_the_rows_pillows_input_gives(
    settings: Settings, pg_engine: Engine, tmp_path: Path
) -> None:
    bundle = write_random_bundle(tmp_path / "bundle", image_size=INPUT)
    root = tmp_path / "drop"
    root.mkdir()
    for i, data in enumerate(sample_jpegs(6)):
        (root / f"{i}.jpg").write_bytes(data)
    store = LocalStore(root)
    jobs = [Job(ref=ref) for ref in store.list()]
    predictions = {}
    for on_device in (False, True):
        model = EnrichModel(*build_from_bundle(bundle), CPU, precision="fp32")
        model.upscales_on_device = on_device
        pipeline = build_pipeline(settings, model=model, store=store)
        try:
            assert pipeline.decoder.defer_upscale is on_device
            outcomes = pipeline.process(jobs)
        finally:
            pipeline.close()
        assert [o.status for o in outcomes] == ["ok"] * len(jobs)
        predictions[on_device] = [o.result.prediction for o in outcomes if o.result]
        with pg_engine.begin() as connection:  # the second run must not skip the images as done
            connection.execute(delete(Enrichment))
    # The same input pixels, so the same prediction to the last digit of every confidence.
    assert predictions[True] == predictions[False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_model_upscales_and_predicts_as_from_pillows_input(tmp_path: Path) -> None:
    bundle = write_random_bundle(tmp_path / "bundle", image_size=INPUT)
    model = EnrichModel(*build_from_bundle(bundle), torch.device("cuda"), precision="fp32")
    assert model.upscales_on_device
    pre = model.preprocessing
    images = _photos() + _odd_images()
    deferred = [torch.from_numpy(preprocess_array(image, pre, defer_upscale=True)) for image in images]
    collated = model.collate(deferred)
    assert collated.is_cuda
    pillow = torch.stack([torch.from_numpy(preprocess_array(image, pre)) for image in images])
    assert torch.equal(collated.cpu(), pillow)
    on_device, from_pillow = model.infer(collated), model.infer(pillow)
    assert torch.equal(on_device.best["articleType"], from_pillow.best["articleType"])
    assert on_device.captions == from_pillow.captions
