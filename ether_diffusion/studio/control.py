"""Controllable synthesis in the studio: what the Control tab trains on, and the control maps it samples with.

A control job (``ControlSpec``) trains the library's control task (``ether_diffusion.control.train``: a condition
encoder plus ETHER adapters) on either

- the tiny world's **segmentation** or **edge** set, rendered on demand into ``<workspace>/control_data/`` and
  reused by later jobs asking for the same set (``write_world_control_dataset``), or
- a **dataset folder** in the control script's layout (``metadata.jsonl`` with ``image``, ``conditioning_image``
  and ``text``; ``docs/control.md``).

Its previews sample one held-out control (a world scene no job trains on, or the folder's first row) from step 0.
A control map for sampling may be uploaded or drawn on a canvas: ``control_map`` makes it the RGB square the
model takes (transparent paint on black, centre-cropped, resized with nearest-neighbour so class colours stay
exact) and says what it changed.
"""

from __future__ import annotations

import json
import os
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

from ..control.data import (
    SEGMENTATION_PALETTE,
    edges_to_control,
    layout_free_caption,
    mask_to_control,
    write_world_control_dataset,
)
from ..control.train import ControlConfig
from ..files import atomic_folder
from ..registry import train
from ..training.config import TaskKind
from ..world.dataset import render_arrays
from .forms import FormSpec
from .workspace import StudioError, Workspace

__all__ = [
    "CONTROL_SOURCES",
    "ControlSpec",
    "control_map",
    "example_control",
    "palette_colors",
    "world_control_data",
]

WORLD_SOURCES = ("segmentation", "edges")  # the tiny world's control tasks (control.data.CONTROL_TASKS)
CONTROL_SOURCES = (*WORLD_SOURCES, "folder")
PREVIEW_SCENE = 20_000_000  # world scenes from here on are never trained on (as in docs/control.md)
EXAMPLE_SCENE = 20_000_100
CONTROL_LEARNING_RATE, ENCODER_LEARNING_RATE = 1e-3, 1e-4  # the paper's (docs/control.md)


@dataclass
class ControlSpec(FormSpec):
    """What the Control tab asks for: the shared settings (``FormSpec``) and a control adapter's training data (a
    world set or a dataset folder) and encoder."""

    kind = TaskKind.CONTROL
    WHOLE_NUMBERS = {"scenes": (8, 20_000), "train_batch_size": (1, 64)}
    LEARNING_RATES = {"learning_rate": CONTROL_LEARNING_RATE, "encoder_learning_rate": ENCODER_LEARNING_RATE}

    _: KW_ONLY
    source: str = "segmentation"  # "segmentation" | "edges" (the tiny world, rendered) | "folder"
    data_dir: str = ""  # for "folder": a dataset folder in the control script's layout
    scenes: int = 256  # for a world set: how many scenes to render
    max_train_steps: int = 300
    learning_rate: float = CONTROL_LEARNING_RATE
    encoder_learning_rate: float = ENCODER_LEARNING_RATE
    train_batch_size: int = 4

    def validated(self) -> ControlSpec:
        spec = super().validated()
        if spec.source not in CONTROL_SOURCES:
            raise StudioError(f"training data {spec.source!r}: choose one of {', '.join(CONTROL_SOURCES)}")
        if spec.source == "folder":
            spec.data_dir = str(check_dataset_folder(spec.data_dir))
        return spec

    def inputs(self, workspace: Workspace) -> dict:
        """The training folder and the held-out preview (control image, prompt), rendered if need be. A dataset
        folder is checked again (every file it names inside it): it may have changed since the form was checked."""
        if self.source == "folder":
            folder = check_dataset_folder(self.data_dir)
            first = first_row(folder)  # its files checked to be inside the folder just now
            preview_image, caption = (folder / first["conditioning_image"]).resolve(), first["text"]
        else:
            folder = world_control_data(workspace, self.source, self.scenes)
            preview = world_control_data(workspace, self.source, 1, start=PREVIEW_SCENE)
            row = first_row(preview)
            preview_image, caption = preview / row["conditioning_image"], row["text"]
        return {
            "data_dir": str(folder),
            "preview_image": str(preview_image),
            "preview_prompt": (self.preview_prompt or "").strip() or caption,
        }

    def config(self, model: str, inputs: dict, output_dir: Path, resume: bool, model_config: str | None = None,
               report_to: str = "none"):  # fmt: skip
        """The library's control configuration for this job."""
        return ControlConfig(
            pretrained_model_name_or_path=model,
            model_config=model_config,
            train_data_dir=inputs["data_dir"],
            ether_method=self.method,
            n_blocks=int(self.n_blocks),
            base_quantization=self.base_quantization,
            max_train_steps=int(self.max_train_steps),
            learning_rate=float(self.learning_rate),
            encoder_learning_rate=float(self.encoder_learning_rate),
            train_batch_size=int(self.train_batch_size),
            seed=int(self.seed),
            checkpointing_steps=int(self.preview_every),
            checkpoints_total_limit=2,
            validation_prompt=[inputs["preview_prompt"]],
            validation_image=[inputs["preview_image"]],
            validation_steps=int(self.preview_every),
            num_validation_images=int(self.preview_images),
            validation_inference_steps=int(self.preview_steps),
            validation_guidance_scale=float(self.guidance_scale),
            adapter_name=self.adapter_name,
            output_dir=str(output_dir),
            report_to=report_to,
            quiet=True,
            resume_from_checkpoint="latest" if resume else None,
        )

    @staticmethod
    def train(config, callbacks):
        return train(config, callbacks)


#: the columns of a row that name files of the dataset folder, as the messages call them
FILE_COLUMNS = {"image": "target image", "conditioning_image": "control image"}
MAX_METADATA_LINE = 1 << 20  # characters in one row of metadata.jsonl: a row is a few hundred


def check_dataset_folder(path: str | os.PathLike | None) -> Path:
    """``path`` as a dataset folder (resolved) with a readable first row, every file its ``metadata.jsonl`` names
    inside it (``dataset_file``); StudioError naming the first bad row and what is wrong with it."""
    if not path or not str(path).strip():
        raise StudioError("no dataset folder: type the folder that holds metadata.jsonl, or train on a world set")
    folder = Path(str(path).strip()).expanduser()
    if not folder.is_dir():
        raise StudioError(f"the dataset folder '{folder}' does not exist on the studio's machine")
    folder = folder.resolve()
    first_row(folder)
    for number, row in _rows(folder):
        for column, what in FILE_COLUMNS.items():
            if isinstance(row.get(column), str):
                dataset_file(folder, row[column], number, what)
    return folder


def dataset_file(folder: Path, name: str, line: int, what: str) -> Path:
    """``folder / name`` resolved (links followed), or StudioError naming the row and the path when it is not inside
    ``folder``: a dataset names its own files, never ``../../etc/passwd`` nor an absolute path elsewhere. Nothing is
    opened, only resolved."""
    root = folder.resolve()
    try:
        path = (root / name).resolve()
    except (OSError, ValueError, RuntimeError) as err:  # a NUL in the name, a link loop
        raise StudioError(
            f"'{root / 'metadata.jsonl'}', line {line}: the {what} {name!r:.80} is not a path ({err})"
        ) from None
    if not path.is_relative_to(root) or path == root:
        raise StudioError(
            f"'{root / 'metadata.jsonl'}', line {line}: the {what} {name!r:.80} is outside the dataset folder "
            f"'{root}'; a dataset names files inside its folder (paths relative to it)"
        )
    return path


def _rows(folder: Path):
    """``(line number, row)`` of each line of ``folder/metadata.jsonl`` that holds a JSON object, read lazily."""
    metadata = folder / "metadata.jsonl"
    try:
        with open(metadata, encoding="utf-8") as handle:
            for number, line in enumerate(iter(lambda: handle.readline(MAX_METADATA_LINE), ""), start=1):
                if not line.endswith("\n") and len(line) == MAX_METADATA_LINE:
                    raise StudioError(f"'{metadata}', line {number} is over {MAX_METADATA_LINE:,} characters")
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError) as err:
                    raise StudioError(f"'{metadata}', line {number} is not a JSON object ({str(err)[:80]})") from None
                if not isinstance(row, dict):
                    raise StudioError(f"'{metadata}', line {number} is not a JSON object")
                yield number, row
    except (OSError, UnicodeDecodeError) as err:
        raise StudioError(f"'{metadata}' cannot be read ({err})") from None


def first_row(folder: Path) -> dict:
    """The first row of ``folder/metadata.jsonl`` (columns image, conditioning_image, text), checked: its files are
    inside the folder (``dataset_file``) before the control image is looked for."""
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise StudioError(
            f"'{folder}' has no metadata.jsonl: write one JSON object per line with 'image', 'conditioning_image' "
            "and 'text' (docs/control.md), or train on a world set"
        )
    number, row = next(_rows(folder), (None, None))
    if row is None:
        raise StudioError(f"'{metadata}' has no rows")
    if not all(isinstance(row.get(c), str) for c in ("image", "conditioning_image", "text")):
        raise StudioError(
            f"'{metadata}', line {number}: a row needs the columns 'image', 'conditioning_image' and 'text' (text)"
        )
    paths = {column: dataset_file(folder, row[column], number, what) for column, what in FILE_COLUMNS.items()}
    if not paths["conditioning_image"].is_file():
        raise StudioError(
            f"'{metadata}', line {number}: the control image '{row['conditioning_image']}' does not exist"
        )
    return row


def world_control_data(workspace: Workspace, task: str, count: int, start: int = 0) -> Path:
    """The tiny world's ``task`` set of ``count`` scenes from ``start``, rendered once into the workspace (complete or
    absent: ``atomic_folder``)."""
    name = f"{task}-{count}" + (f"-from-{start}" if start else "")
    folder = workspace.control_data / name
    if (folder / "metadata.jsonl").is_file():
        return folder
    # an incomplete folder is replaced; one another job completes meanwhile is as good as this one, and kept
    with atomic_folder(folder, replace=folder.exists()) as scratch:
        write_world_control_dataset(scratch, task, count, start)
    return folder


def palette_colors(task: str) -> list[str]:
    """Brush colours for drawing a map of ``task``: the segmentation classes, or white edges."""
    if task == "edges":
        return ["#ffffff"]

    return ["#{:02x}{:02x}{:02x}".format(*map(int, color)) for color in SEGMENTATION_PALETTE[1:]]


def example_control(task: str, index: int = 0):
    """A held-out world scene as ``(control map, caption)`` for ``task`` ("segmentation" or "edges")."""
    if task not in WORLD_SOURCES:
        raise StudioError(f"example maps are of {' or '.join(WORLD_SOURCES)}, not {task!r}")
    arrays = render_arrays(1, "pretrain", start=EXAMPLE_SCENE + int(index))
    image = mask_to_control(arrays.masks[0]) if task == "segmentation" else edges_to_control(arrays.edges[0])
    return image, layout_free_caption(arrays.scenes[0])


def control_map(image, size: int):
    """An uploaded or drawn control map as the ``size``×``size`` RGB image the model takes, and a note of what was
    changed (nothing is changed silently). ``image``: a PIL image or an (H, W[, C]) uint8 array; transparent paint
    counts as black (the background of every control)."""
    import numpy as np
    from PIL import Image

    if image is None:
        raise StudioError("no control map: upload one, draw one on the canvas, or load an example")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise StudioError(f"the control map must be an 8-bit image, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise StudioError(f"the control map must be an image, not {type(image).__name__}")
    notes = []
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    image = image.convert("RGB")
    if max(image.getextrema(), key=lambda band: band[1])[1] == 0:
        raise StudioError("the control map is all black: draw the shapes (or edges) to control, or load an example")
    width, height = image.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        notes.append(f"centre-cropped from {width}×{height}")
    if image.size != (size, size):
        notes.append(f"resized from {image.width}×{image.height} to {size}×{size} (nearest-neighbour)")
        image = image.resize((size, size), Image.NEAREST)
    return image, "; ".join(notes)
