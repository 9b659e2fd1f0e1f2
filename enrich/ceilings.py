"""The two ceilings of a worker: model forward passes alone, and decoding alone.

Needs no running service (no Redis, Postgres or S3 server), so `python -m enrich.ceilings` runs on a GPU
machine with only the packages of the device kit (scripts/device_kit.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from worker.image_pool import ImagePool
from worker.storage import LocalStore

if TYPE_CHECKING:
    from worker.pipeline import Model


def machine_description() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def _timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def decode_ceiling(
    decoder: ImagePool, blobs: list[bytes], *, threads: int
) -> tuple[float, list[torch.Tensor]]:
    """Images/s through the worker's own decode path (its process pool; `threads` callers when inline)."""

    def decode_all(chunk: list[bytes]) -> list[torch.Tensor]:
        if decoder.processes > 0:
            futures = [decoder.submit(data) for data in chunk]
            return [torch.from_numpy(decoder.result(future).pixels) for future in futures]
        with ThreadPoolExecutor(threads) as pool:
            return [torch.from_numpy(decoded.pixels) for decoded in pool.map(decoder.decode, chunk)]

    decode_all(blobs[:32])  # warm-up: the decoding processes start and import
    tensors: list[torch.Tensor] = []
    seconds = _timed(lambda: tensors.extend(decode_all(blobs)))
    return len(blobs) / seconds, tensors


@dataclass(frozen=True)
class ModelCeiling:
    rate: float  # images/s over the timed batches
    first_batch_s: float  # the untimed first batch: in a fresh process, with the one-time costs
    batch_s: float  # a timed batch, on average


def model_ceiling(model: Model, tensors: list[torch.Tensor], *, batch_size: int) -> ModelCeiling:
    """Images/s of the model's part of a batch: collating the decoded images into one input on the device
    (with the upscale, where the decoders leave it to the device) and the forward pass."""
    chunks = [tensors[i : i + batch_size] for i in range(0, len(tensors), batch_size)]
    # Untimed for the rate: kernels load, the allocator grows (what the worker's warm-up pays at start).
    first = _timed(lambda: model.predict(model.collate(chunks[0])))
    seconds = _timed(lambda: [model.predict(model.collate(chunk)) for chunk in chunks])
    return ModelCeiling(rate=len(tensors) / seconds, first_batch_s=first, batch_s=seconds / len(chunks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", nargs="+", type=Path, help="folders of JPEGs (cycled up to --n)")
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256])
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="decoding processes")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    from worker.model.bundle import load_bundle

    model = load_bundle(args.bundle, device=args.device)
    decoder = ImagePool(
        store=LocalStore(Path.cwd()),  # unused: only decoding is measured
        preprocessing=model.preprocessing,
        max_pixels=60_000_000,
        processes=args.processes,
        fetch_processes=1,
        timeout_s=10.0,
        memory_mb=1024,
        defer_upscale=model.upscales_on_device,
    )
    print(machine_description())
    for folder in args.folders:
        paths = sorted(folder.glob("*.jpg"))
        blobs = [paths[i % len(paths)].read_bytes() for i in range(args.n)]
        rate, tensors = decode_ceiling(decoder, blobs, threads=args.processes)
        print(f"{folder.name}: decode {rate:,.1f} images/s ({args.processes} processes)")
        for batch_size in args.batch_size:
            ceiling = model_ceiling(model, tensors, batch_size=batch_size)
            print(
                f"{folder.name}: model {ceiling.rate:,.1f} images/s (batch {batch_size}, {model.device}; "
                f"first batch {ceiling.first_batch_s * 1000:,.0f} ms, then {ceiling.batch_s * 1000:,.0f} ms)"
            )
        if torch.cuda.is_available():
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")
    decoder.close()


if __name__ == "__main__":
    main()
