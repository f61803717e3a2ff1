"""Scenes of the tiny world: what is in an image, sampled deterministically, and its caption.

A scene is one or two objects on a plain background. A single object sits at one of five positions; two objects
sit in two different corners, listed in ``POSITIONS`` order (the canonical order the caption and the evaluator
use). Object centres are jittered inside their cell, so the pixels vary while the caption stays the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .attributes import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    CORNER_POSITIONS,
    POSITIONS,
    SHAPES,
    SIZE_NAMES,
    SIZES,
    TEXTURES,
)
from .heldout import HELD_OUT_PAIRS, HELD_OUT_TRIPLES

IMAGE_SIZE = 64
# Cell centre of each position (x, y) and the half-width of the cell the object must stay inside.
_CELL = {
    "top left": (16.0, 16.0, 16.0),
    "top right": (48.0, 16.0, 16.0),
    "bottom left": (16.0, 48.0, 16.0),
    "bottom right": (48.0, 48.0, 16.0),
    "center": (32.0, 32.0, 20.0),
}
SPLITS = ("pretrain", "all", "heldout")


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    texture: str
    size: str
    position: str
    cx: float  # centre in pixels
    cy: float


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[WorldObject, ...]

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(data["background"], tuple(WorldObject(**o) for o in data["objects"]))


def is_pretrain_object(shape: str, colour: str, texture: str, background: str) -> bool:
    """False for the combinations pretraining must never show (held-out triples and subject pairs)."""
    return (shape, colour, background) not in HELD_OUT_TRIPLES and (colour, texture) not in HELD_OUT_PAIRS


def place(position: str, size: str, rng: np.random.Generator) -> tuple[float, float]:
    """A jittered centre for an object of ``size`` inside the cell of ``position``."""
    x, y, half = _CELL[position]
    slack = max(half - SIZES[size] / 2 - 1, 0.0)
    dx, dy = rng.uniform(-slack, slack, size=2)
    return float(x + dx), float(y + dy)


def _sample_object(rng, background: str, position: str, split: str) -> WorldObject:
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        size = SIZE_NAMES[rng.integers(len(SIZE_NAMES))]
        if colour == background:
            continue
        if split == "pretrain" and not is_pretrain_object(shape, colour, texture, background):
            continue
        cx, cy = place(position, size, rng)
        return WorldObject(shape, colour, texture, size, position, cx, cy)


def sample_scene(rng: np.random.Generator, split: str = "pretrain", two_object_prob: float = 0.4) -> Scene:
    """One scene. ``split``: "pretrain" (held-out combinations rejected), "all" (anything, e.g. for the
    evaluator) or "heldout" (one object whose (shape, colour, background) is a held-out triple)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "heldout":
        shape, colour, background = HELD_OUT_TRIPLES[rng.integers(len(HELD_OUT_TRIPLES))]
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        size = SIZE_NAMES[rng.integers(len(SIZE_NAMES))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        cx, cy = place(position, size, rng)
        return Scene(background, (WorldObject(shape, colour, texture, size, position, cx, cy),))
    background = BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
    if rng.random() < two_object_prob:
        first, second = sorted(rng.choice(len(CORNER_POSITIONS), size=2, replace=False))
        positions = [CORNER_POSITIONS[first], CORNER_POSITIONS[second]]
    else:
        positions = [POSITIONS[rng.integers(len(POSITIONS))]]
    return Scene(background, tuple(_sample_object(rng, background, p, split) for p in positions))


def scene_for_seed(seed: int, split: str = "pretrain") -> Scene:
    """The scene of image number ``seed``: the same on every machine and Python run."""
    return sample_scene(np.random.default_rng([seed, SPLITS.index(split)]), split)


# ---------------------------------------------------------------------------------------------- captions
@dataclass(frozen=True)
class CaptionDropout:
    """Probability of leaving each optional word out of a caption (pretraining uses it, so short prompts work)."""

    size: float = 0.0
    colour: float = 0.0
    texture: float = 0.0
    position: float = 0.0
    background: float = 0.0


PRETRAIN_DROPOUT = CaptionDropout(size=0.3, colour=0.1, texture=0.3, position=0.3, background=0.15)


def object_phrase(obj: WorldObject, keep: dict[str, bool] | None = None) -> str:
    keep = keep or {}
    words = ["a"]
    if keep.get("size", True):
        words.append(obj.size)
    if keep.get("colour", True):
        words.append(obj.colour)
    if keep.get("texture", True):
        words.append(obj.texture)
    words.append(obj.shape)
    if keep.get("position", True):
        words += ["at", obj.position]
    return " ".join(words)


def caption(scene: Scene, rng: np.random.Generator | None = None, dropout: CaptionDropout | None = None) -> str:
    """Plain-words caption, e.g. "a large red striped star at top left on a blue background".

    With ``rng`` and ``dropout``, optional words are left out at random (the shape never is)."""
    dropout = dropout or CaptionDropout()

    def keep(p: float) -> bool:
        return rng is None or p <= 0 or rng.random() >= p

    phrases = []
    for obj in scene.objects:
        flags = {k: keep(getattr(dropout, k)) for k in ("size", "colour", "texture", "position")}
        phrases.append(object_phrase(obj, flags))
    text = " and ".join(phrases)
    if keep(dropout.background):
        text += f" on a {scene.background} background"
    return text


@dataclass(frozen=True)
class PromptObject:
    """What a prompt says about one object; None where it says nothing."""

    shape: str | None = None
    colour: str | None = None
    texture: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class PromptAttributes:
    objects: tuple[PromptObject, ...]
    background: str | None = None


def parse_prompt(prompt: str) -> PromptAttributes:
    """Read a caption back into attributes. Words outside the world (e.g. ``sks``) are ignored."""
    text = " ".join(prompt.lower().replace(",", " ").split())
    background = None
    if " background" in text:
        head, _, rest = text.rpartition(" on a ")
        if rest.endswith("background") and head:
            background_word = rest.removesuffix("background").strip()
            if background_word in BACKGROUND_NAMES:
                background = background_word
            text = head
    objects = []
    for phrase in text.split(" and "):
        position = None
        if " at " in f" {phrase} ":
            phrase, _, where = f" {phrase} ".partition(" at ")
            where = where.strip()
            position = where if where in POSITIONS else None
        found: dict[str, str] = {}
        for word in phrase.split():
            for key, vocab in (("shape", SHAPES), ("colour", COLOUR_NAMES), ("texture", TEXTURES)):
                if word in vocab:
                    found[key] = word
            if word in SIZE_NAMES:
                found["size"] = word
        if found or position:
            objects.append(PromptObject(position=position, **found))
    return PromptAttributes(tuple(objects), background)
