"""Reading images users give us: one size limit, EXIF orientation applied, every pixel mode converted correctly.

PIL's own ``convert("RGB")`` clips 16-bit and 32-bit greyscale to white and ignores the orientation a phone writes
into EXIF; training on such pixels silently teaches the wrong image. Everything that reads a training, class,
control or uploaded image goes through ``open_image``: files in folders, a ``datasets`` dataset's rows (their bytes),
uploads; so one size limit and one set of messages, each naming the file (or the row), apply everywhere.
"""

from __future__ import annotations

import contextlib
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "ImageReadError",
    "check_image",
    "check_pixels",
    "open_image",
    "to_rgb",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: larger than any photo worth training on (8192²); refuses decompression bombs before any pixel is decoded
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE


class ImageReadError(ValueError):
    """A file that cannot be used as an image; the message names it and says why."""


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` upright (EXIF orientation applied) as 8-bit RGB, scaling high-bit-depth modes instead of clipping.
    8-bit and palette modes convert exactly (control maps keep their class colours); transparency goes on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if image.mode == "F" and array.max(initial=0) <= 1.0:
            top = 1.0
        grey = np.clip(np.round(array / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")  # transparent parts on white, not black
    return image.convert("RGB")


def _source(source: str | Path | BinaryIO, name: str | None) -> tuple[str | Path | BinaryIO, str]:
    """What ``Image.open`` reads, and the name messages use; a path must be a regular file (opening a FIFO would
    wait for a writer forever, a device would be read without end)."""
    if hasattr(source, "read"):
        return source, name or str(getattr(source, "name", "image"))
    path = Path(source)
    name = name or path.name
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise ImageReadError(f"{name}: cannot be read ({err.strerror or err})") from err
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
        raise ImageReadError(f"{name}: {kind}, not an image file; replace it with an image")
    return path, name


def _too_large(name: str, size: str) -> ImageReadError:
    return ImageReadError(
        f"{name}: {size} pixels is too large (at most {MAX_IMAGE_PIXELS:,} pixels, e.g. {MAX_IMAGE_SIDE}×"
        f"{MAX_IMAGE_SIDE}); scale it down"
    )


def check_pixels(width: int, height: int, name: str) -> None:
    """``ImageReadError`` naming ``name`` when a ``width``×``height`` image is over ``MAX_IMAGE_PIXELS``."""
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(name, f"{width}×{height}")


@contextlib.contextmanager
def _checked(source: str | Path | BinaryIO, what: str, name: str | None) -> Iterator[Image.Image]:
    """The image at ``source`` opened (its header read: nothing decoded yet) and its size checked; any failure of
    opening it, or of what the caller does with it inside the ``with``, as ``ImageReadError`` naming it."""
    source, name = _source(source, name)
    try:
        with Image.open(source) as image:
            check_pixels(image.width, image.height, name)
            yield image
    except ImageReadError:
        raise
    except Image.DecompressionBombError as err:  # PIL's own, larger limit: refused from the header all the same
        pixels = re.search(r"\((\d+) pixels\)", str(err))  # "Image size (400000000 pixels) exceeds limit ..."
        raise _too_large(name, f"{int(pixels.group(1)):,}" if pixels else f"over {MAX_IMAGE_PIXELS:,}") from err
    except UnidentifiedImageError as err:
        raise ImageReadError(f"{name}: not an image (the {what} could not be decoded)") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"{name}: cannot be read as an image ({err})") from err


def open_image(source: str | Path | BinaryIO, what: str = "image", name: str | None = None) -> Image.Image:
    """The image at ``source`` (a path, or a binary file such as ``io.BytesIO`` of a dataset row's bytes) as upright
    8-bit RGB, or ``ImageReadError("<name>: <reason>")``; ``name`` defaults to the file's name. Images over
    ``MAX_IMAGE_PIXELS`` are refused from their header, before any pixel is decoded."""
    with _checked(source, what, name) as image:
        image.load()
        return to_rgb(image)


def check_image(source: str | Path | BinaryIO, what: str = "image", name: str | None = None) -> tuple[int, int]:
    """``(width, height)`` of the image at ``source`` from its header alone, with ``open_image``'s checks and
    messages (a file that is no image, or too large); for checking many files before any is decoded."""
    with _checked(source, what, name) as image:
        return image.size
