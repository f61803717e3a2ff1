"""Reading images users give us: one size limit, EXIF orientation applied, every pixel mode converted correctly.

PIL's own ``convert("RGB")`` clips 16-bit and 32-bit greyscale to white and ignores the orientation a phone writes
into EXIF; training on such pixels silently teaches the wrong image. Everything that reads a training, class,
control or uploaded image goes through ``open_image``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "ImageReadError", "open_image", "to_rgb"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: larger than any photo worth training on (8192²); refuses decompression bombs before any pixel is decoded
MAX_IMAGE_PIXELS = 8192 * 8192


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


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """The image at ``path`` as upright 8-bit RGB, or ``ImageReadError("<file name>: <reason>")``."""
    path = Path(path)
    try:
        with Image.open(path) as image:  # reads the header only: the size is known before decoding
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageReadError(
                    f"{path.name}: {image.width}×{image.height} pixels is too large (at most {MAX_IMAGE_PIXELS:,} "
                    "pixels, e.g. 8192×8192); scale it down"
                )
            image.load()
            return to_rgb(image)
    except ImageReadError:
        raise
    except UnidentifiedImageError as err:
        raise ImageReadError(f"{path.name}: not an image (the {what} could not be decoded)") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"{path.name}: cannot be read as an image ({err})") from err
