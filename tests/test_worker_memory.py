"""Memory bounds of a worker process: the fetched-bytes budget (waits while full, lets an oversized object
in alone, never deadlocks holders that grow) and the decoding processes' room to receive an object."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from schema.settings import Settings
from worker.budget import ByteBudget

REPO = Path(__file__).resolve().parents[1]


def test_a_reservation_waits_until_a_release_makes_room() -> None:
    budget = ByteBudget(10)
    first = budget.reserve(8)
    waiter = threading.Thread(target=budget.reserve, args=(5,))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and budget.held == 8  # 8 + 5 > 10: waiting
    first.release()
    waiter.join(5)
    assert not waiter.is_alive() and budget.held == 5


def test_an_object_larger_than_the_budget_gets_in_alone() -> None:
    budget = ByteBudget(10)
    huge = budget.reserve(25)  # nothing else held: let in, or it would wait forever
    assert budget.held == 25
    huge.release()
    huge.release()  # a second release frees nothing more
    assert budget.held == 0


def test_holders_that_grow_do_not_wait_for_each_other() -> None:
    # Both objects turn out larger than their events said; the bytes are already in hand, so waiting for
    # each other's release would deadlock. They overshoot the budget instead, and the next one waits.
    budget = ByteBudget(10)
    a, b = budget.reserve(4), budget.reserve(4)
    a.resize(9)
    b.resize(9)
    assert budget.held == 18
    unknown = budget.reserve(0)  # an object of unknown size holds nothing before its GET ...
    grown = threading.Thread(target=unknown.resize, args=(3,))
    grown.start()
    grown.join(0.2)
    assert grown.is_alive()  # ... and, holding nothing, waits for room once its size is known
    a.release()
    b.release()
    grown.join(5)
    assert budget.held == 3


def test_settings_refuse_a_decode_memory_limit_too_small_to_receive_the_largest_object() -> None:
    # Measured: a 600 MB object killed a 1024 MiB decoding process while it was being received, and the
    # pool it belonged to then failed every job or hung.
    with pytest.raises(ValidationError, match="ENRICH_DECODE_MEMORY_MB=1024 is too small"):
        Settings(max_object_bytes=600 * 2**20)
    assert Settings(max_object_bytes=600 * 2**20, decode_memory_mb=2100).decode_memory_mb == 2100
    assert Settings(max_object_bytes=600 * 2**20, decode_processes=0).decode_processes == 0  # no processes


_MAIN_THAT_MAPS_A_LOT = """
import mmap

# multiprocessing runs the main module again in every decoding process: 2 GiB of address space there
# before any decode, as a main module that imports torch maps about 3 GiB.
RESERVED = mmap.mmap(-1, 2 << 30)

if __name__ == "__main__":
    import sys
    from pathlib import Path

    from worker.image_pool import ImagePool
    from worker.model.config import PreprocessConfig
    from worker.storage import LocalStore

    pool = ImagePool(
        store=LocalStore(Path.cwd()),
        preprocessing=PreprocessConfig(input_size=(64, 48)),
        max_pixels=10_000_000,
        processes=1,
        fetch_processes=1,
        timeout_s=30.0,
        memory_mb=512,
    )
    try:
        print(tuple(pool.decode(Path(sys.argv[1]).read_bytes()).pixels.shape))
    finally:
        pool.close()
"""


def test_decoding_limits_what_a_decode_adds_not_what_the_callers_main_module_maps(tmp_path: Path) -> None:
    # `python -m enrich.ceilings` (which imports torch) failed every image as "decoding needed more than
    # 1024 MiB": the limit counted the address space the re-imported main module had already mapped.
    script = tmp_path / "main_that_maps_a_lot.py"
    script.write_text(_MAIN_THAT_MAPS_A_LOT)
    photo = tmp_path / "photo.jpg"  # a full-size photo: its decode needs fresh memory, not a reused arena
    Image.linear_gradient("L").resize((1800, 2400)).convert("RGB").save(photo, "JPEG")
    done = subprocess.run(
        [sys.executable, str(script), str(photo)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(3, 64, 48)"
