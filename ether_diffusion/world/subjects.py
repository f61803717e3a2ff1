"""DreamBooth subjects of the tiny world: instance images, class noun, prompts, and their folder format.

``assets/subjects/<name>/`` holds ``00.png`` .. ``04.png`` and ``subject.json``::

    {"name", "class_noun", "identifier", "instance_prompt", "class_prompt", "attributes", "eval_prompts"}

Each subject's (colour, texture) pair never occurs in pretraining (``heldout.HELD_OUT_PAIRS``), so the base
model has never seen it; the evaluation prompts put it on new backgrounds, positions and sizes, next to a second
object, and change one of its properties, like the 25 prompts of the DreamBooth dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..assets import SUBJECTS_HINT, AssetError, default_subjects_path
from .attributes import BACKGROUND_NAMES, COLOUR_NAMES, POSITIONS, SHAPES, SIZE_NAMES, TEXTURES
from .heldout import SUBJECT_SPECS, SubjectSpec
from .render import render
from .scene import Scene, WorldObject, place

IDENTIFIER = "sks"
NUM_INSTANCE_IMAGES = 5


def instance_scenes(spec: SubjectSpec, count: int = NUM_INSTANCE_IMAGES) -> list[Scene]:
    """The subject alone, on varied backgrounds, positions and sizes; deterministic per subject."""
    rng = np.random.default_rng([4242, SUBJECT_SPECS.index(spec)])
    backgrounds = [b for b in BACKGROUND_NAMES if b != spec.colour]
    order = rng.permutation(len(backgrounds))
    scenes = []
    for i in range(count):
        background = backgrounds[order[i % len(backgrounds)]]
        position = POSITIONS[int(rng.integers(len(POSITIONS)))]
        size = SIZE_NAMES[i % len(SIZE_NAMES)]
        cx, cy = place(position, size, rng)
        scenes.append(Scene(background, (WorldObject(spec.shape, spec.colour, spec.texture, size, position, cx, cy),)))
    return scenes


def eval_prompts(spec: SubjectSpec) -> list[str]:
    """Twelve prompts that put the subject in new contexts (``sks`` names it)."""
    noun = f"{IDENTIFIER} {spec.shape}"
    rng = np.random.default_rng([777, SUBJECT_SPECS.index(spec)])
    backgrounds = [b for b in BACKGROUND_NAMES if b != spec.colour]
    others = [s for s in SHAPES if s != spec.shape]
    colours = [c for c in COLOUR_NAMES if c != spec.colour]
    textures = [t for t in TEXTURES if t != spec.texture]
    second = [others[int(rng.integers(len(others)))] for _ in range(2)]
    second_colour = [colours[int(rng.integers(len(colours)))] for _ in range(2)]
    return [
        *(f"a {noun} on a {b} background" for b in backgrounds[:3]),
        f"a {noun} at top left",
        f"a {noun} at bottom right",
        f"a {noun} at center",
        f"a small {noun}",
        f"a large {noun}",
        f"a {noun} at top left and a {second_colour[0]} solid {second[0]} at bottom right",
        f"a {second_colour[1]} striped {second[1]} at top right and a {noun} at bottom left",
        f"a {colours[int(rng.integers(len(colours)))]} {noun}",  # property change: colour
        f"a {textures[int(rng.integers(len(textures)))]} {noun}",  # property change: texture
    ]


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    instance_prompt: str
    class_prompt: str
    eval_prompts: tuple[str, ...]
    attributes: dict
    image_paths: tuple[Path, ...]

    def images(self) -> list[Image.Image]:
        return [Image.open(p).convert("RGB") for p in self.image_paths]


def subject_record(spec: SubjectSpec) -> dict:
    return {
        "name": spec.name,
        "class_noun": spec.class_noun,
        "identifier": IDENTIFIER,
        "instance_prompt": f"a {IDENTIFIER} {spec.class_noun}",
        "class_prompt": f"a {spec.class_noun}",
        "attributes": {"shape": spec.shape, "colour": spec.colour, "texture": spec.texture},
        "eval_prompts": eval_prompts(spec),
    }


def write_subject(spec: SubjectSpec, root: str | Path) -> Path:
    directory = Path(root) / spec.name
    directory.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(instance_scenes(spec)):
        Image.fromarray(render(scene).image).save(directory / f"{i:02d}.png", optimize=True)
    record = subject_record(spec)
    record["instance_scenes"] = [s.to_dict() for s in instance_scenes(spec)]
    (directory / "subject.json").write_text(json.dumps(record, indent=2) + "\n")
    return directory


def load_subject(directory: str | Path) -> Subject:
    directory = Path(directory)
    meta = directory / "subject.json"
    if not meta.is_file():
        raise AssetError(f"{meta} is missing; regenerate the subjects with: {SUBJECTS_HINT}")
    try:
        record = json.loads(meta.read_text())
    except ValueError as err:
        raise AssetError(f"{meta} is not valid JSON ({err}); regenerate with: {SUBJECTS_HINT}") from err
    paths = tuple(sorted(directory.glob("*.png")))
    if len(paths) < 4:
        raise AssetError(
            f"{directory} holds {len(paths)} instance images, at least 4 expected; regenerate with: {SUBJECTS_HINT}"
        )
    return Subject(
        record["name"],
        record["class_noun"],
        record["instance_prompt"],
        record["class_prompt"],
        tuple(record["eval_prompts"]),
        record["attributes"],
        paths,
    )


def load_subjects(root: str | Path | None = None) -> list[Subject]:
    root = Path(root) if root is not None else default_subjects_path()
    if not root.is_dir():
        raise AssetError(f"subjects folder {root} is missing; regenerate it with: {SUBJECTS_HINT}")
    return [load_subject(root / spec.name) for spec in SUBJECT_SPECS]
