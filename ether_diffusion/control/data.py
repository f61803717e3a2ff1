"""Data for controllable synthesis: control images, the dataset folder, and the tiny world's control tasks.

A dataset folder holds ``metadata.jsonl``, one JSON object per line naming a target image, its control image
(paths relative to the folder) and a caption, under the column names of diffusers' ``train_controlnet.py``
(``image``, ``conditioning_image``, ``text`` by default; other names via flags)::

    {"image": "images/00000.png", "conditioning_image": "conditions/00000.png", "text": "a red circle ..."}

Control images are RGB in [0, 1] (grayscale ones, e.g. edge maps, are repeated to three channels); targets are
RGB in [-1, 1]. Every row is checked when the dataset opens, so a missing column or file, an image that is none or
too large (``images.check_image``) or a caption over ``MAX_PROMPT_CHARS`` stops the run before any model loads. The
file is read line by line, each line up to ``MAX_METADATA_LINE_BYTES``, and must be UTF-8.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import ImageReadError, check_image, open_image
from ..training.data import to_pixels
from ..training.text import MAX_METADATA_LINE_BYTES, check_prompt, text_lines
from ..world.dataset import render_arrays
from ..world.scene import CaptionDropout, caption

__all__ = [
    "CONTROL_TASKS",
    "SEGMENTATION_PALETTE",
    "ControlDataError",
    "ControlDataset",
    "control_to_tensor",
    "edges_to_control",
    "mask_to_control",
    "write_world_control_dataset",
]

CONTROL_TASKS = ("segmentation", "edges")
# Class colours of segmentation controls (ADE20K-style colour-coded maps): background, then the world's shapes
# in the order of world.attributes.SHAPES.
SEGMENTATION_PALETTE = np.array(
    [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)],
    dtype=np.uint8,
)
ACCEPTED_MODES = ("RGB", "L", "P", "1")


def layout_free_caption(scene) -> str:
    """The caption of a control scene: what is there (shapes, colours, textures, background) but not where or how
    large: that is the control's job. A full caption would let the base model place objects by itself."""
    return caption(scene, np.random.default_rng(0), CaptionDropout(size=1.0, position=1.0))


class ControlDataError(ValueError):
    """A dataset folder or control image that cannot be used, with what to do about it."""


def mask_to_control(mask: np.ndarray) -> Image.Image:
    """A class mask (H, W) of ints → its colour-coded RGB control image."""
    mask = np.asarray(mask)
    if mask.max(initial=0) >= len(SEGMENTATION_PALETTE):
        raise ValueError(f"mask class {int(mask.max())} has no palette colour (0..{len(SEGMENTATION_PALETTE) - 1})")
    return Image.fromarray(SEGMENTATION_PALETTE[mask.astype(np.int64)], "RGB")


def edges_to_control(edges: np.ndarray) -> Image.Image:
    """An edge map (H, W) uint8, 255 on edges → white-on-black RGB control image."""
    return Image.fromarray(np.asarray(edges, dtype=np.uint8), "L").convert("RGB")


def control_to_tensor(image, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """A control image → (channels, H, W) float in [0, 1], strictly checked.

    Accepts a PIL image (modes RGB, L, P, 1), an (H, W) or (H, W, C) uint8 array, or a (C, H, W) float tensor in
    [0, 1]. A wrong size, channel count, mode or value range raises ``ControlDataError`` saying what to change;
    nothing is resized silently, because a stretched map no longer lines up with what it controls.
    """
    if isinstance(image, Image.Image):
        if image.mode not in ACCEPTED_MODES:
            raise ControlDataError(
                f"control image mode {image.mode!r} is not supported; convert it to RGB or L (grayscale) first"
            )
        image = image.convert("RGB" if channels == 3 else "L")
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor[None]
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ControlDataError(
                f"a control array must be (H, W) or (H, W, C) uint8, got {image.dtype} {image.shape}"
            )
        tensor = torch.from_numpy(image.astype(np.float32) / 255.0)
        tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor[None]
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or not image.is_floating_point():
            raise ControlDataError(f"a control tensor must be (C, H, W) float in [0, 1], got {tuple(image.shape)}")
        if image.min() < 0 or image.max() > 1:
            raise ControlDataError("a control tensor must hold values in [0, 1]")
        tensor = image.float()
    else:
        raise ControlDataError(
            f"a control image must be a PIL image, numpy array or tensor, not {type(image).__name__}"
        )
    if tensor.shape[0] == 1 and channels == 3:
        tensor = tensor.expand(3, -1, -1)
    if tensor.shape[0] != channels:
        raise ControlDataError(f"the control image has {tensor.shape[0]} channels; this encoder takes {channels}")
    if tuple(tensor.shape[1:]) != (height, width):
        raise ControlDataError(
            f"the control image is {tensor.shape[2]}×{tensor.shape[1]} but the output is {width}×{height}: resize "
            f"it (nearest-neighbour for segmentation maps) or pass height={tensor.shape[1]}, width={tensor.shape[2]}"
        )
    return tensor.contiguous()


def open_control_image(path: Path, what: str) -> Image.Image:
    """A target or control image as upright RGB, or ``ControlDataError`` naming it."""
    try:
        return open_image(path, what)
    except ImageReadError as err:
        raise ControlDataError(f"{err}; replace or remove it") from err


class ControlDataset(torch.utils.data.Dataset):
    """Rows of (target image, control image, caption) from a dataset folder; see the module docstring.

    Items: ``pixel_values`` (3, R, R) in [-1, 1], ``conditioning_pixel_values`` (3, R, R) in [0, 1] and
    ``input_ids``. Images must already be ``resolution`` square or are resized (bicubic for targets, nearest for
    controls, so class colours stay exact). ``proportion_empty_prompts`` replaces captions by "" at random
    (seeded by row and epoch), as diffusers' ControlNet script does, which teaches the encoder to work unprompted.
    """

    def __init__(
        self,
        folder: str | Path,
        tokenizer,
        resolution: int,
        image_column: str = "image",
        conditioning_image_column: str = "conditioning_image",
        caption_column: str = "text",
        proportion_empty_prompts: float = 0.0,
        seed: int = 0,
        max_samples: int | None = None,
    ):
        self.folder = Path(folder)
        metadata = self.folder / "metadata.jsonl"
        if not self.folder.is_dir():
            raise FileNotFoundError(f"the dataset folder '{self.folder}' does not exist")
        if not (metadata.exists() or metadata.is_symlink()):
            raise ControlDataError(
                f"'{self.folder}' has no metadata.jsonl: write one JSON object per line with the columns "
                f"'{image_column}', '{conditioning_image_column}' and '{caption_column}'"
            )
        columns = (image_column, conditioning_image_column, caption_column)
        self.rows, problems, bad = [], [], 0  # the first five problems are told, the rest counted
        try:  # lines of at most MAX_METADATA_LINE_BYTES, UTF-8: a huge line or a binary file is refused unread
            for number, line in text_lines(metadata, MAX_METADATA_LINE_BYTES, "metadata file"):
                problem = self._add_row(line, columns)
                if problem:
                    bad += 1
                    if len(problems) < 5:
                        problems.append(f"line {number}: {problem}")
        except ValueError as err:
            raise ControlDataError(f"{err}; nothing has been trained yet") from None
        if bad:
            raise ControlDataError(
                f"{bad} bad row(s) in '{metadata}': {'; '.join(problems)}{' …' if bad > 5 else ''}. Fix or remove "
                "them; nothing has been trained yet."
            )
        if not self.rows:
            raise ControlDataError(f"'{metadata}' has no rows")
        if max_samples:
            self.rows = self.rows[:max_samples]
        self.tokenizer, self.resolution = tokenizer, resolution
        self.proportion_empty_prompts, self.seed, self.epoch = proportion_empty_prompts, seed, 0

    def _add_row(self, line: str, columns: tuple[str, str, str]) -> str | None:
        """Check one line of metadata.jsonl and keep its row; what is wrong with it otherwise. Both images are
        checked from their headers (``images.check_image``: the size limit, files that are no image), so a bad
        file stops the run here, before any model loads, rather than at the step that reads it."""
        if not line.strip():
            return None
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return f"not JSON ({err.msg})"
        if not isinstance(row, dict):
            return "not a JSON object"
        missing = [c for c in columns if not isinstance(row.get(c), str)]
        if missing:
            return f"no {', '.join(repr(c) for c in missing)}"
        try:
            check_prompt(row[columns[2]], f"the caption '{columns[2]}'")
            absent = [row[c] for c in columns[:2] if not (self.folder / row[c]).is_file()]
        except (ValueError, OSError) as err:  # a caption too long; a path too long for the system
            return str(err) if isinstance(err, ValueError) else f"{err.strerror or err}"
        if absent:
            return f"missing file {', '.join(absent)}"
        try:
            for column in columns[:2]:
                check_image(self.folder / row[column], column, row[column])
        except ImageReadError as err:
            return str(err)
        self.rows.append((self.folder / row[columns[0]], self.folder / row[columns[1]], row[columns[2]]))
        return None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        image_path, control_path, caption = self.rows[index]
        size = (self.resolution, self.resolution)
        image = open_control_image(image_path, "image").convert("RGB")
        control = open_control_image(control_path, "control image")
        if image.size != size:
            image = image.resize(size, Image.BICUBIC)
        if control.size != size:
            control = control.resize(size, Image.NEAREST)
        if self.proportion_empty_prompts:
            rng = np.random.default_rng(zlib.crc32(f"{self.seed}:{self.epoch}:{index}".encode()))
            if rng.random() < self.proportion_empty_prompts:
                caption = ""
        ids = self.tokenizer(
            caption,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        return {
            "pixel_values": to_pixels(image),
            "conditioning_pixel_values": control_to_tensor(control, *size),
            "input_ids": ids,
        }


def collate(examples: list[dict]) -> dict:
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def write_world_control_dataset(folder: str | Path, task: str, count: int, start: int = 0) -> Path:
    """Render ``count`` tiny-world scenes (numbers ``start ..``) as a dataset folder for ``task``, captioned with
    ``layout_free_caption``.

    Besides the three columns it stores each scene's class mask (``masks/``, values 0..6, column ``mask``) for the
    mIoU of the benchmark (``ether-diffusion bench control``). The same numbers give the same pixels on any machine.
    """
    if task not in CONTROL_TASKS:
        raise ValueError(f"task must be one of {CONTROL_TASKS}, got {task!r}")
    folder = Path(folder)
    for sub in ("images", "conditions", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    arrays = render_arrays(count, "pretrain", start=start)
    lines = []
    for i in range(count):
        name = f"{start + i:08d}.png"
        Image.fromarray(arrays.images[i]).save(folder / "images" / name)
        control = mask_to_control(arrays.masks[i]) if task == "segmentation" else edges_to_control(arrays.edges[i])
        control.save(folder / "conditions" / name)
        Image.fromarray(arrays.masks[i]).save(folder / "masks" / name)
        row = {
            "image": f"images/{name}",
            "conditioning_image": f"conditions/{name}",
            "text": layout_free_caption(arrays.scenes[i]),
            "mask": f"masks/{name}",
        }
        lines.append(json.dumps(row))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
