"""What a run leaves on disk besides checkpoints: validation images and grids, the model card."""

from __future__ import annotations

import math
from pathlib import Path

from ..files import atomic_write

__all__ = ["labelled_grid", "make_grid", "save_samples", "write_text"]


def make_grid(images, columns: int | None = None):
    """Images pasted in rows of ``columns`` (default: one row), on white."""
    from PIL import Image

    columns = columns or len(images)
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def labelled_grid(rows: list[tuple[str, list]], column_titles: list[str], scale: int = 2, label_width: int = 90):
    """A grid with a label left of each row and a title above each column (wrapped), images scaled ``scale``×
    with nearest-neighbour (the tiny world's 64-pixel images stay crisp)."""
    from PIL import Image, ImageDraw

    size = rows[0][1][0].width * scale
    titles = [_wrap(t, max(8, size // 6)) for t in column_titles]
    header = 14 * max((len(t) for t in titles), default=0) + 6
    gap = 8
    grid = Image.new("RGB", (label_width + size * len(column_titles), header + len(rows) * (size + gap) - gap), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(titles):
        for i, line in enumerate(lines):
            draw.text((label_width + c * size + 3, 2 + 14 * i), line, fill="black")
    for r, (label, images) in enumerate(rows):
        top = header + r * (size + gap)
        draw.multiline_text((4, top + size // 2 - 7 * (label.count("\n") + 1)), label, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((size, size), Image.NEAREST), (label_width + c * size, top))
    return grid


def save_samples(images, folder: Path, stem: str, columns: int | None) -> list[Path]:
    """``<stem>_<i>.png`` per image, or one ``<stem>.png`` grid when ``columns`` is given; written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    if columns:
        parts = [(folder / f"{stem}.png", make_grid(images, columns))]
    else:
        parts = [(folder / f"{stem}_{i}.png", image) for i, image in enumerate(images)]
    for path, image in parts:
        with atomic_write(path) as tmp:
            image.save(tmp, format="PNG")
    return [path for path, _ in parts]


def write_text(path: Path, text: str) -> Path:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)
    return path
