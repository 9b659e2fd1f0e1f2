"""The two ceilings of a worker: model forward passes alone, and decoding alone.

Imports only torch, Pillow and the model package, so it also runs where the service stack is not
installed (`python -m enrich.ceilings` on a bare GPU machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from worker.decode import decode_image

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
    model: Model, blobs: list[bytes], *, threads: int, max_pixels: int
) -> tuple[float, list[torch.Tensor]]:
    def one(data: bytes) -> torch.Tensor:
        return model.preprocess(decode_image(data, max_pixels=max_pixels, target_size=model.image_size).image)

    tensors: list[torch.Tensor] = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, blobs[: min(len(blobs), 32)]))  # warm-up
        seconds = _timed(lambda: tensors.extend(pool.map(one, blobs)))
    return len(blobs) / seconds, tensors


def model_ceiling(model: Model, tensors: list[torch.Tensor], *, batch_size: int) -> float:
    batches = [torch.stack(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]
    model.predict(batches[0])  # warm-up: kernels, autotuning, allocator
    seconds = _timed(lambda: [model.predict(batch) for batch in batches])
    return len(tensors) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", nargs="+", type=Path, help="folders of JPEGs (cycled up to --n)")
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    from worker.model import load_bundle

    model = load_bundle(args.bundle, device=args.device)
    print(machine_description())
    for folder in args.folders:
        paths = sorted(folder.glob("*.jpg"))
        blobs = [paths[i % len(paths)].read_bytes() for i in range(args.n)]
        rate, tensors = decode_ceiling(model, blobs, threads=args.threads, max_pixels=60_000_000)
        print(f"{folder.name}: decode {rate:,.1f} images/s ({args.threads} threads)")
        for batch_size in args.batch_size:
            rate = model_ceiling(model, tensors, batch_size=batch_size)
            print(f"{folder.name}: model {rate:,.1f} images/s (batch {batch_size}, {model.device})")
        if torch.cuda.is_available():
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
