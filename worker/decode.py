"""Bytes -> an RGB PIL image, within limits on pixels, with EXIF orientation applied, and on to the
network's uint8 input. Free of torch: it runs in decoding worker processes (worker/image_pool.py)."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from worker.model.config import PreprocessConfig
from worker.model.preprocess import preprocess_array


class DecodeError(Exception):
    """The bytes are not an image we can enrich; recorded as failed_decode (or failed_limit)."""


class DecodeLimitError(DecodeError):
    """Over a configured limit (pixels, decode time, decode memory); recorded as failed_limit."""


class PixelLimitError(DecodeLimitError):
    pass


@dataclass(frozen=True, slots=True)
class DecodedImage:
    image: Image.Image
    width: int  # of the original, before draft reduction
    height: int


def decode_image(data: bytes, *, max_pixels: int, target_size: tuple[int, int]) -> DecodedImage:
    """Decode the first frame of `data`.

    target_size (h, w) lets JPEG decode at a reduced scale (`draft`), which is several times faster for
    full-size photos and never goes below the size the model needs.
    """
    if not data:
        raise DecodeError("empty object (0 bytes)")
    try:
        # Our own header check runs before Pillow's bomb check (which only warns below 2x its limit).
        # No warnings.catch_warnings here: it mutates process-wide state and is not thread-safe.
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width <= 0 or height <= 0:
            raise DecodeError(f"invalid dimensions {width}x{height}")
        if width * height > max_pixels:
            raise PixelLimitError(f"image is {width}x{height} = {width * height} pixels, over {max_pixels}")
        if image.format == "JPEG":
            # draft keeps both sides >= the request; EXIF rotation may swap axes, so ask for the max.
            side = max(target_size)
            image.draft("RGB", (side, side))
        image.load()
        oriented: Image.Image = ImageOps.exif_transpose(image) or image
        return DecodedImage(image=_to_rgb(oriented), width=width, height=height)
    except DecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise PixelLimitError(f"decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise DecodeError(f"corrupt image: {error}") from None


@dataclass(frozen=True, slots=True)
class DecodedInput:
    pixels: np.ndarray  # uint8 (3, H, W) at the network's input size, or smaller if its upscale was deferred
    width: int  # of the original image
    height: int
    decode_ms: float


def decode_to_input(
    data: bytes, *, pre: PreprocessConfig, max_pixels: int, defer_upscale: bool = False
) -> DecodedInput:
    """The whole CPU side of serving: bytes -> the network's uint8 input (training evaluates through it too).

    JPEG decodes at the smallest scale the preprocessing keeps (its detail size, else its input size): a
    full-size photo decodes at 1/8 scale, several times faster than at full size. `defer_upscale` leaves
    an image's enlargement to the model's device (a GPU worker: worker/model/upscale.py).
    """
    started = time.perf_counter()
    decoded = decode_image(data, max_pixels=max_pixels, target_size=pre.detail_size or pre.input_size)
    pixels = preprocess_array(decoded.image, pre, defer_upscale=defer_upscale)
    elapsed_ms = (time.perf_counter() - started) * 1000
    return DecodedInput(pixels=pixels, width=decoded.width, height=decoded.height, decode_ms=elapsed_ms)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Product shots with transparency go on white, as a catalogue page shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I;16"):  # 16-bit greyscale in either byte order (PNG, TIFF "MM" or "II")
        return _grey_to_rgb(np.asarray(image).astype(np.float32) / 257.0)
    if image.mode in ("I", "F"):
        # 32-bit integer or float greyscale: no fixed white point, so scale by the range the values use
        # (0..1 floats, 8- or 16-bit integers in 32 bits) rather than clip everything above 255 to white.
        values = np.asarray(image, dtype=np.float32)
        peak = float(values.max(initial=0.0))
        white = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0 if peak <= 65535.0 else peak
        return _grey_to_rgb(values * (255.0 / white))
    return image.convert("RGB")


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
