"""What pretraining never sees: the quality gate's caption combinations and the DreamBooth subjects.

Pretraining rejects any object whose (shape, colour, background) is in ``HELD_OUT_TRIPLES`` (so the quality
gate samples combinations the model has not been shown) and any object whose (colour, texture) pair belongs to a
subject (so no subject, and no other object with its colour-texture pair, appears in pretraining).
"""

from __future__ import annotations

from dataclasses import dataclass

HELD_OUT_TRIPLES: tuple[tuple[str, str, str], ...] = (
    ("star", "red", "blue"),
    ("circle", "yellow", "black"),
    ("triangle", "blue", "white"),
    ("square", "purple", "gray"),
    ("cross", "orange", "green"),
    ("heart", "white", "black"),
    ("circle", "green", "gray"),
    ("square", "black", "white"),
    ("triangle", "red", "green"),
    ("star", "yellow", "gray"),
    ("cross", "blue", "black"),
    ("heart", "orange", "white"),
)


@dataclass(frozen=True)
class SubjectSpec:
    """A DreamBooth subject: one object instance whose colour-texture pair pretraining never shows."""

    name: str
    shape: str
    colour: str
    texture: str

    @property
    def class_noun(self) -> str:
        return self.shape


SUBJECT_SPECS: tuple[SubjectSpec, ...] = (
    SubjectSpec("orange_checkered_star", "star", "orange", "checkered"),
    SubjectSpec("purple_striped_heart", "heart", "purple", "striped"),
    SubjectSpec("green_dotted_square", "square", "green", "dotted"),
    SubjectSpec("yellow_striped_triangle", "triangle", "yellow", "striped"),
)

HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset((s.colour, s.texture) for s in SUBJECT_SPECS)
