"""Named training configurations: ``<workspace>/presets/<name>.json``, saved from a form and loaded back into it.

A preset holds a job's settings (method, blocks, steps, learning rates, prompts, previews, the shipped subject or
the control data) but never the adapter name (each job names its own adapter) nor uploaded files (temporary
paths of one page). Names follow the adapter-name rule (``check_name``). Saving checks the settings as Start
would (ranges, method, ...), so a preset always loads into a form that can start; the file is written
atomically, and saving under an existing name replaces that preset (the page says so). Loading is strict: a file
that is not JSON, holds fields no form has, or values out of range is refused with what is wrong.
"""

from __future__ import annotations

import dataclasses
import json

from ..files import atomic_write
from ..training.config import TaskKind
from .jobs import SPECS
from .workspace import StudioError, Workspace, check_name, inside

__all__ = ["Preset", "PresetStore"]

NOT_STORED = ("adapter_name", "uploads")
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    kind: TaskKind  # the spec's kind
    settings: dict  # spec fields, without NOT_STORED

    def spec(self, adapter_name: str = "preset"):
        """The settings as a spec of their kind (with ``adapter_name``)."""
        return SPECS[self.kind](adapter_name=adapter_name, **self.settings)


def _checked(spec):
    """``spec`` validated as Start would, except that images are not asked for: a preset made with uploaded
    images keeps ``subject=None`` and the page asks for images again."""
    if getattr(spec, "subject", "") is None and not spec.uploads:
        return dataclasses.replace(dataclasses.replace(spec, uploads=["(images)"]).validated(), uploads=[])
    return spec.validated()


class PresetStore:
    def __init__(self, workspace: Workspace):
        self.folder = workspace.presets

    def path(self, name: str):
        return inside(self.folder, check_name(name, "preset name") + ".json")

    def names(self, kind: str | None = None) -> list[str]:
        found = []
        for path in sorted(self.folder.glob("*.json")):
            if kind is None:
                found.append(path.stem)
                continue
            try:
                if json.loads(path.read_text()).get("kind") == kind:
                    found.append(path.stem)
            except (OSError, ValueError, AttributeError):
                continue  # unreadable: load() says why when it is asked for
        return found

    def save(self, name: str, spec) -> tuple[Preset, bool]:
        """Store ``spec``'s settings as preset ``name``; returns it and whether it replaced an older one."""
        path = self.path(name)
        checked = _checked(dataclasses.replace(spec, adapter_name="preset"))
        settings = {k: v for k, v in dataclasses.asdict(checked).items() if k not in NOT_STORED}
        preset = Preset(path.stem, checked.kind, settings)
        replaced = path.is_file()
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({"format": FORMAT, "kind": str(preset.kind), "settings": settings}, indent=1))
        return preset, replaced

    def load(self, name: str) -> Preset:
        path = self.path(name)
        if not path.is_file():
            known = ", ".join(self.names()) or "none yet"
            raise StudioError(f"no preset named {name!r} (saved presets: {known})")
        try:
            record = json.loads(path.read_text())
            kind, settings = record["kind"], record["settings"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StudioError(
                f"preset {path.stem!r} is unreadable ({err}); save it again or delete {path.name}"
            ) from None
        if kind not in SPECS or not isinstance(settings, dict):
            raise StudioError(f"preset {path.stem!r} is of an unknown kind {kind!r}; save it again")
        fields = {f.name for f in dataclasses.fields(SPECS[kind])} - set(NOT_STORED)
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise StudioError(
                f"preset {path.stem!r} has settings this studio does not know ({', '.join(unknown)}); it was saved by "
                "another version: save it again from the form"
            )
        preset = Preset(path.stem, TaskKind(kind), settings)
        try:
            _checked(preset.spec())
        except (StudioError, TypeError, ValueError) as err:
            raise StudioError(f"preset {path.stem!r} holds a setting Start would refuse: {err}") from None
        return preset

    def delete(self, name: str) -> None:
        path = self.path(name)
        if not path.is_file():
            raise StudioError(f"no preset named {name!r}")
        path.unlink()
