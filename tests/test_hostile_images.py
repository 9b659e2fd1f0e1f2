"""Broken and hostile images end as a clear status within bounded time and memory; never a crash."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from schema.settings import Settings
from schema.tables import Enrichment
from tests.conftest import sample_jpegs
from worker.decode import DecodeError, PixelLimitError, decode_image
from worker.local_run import plan, run_local

LIMIT = 60_000_000
TARGET = (256, 192)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def two_colour(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue: orientation is visible in the pixels."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


GOOD_VARIANTS = {
    "cmyk_jpeg": lambda: encode(two_colour().convert("CMYK"), "JPEG"),
    "png_16bit_grey": lambda: encode(Image.new("I;16", (30, 30), 40000), "PNG"),
    "palette_with_transparency": lambda: encode(two_colour().convert("P"), "PNG", transparency=0),
    "rgba_png": lambda: encode(Image.new("RGBA", (20, 20), (0, 255, 0, 10)), "PNG"),
    "la_png": lambda: encode(Image.new("LA", (20, 20), (128, 255)), "PNG"),
    "greyscale_jpeg": lambda: encode(Image.new("L", (20, 20), 90), "JPEG"),
    "one_bit_tiff": lambda: encode(Image.new("1", (20, 20), 1), "TIFF"),
    "webp": lambda: encode(two_colour(), "WEBP"),
    "bmp": lambda: encode(two_colour(), "BMP"),
    "animated_gif": lambda: encode(
        two_colour(), "GIF", save_all=True, append_images=[Image.new("RGB", (40, 20), (0, 255, 0))] * 3
    ),
    "multi_page_tiff": lambda: encode(two_colour(), "TIFF", save_all=True, append_images=[two_colour()]),
    "absurd_aspect_1x20000": lambda: encode(Image.new("RGB", (1, 20000), (9, 9, 9)), "PNG"),
}


@pytest.mark.parametrize("name", sorted(GOOD_VARIANTS))
def test_unusual_but_valid_images_decode_to_rgb(name: str) -> None:
    decoded = decode_image(GOOD_VARIANTS[name](), max_pixels=LIMIT, target_size=TARGET)
    assert decoded.image.mode == "RGB" and decoded.width > 0 and decoded.height > 0


@pytest.mark.parametrize(
    ("image", "fmt", "grey"),
    [
        (Image.new("I;16", (8, 8), 40000), "PNG", 156),
        (Image.new("I;16B", (8, 8), 40000), "TIFF", 156),  # big-endian ("MM") TIFF
        (Image.new("I;16", (8, 8), 40000), "TIFF", 156),
        (Image.new("I", (8, 8), 40000), "TIFF", 156),  # 16-bit values in a 32-bit image
        (Image.new("I", (8, 8), 200), "TIFF", 200),  # 8-bit values in a 32-bit image
        (Image.new("F", (8, 8), 0.5), "TIFF", 128),  # floats from 0 to 1
    ],
    ids=["png_i16", "tiff_i16b", "tiff_i16", "tiff_i32_16bit_values", "tiff_i32_8bit_values", "tiff_float"],
)
def test_deep_greyscale_keeps_its_grey_level(image: Image.Image, fmt: str, grey: int) -> None:
    decoded = decode_image(encode(image, fmt), max_pixels=LIMIT, target_size=TARGET)
    assert decoded.image.getpixel((4, 4)) == (grey, grey, grey)


def test_exif_rotation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = encode(two_colour(40, 20), "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data, max_pixels=LIMIT, target_size=TARGET)
    assert decoded.image.size == (20, 40)  # upright
    top, bottom = (cast(tuple[int, int, int], decoded.image.getpixel(xy)) for xy in ((10, 2), (10, 37)))
    assert top[0] > 200 and top[2] < 60  # red on top after the rotation
    assert bottom[2] > 200 and bottom[0] < 60


def test_transparent_product_goes_on_white() -> None:
    decoded = decode_image(
        encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"), max_pixels=LIMIT, target_size=TARGET
    )
    assert decoded.image.getpixel((4, 4)) == (255, 255, 255)


BROKEN = {
    "empty": (b"", "0 bytes"),
    "text_with_jpg_name": (b"hello, I am not an image", "not a recognised image"),
    "truncated_jpeg": (sample_jpegs(1)[0][:400], "corrupt"),
    "jpeg_header_only": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "corrupt|not a recognised"),
    "png_bad_crc": (encode(two_colour(), "PNG")[:60] + b"\x00" * 40, "corrupt|not a recognised"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_bytes_raise_decode_error_with_reason(name: str) -> None:
    data, reason = BROKEN[name]
    with pytest.raises(DecodeError, match=reason):
        decode_image(data, max_pixels=LIMIT, target_size=TARGET)


def test_decompression_bomb_is_refused_from_the_header_fast() -> None:
    # 40,000 x 40,000 1-bit pixels compress to a few hundred KB but would be 4.8 GB as RGB.
    bomb = encode(Image.new("1", (40_000, 40_000), 0), "PNG")
    assert len(bomb) < 1_000_000
    started = time.perf_counter()
    with pytest.raises(PixelLimitError, match="1600000000 pixels"):
        decode_image(bomb, max_pixels=LIMIT, target_size=TARGET)
    assert time.perf_counter() - started < 1.0  # refused before decoding a pixel


def test_pixel_limit_is_configurable() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(PixelLimitError):
        decode_image(data, max_pixels=9_999, target_size=TARGET)
    assert decode_image(data, max_pixels=10_000, target_size=TARGET).width == 100


SEEDS = [encode(two_colour(), fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")] + sample_jpegs(2)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=12),
    cut=st.integers(min_value=0, max_value=5000),
)
def test_fuzz_mutated_images_never_escape_as_another_exception(
    seed: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    data = data[: max(1, len(data) - cut)]
    try:
        decoded = decode_image(bytes(data), max_pixels=LIMIT, target_size=TARGET)
    except DecodeError:
        return
    assert decoded.image.mode == "RGB"


@settings(max_examples=200, deadline=2000)
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_image(data, max_pixels=LIMIT, target_size=TARGET)


def test_a_folder_of_hostile_files_ends_with_one_status_each_and_good_images_enriched(
    settings: Settings, pg_engine: Engine, tmp_path: Path
) -> None:
    folder = tmp_path / "hostile"
    folder.mkdir()
    for name, make in GOOD_VARIANTS.items():
        (folder / f"good_{name}.png").write_bytes(make())
    for name, (data, _reason) in BROKEN.items():
        (folder / f"broken_{name}.jpg").write_bytes(data)
    (folder / "bomb.png").write_bytes(encode(Image.new("1", (40_000, 40_000), 0), "PNG"))
    (folder / "huge.jpg").write_bytes(sample_jpegs(1)[0] + b"\0" * 2_000_000)
    for i, data in enumerate(sample_jpegs(4)):
        (folder / f"photo_{i}.jpg").write_bytes(data)
    settings = settings.model_copy(update={"max_object_bytes": 1_000_000, "batch_size": 8})

    store, refs = plan(settings, str(folder))
    outcomes = run_local(settings, store=store, refs=refs)
    assert len(outcomes) == len(refs) == len(GOOD_VARIANTS) + len(BROKEN) + 2 + 4

    with Session(pg_engine) as session:
        status = {row.key: (row.status, row.error) for row in session.scalars(select(Enrichment))}
    assert set(status) == {ref.key for ref in refs}
    for key, (state, error) in status.items():
        if key.startswith(("good_", "photo_")):
            assert state == "ok", (key, error)
        else:
            assert state.startswith("failed_") and error, key
    assert status["bomb.png"][0] == "failed_limit"
    assert status["huge.jpg"][0] == "failed_limit" and "over the limit" in (status["huge.jpg"][1] or "")


@pytest.mark.parametrize(
    ("limit", "reason"),
    [
        ({"decode_timeout_s": 0.1}, "decoding took longer than 0.1 s"),
        ({"decode_memory_mb": 300}, "decoding needed more than 300 MiB"),
    ],
    ids=["time", "memory"],
)
def test_a_decode_over_its_time_or_memory_limit_fails_alone(
    settings: Settings, pg_engine: Engine, tmp_path: Path, limit: dict[str, float], reason: str
) -> None:
    # Legal (56 MP, under the pixel limit, a 184 kB file) but slow and memory-hungry: about 0.7 s and
    # 170 MB to decode here. The decoding process is stopped, replaced, and the photos still decode.
    folder = tmp_path / "slow"
    folder.mkdir()
    slow = Image.linear_gradient("L").resize((7000, 8000)).convert("RGB")
    (folder / "slow.png").write_bytes(encode(slow, "PNG"))
    for i, data in enumerate(sample_jpegs(6)):
        (folder / f"photo_{i}.jpg").write_bytes(data)
    settings = settings.model_copy(update={"decode_processes": 2, "batch_size": 8, **limit})

    store, refs = plan(settings, str(folder))
    run_local(settings, store=store, refs=refs)

    with Session(pg_engine) as session:
        status = {row.key: (row.status, row.error) for row in session.scalars(select(Enrichment))}
    assert status.pop("slow.png") == ("failed_limit", reason)
    assert status == {f"photo_{i}.jpg": ("ok", None) for i in range(6)}
