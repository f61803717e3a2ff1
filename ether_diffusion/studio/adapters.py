"""The saved adapters of a workspace: one ``<name>.safetensors`` each (the library's format), a ``<name>.png``
thumbnail beside it. Every name goes through ``check_name`` and every path through ``inside``; imports are read
with the library's strict reader (and, when given, loaded into the base model) before they are copied in."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import METHOD_LABELS
from ..export import export_to_lora
from ..files import atomic_write
from ..io import AdapterFileError, AdapterMismatchError, read_adapter_file
from ..training.config import TaskKind
from .workspace import StudioError, Workspace, check_name, entry, inside, slug

__all__ = ["MAX_ADAPTER_BYTES", "AdapterInfo", "AdapterStore"]

MAX_ADAPTER_BYTES = 256 * 1024 * 1024  # ETHER adapters are kilobytes to a few MB; refuse anything absurd
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    thumbnail: Path | None
    method: str  # "ETHER", "ETHER+", or "unreadable"
    n_blocks: int | None
    parameters: int
    base_model: str | None
    steps: str | None
    instance_prompt: str | None
    error: str | None = None  # why a file in the folder cannot be used (it is still listed, so it can be deleted)
    task: TaskKind = TaskKind.DREAMBOOTH  # CONTROL: a condition encoder with its adapter (the Control tab samples it)

    def row(self) -> list:
        """The row shown in the Adapters table."""
        return [
            self.name,
            str(self.task) if self.error is None else "",
            self.method,
            self.n_blocks if self.n_blocks is not None else "",
            self.parameters,
            self.steps or "",
            self.instance_prompt or "",
            self.base_model or "",
            self.error or "",
        ]


TABLE_HEADERS = ["name", "task", "method", "blocks", "parameters", "steps", "instance prompt", "base model", "problem"]


def describe(name: str, path: Path, thumbnail: Path | None) -> AdapterInfo:
    try:
        source = read_adapter_file(path)
    except (AdapterFileError, OSError) as err:
        return AdapterInfo(name, path, thumbnail, "unreadable", None, 0, None, None, None, str(err))
    configs = list(source.configs.values())
    methods = sorted({METHOD_LABELS.get(c.method, c.method) for c in configs})
    task = TaskKind.CONTROL if source.extra.get("task") == TaskKind.CONTROL else TaskKind.DREAMBOOTH
    return AdapterInfo(
        name,
        path,
        thumbnail,
        "/".join(methods),
        configs[0].n_blocks if configs else None,
        source.num_parameters(),
        source.base_model,
        source.extra.get("steps"),
        source.extra.get("instance_prompt"),
        task=task,
    )


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class AdapterStore:
    def __init__(self, workspace: Workspace):
        self.folder = workspace.adapters
        self.workspace = workspace

    # --- paths -------------------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return inside(self.folder, check_name(name) + SUFFIX)

    def thumbnail_path(self, name: str) -> Path:
        return inside(self.folder, check_name(name) + ".png")

    def exists(self, name: str) -> bool:
        """Whether the name is taken: by an adapter, or by anything else at its file name (a folder, a link)."""
        path = entry(self.folder, check_name(name) + SUFFIX)
        return path.exists() or path.is_symlink()

    def require(self, name: str) -> Path:
        path = self.path(name)
        if not path.is_file():
            known = ", ".join(self.names()) or "none yet"
            raise StudioError(f"no adapter named {name!r} (saved adapters: {known})")
        return path

    def names(self) -> list[str]:
        return sorted(p.name[: -len(SUFFIX)] for p in self.folder.glob("*" + SUFFIX) if p.is_file())

    def free_name(self, wanted: str) -> str:
        """``wanted`` made valid, with ``-2``, ``-3``… appended if the name is taken."""
        base = slug(wanted)[:58]
        name, n = base, 1
        while self.exists(name):
            n += 1
            name = f"{base}-{n}"
        return name

    def digest(self, name: str) -> str:
        """SHA-256 of the adapter's file: what a training job recognises its own file by, whatever its name."""
        return file_digest(self.require(name))

    def find(self, digest: str) -> str | None:
        """The name of the adapter whose file has ``digest`` (renamed or not), or None."""
        for name in self.names():
            try:
                if file_digest(self.path(name)) == digest:
                    return name
            except (StudioError, OSError):  # a link to outside the folder, a file removed meanwhile: not it
                continue
        return None

    # --- listing -----------------------------------------------------------------------------------------------
    def list(self) -> list[AdapterInfo]:
        """Every adapter file of the folder; one the studio cannot use (unreadable, a link to outside the folder) is
        listed with its problem, so that it can be deleted, and never hides the others."""
        infos = []
        for name in self.names():
            try:
                path = self.path(name)
            except StudioError as err:
                infos.append(AdapterInfo(name, entry(self.folder, name + SUFFIX), None, "unreadable", None, 0, None,
                                         None, None, str(err)))  # fmt: skip
                continue
            infos.append(describe(name, path, self._thumbnail(name)))
        return infos

    def _thumbnail(self, name: str) -> Path | None:
        try:
            thumb = self.thumbnail_path(name)
        except StudioError:  # a link to outside the folder: no thumbnail
            return None
        return thumb if thumb.is_file() else None

    def names_for(self, task: str) -> list[str]:
        """The usable adapters of ``task`` (a ``TaskKind``): what each tab's pickers offer."""
        return [i.name for i in self.list() if i.error is None and i.task == task]

    def info(self, name: str) -> AdapterInfo:
        return describe(name, self.require(name), self._thumbnail(name))

    # --- changes -----------------------------------------------------------------------------------------------
    def publish(self, source: Path, name: str, thumbnail=None, replace: bool = False) -> Path:
        """Copy a trained adapter file in as ``name`` (a PIL thumbnail optional); atomic, validated first."""
        read_adapter_file(source)
        target = self.path(name)
        if target.exists() and not replace:
            raise StudioError(f"an adapter named {name!r} already exists; choose another name or delete it first")
        with atomic_write(target) as tmp:
            shutil.copyfile(source, tmp)
        if thumbnail is not None:
            self.set_thumbnail(name, thumbnail)
        return target

    def set_thumbnail(self, name: str, image) -> Path:
        path = self.thumbnail_path(name)
        small = image.convert("RGB").copy()
        small.thumbnail((256, 256))
        with atomic_write(path) as tmp:
            small.save(tmp, format="PNG")
        return path

    def rename(self, old: str, new: str) -> str:
        source = self.require(old)
        new = check_name(new, "new name")
        target = self.path(new)
        if new == check_name(old):
            return new
        if self.exists(new):
            raise StudioError(f"an adapter named {new!r} already exists; choose another name")
        thumbnail = self._thumbnail(old)
        os.rename(source, target)
        if thumbnail is not None:
            os.replace(thumbnail, entry(self.folder, new + ".png"))
        return new

    def delete(self, name: str) -> None:
        """Remove the adapter's file and thumbnail: the folder's entries (a link itself, never what it leads to)."""
        path = entry(self.folder, check_name(name) + SUFFIX)
        if not path.is_symlink() and not path.is_file():
            raise StudioError(f"no adapter named {name!r} (saved adapters: {', '.join(self.names()) or 'none yet'})")
        path.unlink()
        entry(self.folder, check_name(name) + ".png").unlink(missing_ok=True)

    def import_file(
        self,
        upload: str | os.PathLike | None,
        name: str | None = None,
        check_fits: Callable[[Path], None] | None = None,
        display_name: str | None = None,
    ) -> str:
        """Validate ``upload`` strictly and copy it in; returns the name. ``check_fits(path)`` may load it into the
        base model to refuse files made for another architecture. A rejected file changes nothing. Messages name the
        file by ``display_name`` (what the user chose; default the upload's own file name), never by the temporary
        folder a browser upload lands in."""
        if upload is None or not str(upload):
            raise StudioError("no file: choose an adapter .safetensors file to import")
        upload = Path(upload)
        shown = Path(display_name or upload.name).name  # the file's own name, not where the browser parked it
        if not upload.is_file():
            raise StudioError(f"{shown}: file not found")
        if upload.stat().st_size > MAX_ADAPTER_BYTES:
            raise StudioError(
                f"{shown} is {upload.stat().st_size / 2**20:.0f} MB; ETHER adapters are far smaller "
                f"(limit {MAX_ADAPTER_BYTES // 2**20} MB). Is it a whole model?"
            )
        name = check_name(name) if name and name.strip() else self.free_name(Path(shown).stem)
        if self.exists(name):
            raise StudioError(f"an adapter named {name!r} already exists; choose another name")
        try:
            read_adapter_file(upload)
            if check_fits is not None:
                check_fits(upload)
        except (AdapterFileError, AdapterMismatchError) as err:
            reason = str(err)
            for where in {str(upload), str(upload.resolve())}:
                reason = reason.replace(where, shown)
            raise StudioError(f"{shown} was not imported: {reason}") from err
        self.publish(upload, name)
        return name

    def export(self, name: str) -> Path:
        """The file to hand to the browser for download."""
        return self.require(name)

    def export_lora(self, name: str, format: str, model: str, model_config: str | None = None):
        """Adapter ``name`` as an exact LoRA file of ``format`` (``diffusers`` or ``kohya``, fp32) for ``model`` (the
        base it was trained on), written to the workspace's ``exports`` folder: ``(path, ExportSummary)``."""
        if format not in ("diffusers", "kohya"):
            raise StudioError(f"LoRA format {format!r} is not one of diffusers, kohya")
        source = self.require(name)
        output = inside(self.workspace.exports, f"{check_name(name)}-{format}-lora.safetensors")
        try:
            summary = export_to_lora([(read_adapter_file(source), 1.0)], output, model, format, config=model_config)
        except ValueError as err:  # a control file, another family's file: the reason, as the CLI gives it
            raise StudioError(f"'{name}' cannot be exported as a LoRA: {err}") from None
        return output, summary
