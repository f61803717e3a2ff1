"""The words of the tiny world: shapes, colours, textures, sizes, positions, backgrounds.

Every list is ordered and its order is the class index used by masks and by the evaluator, so never reorder:
append. Colours are RGB in 0..255.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 215, 45),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "purple": (145, 55, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "blue": (60, 90, 200),
    "green": (60, 150, 70),
}
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
SIZES: dict[str, int] = {"small": 18, "large": 28}  # bounding-box side in pixels at 64x64
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
CORNER_POSITIONS: tuple[str, ...] = POSITIONS[:4]

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)

# Segmentation classes: 0 is background, shape i is class i + 1.
SEGMENTATION_CLASSES: tuple[str, ...] = ("background", *SHAPES)

# Words a caption can use, besides the attribute words above.
GLUE_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "at",
    "and",
    "on",
    "background",
    "top",
    "bottom",
    "left",
    "right",
    ",",
)


def world_words() -> list[str]:
    """Every word of the world's captions, each a single token in the tiny tokenizer."""
    words: list[str] = []
    for group in (SHAPES, COLOUR_NAMES, BACKGROUND_NAMES, TEXTURES, SIZE_NAMES, POSITIONS, GLUE_WORDS):
        for phrase in group:
            for word in phrase.split():
                if word not in words:
                    words.append(word)
    return words
