"""Image folders and the DreamBooth dataset, with errors that say which file is wrong and what to do."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import IMAGE_EXTENSIONS, ImageReadError, open_image

__all__ = ["IMAGE_EXTENSIONS", "DreamBoothDataset", "EpochShuffleSampler", "collate", "load_image_folder"]


def load_image_folder(folder: str | Path, what: str = "instance") -> list[Image.Image]:
    """Every image in ``folder`` (sorted by name) as upright RGB; files of other types (captions, JSON) are ignored.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` naming the files when the folder holds no
    images or any image cannot be decoded.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"the {what} folder '{folder}' does not exist; pass a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    candidates = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not candidates:
        others = ", ".join(p.name for p in files[:5]) or "nothing"
        raise ValueError(
            f"the {what} folder '{folder}' holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}; found "
            f"{others}); put 3-10 images of the subject there"
        )
    images, bad = [], []
    for path in candidates:
        try:
            images.append(open_image(path, f"{what} image"))
        except ImageReadError as err:
            bad.append(str(err))
    if bad:
        raise ValueError(
            f"{len(bad)} file(s) in the {what} folder '{folder}' cannot be read as images: {'; '.join(bad[:5])}. "
            "Remove or replace them; nothing has been trained yet."
        )
    return images


def _resize_and_crop(
    image: Image.Image, size: int, center_crop: bool, rng: np.random.Generator
) -> tuple[Image.Image, int, int, int]:
    """Resize the short side to ``size`` and crop a square; returns the crop, its top-left corner (top, left) in the
    resized image, and the resized width."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    if center_crop:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
    return image.crop((left, top, left + size, top + size)), top, left, width


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB image → (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images with their prompt, plus class images with theirs when prior preservation is on.

    ``tokenizer`` may be a list (SDXL's two): the prompt's ids are ``input_ids``, ``input_ids_2``, ... in the batch.
    Each example also carries SDXL's size conditioning, ``add_time_ids`` = (original height, original width, crop
    top, crop left, target height, target width), the crop corner measured in the image as it was flipped (as
    diffusers' ``train_dreambooth_lora_sdxl.py`` records it); tasks of other models ignore it.

    Augmentation (random crop, flip) is a pure function of ``(seed, epoch, index)``, so a resumed run sees the
    same images as an uninterrupted one. Call ``set_epoch`` at the start of each epoch.
    """

    def __init__(
        self,
        instance_images,
        instance_prompt: str,
        tokenizer,
        size: int,
        center_crop: bool = False,
        random_flip: bool = False,
        class_images=None,
        class_prompt: str | None = None,
        seed: int = 0,
    ):
        self.instance_images = list(instance_images)
        self.class_images = list(class_images or [])
        self.size, self.center_crop, self.random_flip, self.seed = size, center_crop, random_flip, seed
        self.epoch = 0
        tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
        self.instance_ids = [self._tokenize(t, instance_prompt) for t in tokenizers]
        self.class_ids = [self._tokenize(t, class_prompt) for t in tokenizers] if self.class_images else None

    @staticmethod
    def _tokenize(tokenizer, prompt: str) -> torch.Tensor:
        return tokenizer(
            prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def _augment(self, image: Image.Image, index: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels, add_time_ids) of one image."""
        rng = np.random.default_rng([self.seed, self.epoch, index, stream])
        original = (image.height, image.width)
        image, top, left, width = _resize_and_crop(image, self.size, self.center_crop, rng)
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            left = width - self.size - left  # the same crop, measured in the flipped image
        return to_pixels(image), torch.tensor([*original, top, left, self.size, self.size])

    def _example(self, image: Image.Image, ids: list[torch.Tensor], index: int, stream: int) -> dict:
        pixels, time_ids = self._augment(image, index, stream)
        return {"pixel_values": pixels, "add_time_ids": time_ids, **{_ids_key(i): t for i, t in enumerate(ids)}}

    def __getitem__(self, index: int) -> dict:
        instance = self.instance_images[index % len(self.instance_images)]
        example = {"instance": self._example(instance, self.instance_ids, index, 0)}
        if self.class_images:
            image = self.class_images[index % len(self.class_images)]
            example["class"] = self._example(image, self.class_ids, index, 1)
        return example


def _ids_key(i: int) -> str:
    return "input_ids" if i == 0 else f"input_ids_{i + 1}"


def collate(examples: list[dict]) -> dict:
    """Batch instance examples, then class examples after them (one forward pass; the loss splits them)."""
    rows = [e["instance"] for e in examples] + [e["class"] for e in examples if "class" in e]
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on ``(seed, epoch)``: reproducible across interruptions and processes."""

    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{self.epoch}".encode()))
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length
