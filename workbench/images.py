"""Safe image loading: every failure becomes an ImageError naming the file, and bombs are refused before decoding."""
from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import ImageError

MAX_IMAGE_PIXELS = int(os.environ.get("WORKBENCH_MAX_IMAGE_PIXELS", 40_000_000))
"""Largest width × height accepted (≈ 6300 × 6300); decompression bombs are far above it."""
MAX_IMAGE_BYTES = int(os.environ.get("WORKBENCH_MAX_IMAGE_BYTES", 50 * 1024 * 1024))

ImageSource = Union[str, os.PathLike, bytes, Image.Image]

# Never let PIL decode a truncated file into a half-grey picture silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return "<image>"


def load_image(source: ImageSource, max_pixels: int | None = None, max_bytes: int | None = None) -> Image.Image:
    """Open a path, raw bytes or PIL image as an RGB image, or raise ImageError saying what is wrong with it."""
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    max_bytes = MAX_IMAGE_BYTES if max_bytes is None else max_bytes
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
        _check_pixels(image, name, max_pixels)
        return _to_rgb(image)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"Image file not found: {path}")
        if not path.is_file():
            raise ImageError(f"Not a file: {path}")
        size = path.stat().st_size
        if size == 0:
            raise ImageError(f"Image file is empty (0 bytes): {path}")
        if size > max_bytes:
            raise ImageError(f"Image file {path} is {size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
        data = path.read_bytes()
    elif isinstance(source, bytes):
        data = source
        if not data:
            raise ImageError("Image data is empty (0 bytes)")
        if len(data) > max_bytes:
            raise ImageError(f"Image data is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
    else:
        raise ImageError(f"Cannot read an image from a {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            # Our own limit is checked from the header below; PIL's warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image, name, max_pixels)  # header only: refuse before decoding pixels
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"Not an image file (format not recognised): {name}") from None
    except Image.DecompressionBombError as e:  # PIL refuses at open time above twice its own limit
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
        raise ImageError(f"Image {name} has {size}; the limit is {max_pixels:,} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"Image file is corrupt or truncated: {name} ({e})") from None
    return _to_rgb(image)


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(f"Image {name} has no pixels ({w}×{h})")
    if w * h > max_pixels:
        raise ImageError(f"Image {name} is {w}×{h} = {w * h:,} pixels; the limit is {max_pixels:,} pixels")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white, so PNG icons and emoji look as people see them."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
