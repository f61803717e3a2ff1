"""Model sources: what a model argument names, and the errors of loading one.

A model is given as nothing (the shipped tiny model, ``assets/tiny-sd``), a diffusers folder, a Hub id, or one
checkpoint file (``SINGLE_FILE_SUFFIXES``). ``families.py`` reads a source's family and ``models.py`` loads it; both
raise ``ModelLoadError`` (or a subclass) with a message that says what to pass instead. Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

from .assets import default_model_path

__all__ = [
    "PICKLE_SUFFIXES",
    "SINGLE_FILE_SUFFIXES",
    "ConfigNotFoundError",
    "ModelLoadError",
    "NotAModelError",
    "UnsafeCheckpointError",
    "check_local",
    "default_model",
    "is_single_file",
]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message says what to pass instead."""


class ConfigNotFoundError(ModelLoadError):
    """A single-file checkpoint whose pipeline configuration is not available offline."""


class UnsafeCheckpointError(ModelLoadError):
    """A pickled checkpoint that holds more than tensors: it is not unpickled."""


class NotAModelError(ModelLoadError):
    """A file given as a model that is something else: an adapter, a LoRA, other weights, no checkpoint at all."""


def default_model() -> str:
    """The shipped tiny Stable Diffusion (``assets/tiny-sd``)."""
    return str(default_model_path())


def is_single_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and not path.is_dir()


def check_local(path: str) -> None:
    """``ModelLoadError`` when ``path`` looks local (exists, or starts with ``.``, ``/``, ``~``) but is no diffusers
    folder; a Hub id passes."""
    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~"))
    if looks_local and not (local / "model_index.json").is_file():
        raise ModelLoadError(
            f"'{path}' is not a diffusers model folder (no model_index.json) nor a single checkpoint file "
            f"({', '.join(SINGLE_FILE_SUFFIXES)}); pass a folder saved with save_pretrained, a checkpoint file, a hub "
            "id, or leave the flag out to use the shipped tiny model"
        )
