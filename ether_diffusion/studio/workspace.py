"""The studio's folders and the names users give things in it.

A workspace is one folder::

    <root>/adapters/<name>.safetensors   saved adapters (+ <name>.png thumbnail)
    <root>/jobs/<job id>/                one training job: state.json, instance/ images, output/ (the loop's)
    <root>/samples/<time>/               images from the Sample tab
    <root>/class_images/<prompt>-<key>/  prior-preservation images, shared by jobs with the same class and model
    <root>/control_data/<task>-<count>/  the tiny world's control sets, rendered once, shared by control jobs
    <root>/presets/<name>.json           saved training configurations

Names typed by users become file names, so they follow the adapter-name rule of the library (letters, digits,
'_' and '-', starting with a letter or digit, at most 64): ``../x``, ``a/b``, ``.hidden`` or ``C:\\x`` are refused,
and every path is checked to stay inside its folder even so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..config import check_adapter_name

__all__ = ["StudioError", "Workspace", "check_name", "entry", "inside", "slug"]


class StudioError(ValueError):
    """Bad input or a refused action; the message is meant for the page as it is."""


def check_name(name: str, what: str = "adapter name") -> str:
    """``name`` stripped of surrounding spaces, or StudioError saying which characters are allowed."""
    if not isinstance(name, str) or not name.strip():
        raise StudioError(f"the {what} is empty; type a name such as 'my-star'")
    name = name.strip()
    try:
        return check_adapter_name(name)  # the library's rule: names become module keys and file names
    except ValueError:
        raise StudioError(
            f"the {what} {name!r} is not allowed: use 1-64 letters, digits, '_' or '-', starting with a letter or "
            "digit (no spaces, dots or slashes)"
        ) from None


def slug(text: str, fallback: str = "adapter") -> str:
    """A valid name made from free text (a file name, a subject): other characters become '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9_\-]+", "-", text).strip("-_")[:64]
    return cleaned if cleaned else fallback


def entry(folder: Path, name: str) -> Path:
    """The entry ``name`` of ``folder`` (the file itself, or the link itself): StudioError unless ``name`` is a plain
    file name (no separator, not ``.`` or ``..``). Deleting or renaming an entry never touches what a link leads to."""
    folder = folder.resolve()
    path = folder / name
    if not name or name in (".", "..") or path.parent != folder or "\0" in name:
        raise StudioError(f"{name!r} would leave the folder {folder}")
    return path


def inside(folder: Path, name: str) -> Path:
    """``entry(folder, name)``, refusing one that resolves outside ``folder`` (a link to elsewhere, at any depth)
    before anything opens it. The path returned is the entry, not the file a link leads to (``entry``)."""
    path = entry(folder, name)
    if path.resolve().parent != path.parent:
        raise StudioError(f"{name!r} links to a file outside the folder {path.parent}; the studio does not follow it")
    return path


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())
        folders = (self.adapters, self.jobs, self.samples, self.class_images, self.control_data, self.presets,
                   self.exports)  # fmt: skip
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def class_images(self) -> Path:
        return self.root / "class_images"

    @property
    def control_data(self) -> Path:
        return self.root / "control_data"

    @property
    def presets(self) -> Path:
        return self.root / "presets"

    @property
    def exports(self) -> Path:
        return self.root / "exports"
