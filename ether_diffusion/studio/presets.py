"""Named training configurations: ``<workspace>/presets/<name>.json``, saved from a form and loaded back into it.

A preset holds a job's settings (method, blocks, steps, learning rates, prompts, previews, the shipped subject or
the control data) but never the adapter name (each job names its own adapter) nor uploaded files (temporary
paths of one page). Names follow the adapter-name rule (``check_name``). Saving checks the settings as Start
would (ranges, method, ...), so a preset always loads into a form that can start; the file is written
atomically, and saving under an existing name replaces that preset (the page says so).

Every file in the folder is read as untrusted input, by size and then by schema, before anything uses it:

    {"format": 1,                                   FORMAT
     "kind": "dreambooth" | "control",              a form's kind (``SPECS``)
     "settings": {field: scalar, ...}}              that form's fields (``NOT_STORED`` excepted), each a string,
                                                    number, true/false or null as the field's type says

A file over ``MAX_PRESET_BYTES``, one that is not JSON (nested too deep for the parser included), or one of another
shape is a bad preset: the listing names it with why (``Listing.problems``) and goes on with the others, so one bad
file never stops listing, saving, deleting or loading another; it stays listed, so it can be deleted, and loading it
says why it cannot be loaded. Loading also checks the settings as Start would (ranges). A folder of more than
``MAX_PRESETS`` files lists the first ``MAX_PRESETS`` by name and says so.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

from ..files import atomic_write
from ..training.config import TaskKind
from .jobs import SPECS
from .workspace import StudioError, Workspace, check_name, entry, inside

__all__ = ["MAX_PRESETS", "MAX_PRESET_BYTES", "Listing", "Preset", "PresetStore"]

NOT_STORED = ("adapter_name", "uploads")
FORMAT = 1
MAX_PRESET_BYTES = 64 * 1024  # a preset is a few hundred bytes; a larger file is not one, and is not parsed
MAX_PRESETS = 500  # files listed; each is read at every listing (after a save or a delete)
#: the JSON values a setting of each Python type may hold
SCALARS = {str: (str,), int: (int,), float: (int, float), bool: (bool,), type(None): (type(None),)}


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    kind: TaskKind  # the spec's kind
    settings: dict  # spec fields, without NOT_STORED

    def spec(self, adapter_name: str = "preset"):
        """The settings as a spec of their kind (with ``adapter_name``)."""
        return SPECS[self.kind](adapter_name=adapter_name, **self.settings)


@dataclasses.dataclass(frozen=True)
class Listing:
    """What the presets folder offers a form: ``names`` (its kind's presets and every bad one, so that a bad one can
    be deleted from the page) and ``problems`` (one line per bad file, naming it with why)."""

    names: list[str]
    problems: list[str]

    def note(self) -> str:
        """The problems as one sentence for the page ("" when there are none)."""
        if not self.problems:
            return ""
        return f" (skipped {len(self.problems)} bad preset(s): {'; '.join(self.problems[:3])}" + (
            "; …)" if len(self.problems) > 3 else ")"
        )


def _setting_types(kind: TaskKind) -> dict[str, tuple[type, ...]]:
    """The stored fields of ``kind``'s spec, each with the JSON scalar types its annotation allows."""
    hints = typing.get_type_hints(SPECS[kind])
    types = {}
    for field in dataclasses.fields(SPECS[kind]):
        if field.name in NOT_STORED or field.name not in hints:
            continue
        hint = hints[field.name]
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
        types[field.name] = tuple(t for member in members for t in SCALARS.get(member, ()))
    return types


def _kind_name(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    return {str: "text", int: "a whole number", float: "a number", type(None): "null", dict: "an object",
            list: "a list"}.get(type(value), type(value).__name__)  # fmt: skip


def check_record(record, name: str) -> Preset:
    """``record`` (a preset file's parsed JSON) as a Preset of the schema above, or StudioError saying what is
    wrong with it."""
    if not isinstance(record, dict) or set(record) != {"format", "kind", "settings"}:
        raise StudioError("it is not a preset: a preset file holds exactly 'format', 'kind' and 'settings'")
    if record["format"] != FORMAT or isinstance(record["format"], bool):
        raise StudioError(f"its format is {record['format']!r:.20}; this studio reads format {FORMAT}")
    kind, settings = record["kind"], record["settings"]
    if not isinstance(kind, str) or kind not in SPECS:
        raise StudioError(f"its kind is {kind!r:.40}, not one of {', '.join(map(str, SPECS))}")
    if not isinstance(settings, dict):
        raise StudioError(f"its settings are {_kind_name(settings)}, not an object of the form's fields")
    types = _setting_types(TaskKind(kind))
    unknown = sorted(str(k)[:40] for k in settings if k not in types)
    if unknown:
        raise StudioError(
            f"it has settings this studio does not know ({', '.join(unknown[:6])}); it was saved by another version "
            "or edited: save it again from the form"
        )
    for key, value in settings.items():
        if not isinstance(value, types[key]) or (isinstance(value, bool) and bool not in types[key]):
            raise StudioError(f"its setting {key!r} is {_kind_name(value)}, which that field does not take")
    return Preset(name, TaskKind(kind), settings)


def _checked(spec):
    """``spec`` validated as Start would, except that images are not asked for: a preset made with uploaded
    images keeps ``subject=None`` and the page asks for images again."""
    if getattr(spec, "subject", "") is None and not spec.uploads:
        return dataclasses.replace(dataclasses.replace(spec, uploads=["(images)"]).validated(), uploads=[])
    return spec.validated()


class PresetStore:
    def __init__(self, workspace: Workspace):
        self.folder = workspace.presets

    def path(self, name: str) -> Path:
        return inside(self.folder, check_name(name, "preset name") + ".json")

    def read(self, path: Path) -> Preset:
        """The preset in ``path`` (a file of the folder), checked by size and schema; StudioError says why not."""
        if not path.is_file():
            raise StudioError("it is not a regular file")
        size = path.stat().st_size
        if size > MAX_PRESET_BYTES:
            raise StudioError(f"it is {size:,} bytes; a preset is a few hundred (limit {MAX_PRESET_BYTES:,})")
        try:
            with open(path, "rb") as handle:
                record = json.loads(handle.read(MAX_PRESET_BYTES + 1))
        except RecursionError:
            raise StudioError("its JSON is nested deeper than any preset") from None
        except (OSError, ValueError) as err:
            raise StudioError(f"it is not readable JSON ({str(err)[:80]})") from None
        return check_record(record, path.stem)

    def listing(self, kind: str | None = None) -> Listing:
        """The presets of ``kind`` (every kind with None) and the bad files of the folder, by name."""
        names, problems = [], []
        files = sorted(self.folder.glob("*.json"))
        if len(files) > MAX_PRESETS:
            problems.append(f"the presets folder holds {len(files):,} files: only the first {MAX_PRESETS} are listed")
            files = files[:MAX_PRESETS]
        for file in files:
            try:
                path = self.path(file.stem)  # a name the studio can use, inside the folder (links included)
                preset = self.read(path)
            except StudioError as err:
                problems.append(f"{file.name}: {err}")
                try:
                    check_name(file.stem)
                except StudioError:
                    continue  # a name the page cannot type: it cannot be deleted from there either
                names.append(file.stem)  # listed, so that it can be deleted; loading says what is wrong
                continue
            if kind is None or preset.kind == kind:
                names.append(preset.name)
        return Listing(names, problems)

    def names(self, kind: str | None = None) -> list[str]:
        """The names ``listing`` offers (bad presets included: they can be deleted)."""
        return self.listing(kind).names

    def save(self, name: str, spec) -> tuple[Preset, bool]:
        """Store ``spec``'s settings as preset ``name``; returns it and whether it replaced an older one."""
        path = self.path(name)
        checked = _checked(dataclasses.replace(spec, adapter_name="preset"))
        settings = {k: v for k, v in dataclasses.asdict(checked).items() if k not in NOT_STORED}
        preset = check_record({"format": FORMAT, "kind": str(checked.kind), "settings": settings}, path.stem)
        replaced = path.is_file()
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({"format": FORMAT, "kind": str(preset.kind), "settings": settings}, indent=1))
        return preset, replaced

    def load(self, name: str) -> Preset:
        path = self.path(name)
        if not path.exists():
            known = ", ".join(self.names()) or "none yet"
            raise StudioError(f"no preset named {name!r} (saved presets: {known})")
        try:
            preset = self.read(path)
        except StudioError as err:
            raise StudioError(f"preset {path.stem!r} cannot be loaded: {err}; delete it or save it again") from None
        try:
            _checked(preset.spec())
        except (StudioError, TypeError, ValueError) as err:
            raise StudioError(f"preset {path.stem!r} holds a setting Start would refuse: {err}") from None
        return preset

    def delete(self, name: str) -> None:
        """Remove preset ``name``, good or bad: the folder's entry (a link itself, never what it leads to)."""
        path = entry(self.folder, check_name(name, "preset name") + ".json")
        if not path.is_file() and not path.is_symlink():
            raise StudioError(f"no preset named {name!r}")
        path.unlink()
