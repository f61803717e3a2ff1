"""Training images from an upload: checked before anything trains, copied as PNGs into the job's folder."""

from __future__ import annotations

import os
from pathlib import Path

from ..images import ImageReadError, open_image
from .workspace import StudioError

__all__ = ["MAX_FILE_BYTES", "MAX_IMAGES", "MIN_IMAGES", "check_uploads", "save_uploads"]

MIN_IMAGES, MAX_IMAGES = 3, 10  # DreamBooth's advice: a few images of one subject
MAX_FILE_BYTES = 50 * 1024 * 1024


def check_uploads(paths: list[str | os.PathLike] | None) -> list[Path]:
    """The uploaded files, each verified to be an image of sane size; StudioError naming every bad file."""
    paths = [Path(p) for p in paths or []]
    if not paths:
        raise StudioError(f"no images: upload {MIN_IMAGES}-{MAX_IMAGES} images of your subject, or pick a shipped one")
    if not MIN_IMAGES <= len(paths) <= MAX_IMAGES:
        raise StudioError(f"{len(paths)} images uploaded; DreamBooth needs {MIN_IMAGES}-{MAX_IMAGES} of one subject")
    bad = []
    for path in paths:
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise ImageReadError(f"{path.name}: {size / 2**20:.0f} MB, over the {MAX_FILE_BYTES // 2**20} MB limit")
            open_image(path, "upload")  # decodes fully: a truncated file fails here, not in training
        except ImageReadError as err:
            bad.append(str(err))
        except OSError as err:
            bad.append(f"{path.name}: {err.strerror or err}")
    if bad:
        raise StudioError("these files cannot be used: " + "; ".join(bad) + ". Nothing was trained.")
    return paths


def save_uploads(paths: list[str | os.PathLike], folder: Path) -> list[Path]:
    """Check the files, then write them as ``00.png``, ``01.png``… (upright 8-bit RGB) into ``folder``."""
    checked = check_uploads(paths)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(checked):
        target = folder / f"{i:02d}.png"
        open_image(path, "upload").save(target)  # upright (EXIF applied), 8-bit RGB, high bit depths scaled
        written.append(target)
    return written
