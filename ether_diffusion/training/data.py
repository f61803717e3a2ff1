"""Image folders (with kohya-style caption files), ``datasets`` datasets and the DreamBooth dataset, with errors that
say which file is wrong and what to do."""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import IMAGE_EXTENSIONS, ImageReadError, check_pixels, open_image, to_rgb
from .text import MAX_CAPTION_BYTES, MAX_METADATA_LINE_BYTES, MAX_PROMPT_CHARS, check_prompt, read_text_file, text_lines

__all__ = [
    "IMAGE_EXTENSIONS",
    "INTERPOLATION_MODES",
    "MAX_EPOCH_EXAMPLES",
    "MAX_IMAGES",
    "MAX_TOTAL_PIXELS",
    "DreamBoothDataset",
    "EpochShuffleSampler",
    "augmentations",
    "collate",
    "image_files",
    "load_captioned_folder",
    "load_dataset_images",
    "load_image_folder",
    "read_caption",
]


#: the most instance images a run holds, and the most pixels they may have in all: every image is kept decoded in
#: memory (3 bytes a pixel) for the whole run, so 2**30 pixels is 3 GiB, e.g. a thousand 1024² images. DreamBooth
#: needs 3-10 images; a larger captioned set fits when its images are scaled down to near --resolution
MAX_IMAGES = 100_000
MAX_TOTAL_PIXELS = 1 << 30
#: the most examples an epoch may have: its shuffled order (``EpochShuffleSampler``) is 8 bytes an example
MAX_EPOCH_EXAMPLES = 1 << 24


def image_files(folder: str | Path, what: str = "instance") -> list[Path]:
    """The image files in ``folder``, sorted by name; ``FileNotFoundError``/``ValueError`` when there are none, or
    more than ``MAX_IMAGES`` (counted while listing, so a huge folder is never listed whole)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"the {what} folder '{folder}' does not exist; pass a folder of images")
    candidates, others = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                if len(others) < 5:
                    others.append(entry.name)
                continue
            candidates.append(Path(folder, entry.name))
            if len(candidates) > MAX_IMAGES:
                raise ValueError(
                    f"the {what} folder '{folder}' holds more than {MAX_IMAGES:,} images; every image is held in "
                    "memory while training: train on fewer"
                )
    if not candidates:
        raise ValueError(
            f"the {what} folder '{folder}' holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}; found "
            f"{', '.join(sorted(others)) or 'nothing'}); put 3-10 images of the subject there"
        )
    return sorted(candidates)


class _PixelBudget:
    """Counts the pixels of decoded images and refuses the one that takes them over ``MAX_TOTAL_PIXELS``; each image
    is counted right after it is decoded, so at most one image more than the limit is ever held."""

    def __init__(self, what: str):
        self.what, self.pixels = what, 0

    def add(self, image: Image.Image, count: int) -> Image.Image:
        self.pixels += image.width * image.height
        if self.pixels > MAX_TOTAL_PIXELS:
            raise ValueError(
                f"the {self.what} images hold more than {MAX_TOTAL_PIXELS:,} pixels in all (reached at image "
                f"{count}); every image is held decoded in memory while training: scale them down to near "
                "--resolution, or train on fewer"
            )
        return image


def _open_all(paths: list[Path], folder: Path, what: str) -> list[Image.Image]:
    images, bad, budget = [], [], _PixelBudget(what)
    for path in paths:
        try:
            images.append(budget.add(open_image(path, f"{what} image"), len(images) + 1))
        except ImageReadError as err:
            bad.append(str(err))
    if bad:
        raise ValueError(
            f"{len(bad)} file(s) in the {what} folder '{folder}' cannot be read as images: {'; '.join(bad[:5])}. "
            "Remove or replace them; nothing has been trained yet."
        )
    return images


def load_image_folder(folder: str | Path, what: str = "instance", limit: int | None = None) -> list[Image.Image]:
    """Every image in ``folder`` (sorted by name; the first ``limit`` when given) as upright RGB; files of other
    types (captions, JSON) are ignored.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` naming the files when the folder holds no
    images or any image cannot be decoded, or when they are too many to hold (``MAX_IMAGES``, ``MAX_TOTAL_PIXELS``).
    """
    return _open_all(image_files(folder, what)[:limit], Path(folder), what)


def read_caption(path: Path) -> str:
    """The caption in the file ``path`` (stripped), read as ``text.read_text_file`` reads: its size checked before
    it is read, UTF-8, at most ``MAX_PROMPT_CHARS`` characters; ``ValueError`` naming the file otherwise."""
    limit = f"a caption is at most {MAX_PROMPT_CHARS:,} characters"
    caption = read_text_file(path, MAX_CAPTION_BYTES, "caption file", limit).strip()
    return check_prompt(caption, f"the caption file '{path}'")


def load_captioned_folder(
    folder: str | Path, fallback_prompt: str, caption_extension: str = ".txt"
) -> tuple[list[Image.Image], list[str]]:
    """The images of ``folder`` and a caption each, kohya's layout: ``dog1.txt`` beside ``dog1.png`` is that image's
    caption (stripped); an image without one, or with an empty one, gets ``fallback_prompt``. A caption file that is
    not a regular UTF-8 text file of at most ``MAX_PROMPT_CHARS`` characters is a ``ValueError`` naming it."""
    paths = image_files(folder, "instance")
    prompts = []
    for path in paths:
        caption_file = path.with_suffix(caption_extension)
        caption = ""
        if caption_file.exists() or caption_file.is_symlink():  # a folder, FIFO or broken link is refused, not skipped
            try:
                caption = read_caption(caption_file)
            except ValueError as err:
                raise ValueError(f"{err}. Nothing has been trained yet.") from None
        prompts.append(caption or fallback_prompt)
    return _open_all(paths, Path(folder), "instance"), prompts


def _metadata_files(folder: Path) -> list[Path]:
    """The metadata files ``datasets``' image folder loader reads (``metadata.jsonl`` and ``metadata.csv``, at any
    depth)."""
    return sorted(p for name in ("metadata.jsonl", "metadata.csv") for p in folder.rglob(name))


def _check_metadata(folder: Path, caption_column: str | None) -> None:
    """Read every metadata file of an image folder the way ``text.text_lines`` does (lines of at most
    ``MAX_METADATA_LINE_BYTES``, UTF-8) before ``datasets`` reads it whole; ``metadata.jsonl`` lines must be JSON
    objects and their captions prompts. ``ValueError`` names the file and line."""
    for metadata in _metadata_files(folder):
        rows = 0
        for number, line in text_lines(metadata, MAX_METADATA_LINE_BYTES, "metadata file"):
            if metadata.suffix != ".jsonl" or not line.strip():
                continue
            rows += 1
            where = f"'{metadata}', line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err.msg}); write one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{where}: a JSON {type(row).__name__}, not an object; write one object per line, e.g. "
                    '{"file_name": "dog1.png", "text": "a sks dog"}'
                )
            if caption_column and isinstance(row.get(caption_column), str):
                check_prompt(row[caption_column], f"{where}: the caption '{caption_column}'")
        if metadata.suffix == ".jsonl" and not rows:
            raise ValueError(
                f"'{metadata}' has no rows: write one JSON object per line, e.g. "
                '{"file_name": "dog1.png", "text": "a sks dog"}, or remove it'
            )


def _captions(data, column: str, fallback_prompt: str, name: str) -> list[str]:
    """The caption of every row (``fallback_prompt`` where it is missing or empty), their lengths measured in the
    Arrow table before any is made a Python string."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = data.with_format("arrow")[column]
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        lengths = pc.fill_null(pc.utf8_length(values), 0)
        if (pc.max(lengths).as_py() or 0) > MAX_PROMPT_CHARS:
            row = pc.index(pc.greater(lengths, MAX_PROMPT_CHARS), True).as_py()
            check_prompt(values[row].as_py(), f"--dataset_name '{name}': row {row} of --caption_column '{column}'")
    elif not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_null(values.type)):
        raise ValueError(
            f"--caption_column '{column}' of '{name}' holds {values.type} values, not text; give a column of strings"
        )
    captions = []
    for row, caption in enumerate(values.to_pylist()):
        text = str(caption).strip() if caption is not None else ""
        where = f"--dataset_name '{name}': row {row} of --caption_column '{column}'"
        captions.append(check_prompt(text, where) or fallback_prompt)
    return captions


def _row_image(value, row: int, column: str, feature) -> Image.Image:
    """A dataset row's image through ``open_image``: its bytes, or the local file it names; other sources (a file
    inside a remote archive) are decoded by ``datasets`` and checked after."""
    path = value.get("path") if isinstance(value, dict) else None
    name = f"row {row} of --image_column '{column}'" + (f" ({Path(path).name})" if path else "")
    if isinstance(value, dict) and value.get("bytes") is not None:
        return open_image(io.BytesIO(value["bytes"]), "dataset image", name)
    if path and Path(path).is_file():
        return open_image(path, "dataset image", name)
    try:
        image = feature.decode_example(value)
    except Exception as err:  # datasets raises many kinds (offline, missing, PIL's)
        raise ImageReadError(f"{name}: cannot be read as an image ({type(err).__name__}: {err})") from err
    check_pixels(image.width, image.height, name)
    return to_rgb(image)


def load_dataset_images(
    name: str,
    fallback_prompt: str,
    image_column: str = "image",
    caption_column: str | None = None,
    config_name: str | None = None,
    cache_dir: str | None = None,
) -> tuple[list[Image.Image], list[str]]:
    """Images and captions of a ``datasets`` dataset: a folder written by ``save_to_disk``, an image folder with
    ``metadata.jsonl`` (or any folder ``load_dataset`` reads), or a Hub id; its ``train`` split when it has several.
    Without ``caption_column``, or where a caption is empty, an image gets ``fallback_prompt``.

    Images go through ``open_image`` as files in a folder do (the same size limit and messages, naming the row);
    captions have the limit of ``text.check_prompt``, and an image folder's metadata lines are checked before
    ``datasets`` reads them."""
    import datasets

    path = Path(name).expanduser()
    saved = any((path / marker).is_file() for marker in ("dataset_info.json", "state.json", "dataset_dict.json"))
    if path.is_dir() and not saved:
        _check_metadata(path, caption_column)
    try:
        if path.is_dir() and saved:
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(str(path) if path.is_dir() else name, config_name, cache_dir=cache_dir)
    except Exception as err:  # datasets raises many kinds (offline, not found, bad metadata)
        raise ValueError(
            f"--dataset_name '{name}' could not be loaded ({type(err).__name__}: {err}); pass a folder saved with "
            "Dataset.save_to_disk, an image folder with metadata.jsonl, or a Hub dataset id (with network access)"
        ) from err
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ValueError(f"--dataset_name '{name}' has no train split (it has {', '.join(data)})")
        data = data["train"]
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column is not None and column not in data.column_names:
            raise ValueError(
                f"{flag} '{column}' is not a column of '{name}' (its columns: {', '.join(data.column_names)})"
            )
    if len(data) == 0:
        raise ValueError(f"--dataset_name '{name}' holds no rows; give it the subject's images")
    if len(data) > MAX_IMAGES:
        raise ValueError(
            f"--dataset_name '{name}' holds {len(data):,} rows, more than {MAX_IMAGES:,}; every image is held in "
            "memory while training: train on fewer (Dataset.select)"
        )
    feature = data.features[image_column]
    if not isinstance(feature, datasets.Image):
        raise ValueError(
            f"--image_column '{image_column}' holds {type(feature).__name__} values, not images; give the column the "
            "datasets Image feature (cast_column(column, datasets.Image()))"
        )
    prompts = [fallback_prompt] * len(data)
    if caption_column:
        prompts = _captions(data, caption_column, fallback_prompt, name)
    rows = data.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    images, bad, budget = [], [], _PixelBudget(f"--dataset_name '{name}'")
    for row, example in enumerate(rows):  # one row at a time: the encoded bytes are never all in memory
        try:
            images.append(budget.add(_row_image(example[image_column], row, image_column, feature), row + 1))
        except ImageReadError as err:
            bad.append(str(err))
    if bad:
        raise ValueError(
            f"{len(bad)} image(s) of --dataset_name '{name}' cannot be used: {'; '.join(bad[:5])}. Remove or replace "
            "them; nothing has been trained yet."
        )
    return images, prompts


#: --image_interpolation_mode: diffusers' names (torchvision's), as PIL filters
INTERPOLATION_MODES = ("bilinear", "bicubic", "box", "nearest", "nearest_exact", "hamming", "lanczos")
_RESAMPLE = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "nearest": Image.NEAREST,  # PIL's nearest already samples pixel centres, which is what nearest_exact fixes
    "nearest_exact": Image.NEAREST,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}


def _resize_and_crop(
    image: Image.Image, size: int, center_crop: bool, rng: np.random.Generator, resample=Image.BICUBIC
) -> tuple[Image.Image, int, int, int]:
    """Resize the short side to ``size`` and crop a square; returns the crop, its top-left corner (top, left) in the
    resized image, and the resized width."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), resample)
    if center_crop:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
    return image.crop((left, top, left + size, top + size)), top, left, width


def augmentations(image: Image.Image, size: int, center_crop: bool, random_flip: bool) -> int:
    """How many different training inputs (crop corner × flip) ``image`` can become."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    crops = 1 if center_crop else (width - size + 1) * (height - size + 1)
    return crops * (2 if random_flip else 1)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB image → (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images with their prompts, plus class images with theirs when prior preservation is on.

    ``instance_prompt`` is one prompt for every image or a list, one per image (captions). ``tokenizer`` may be a
    list (SDXL's two): a prompt's ids are ``input_ids``, ``input_ids_2``, ... in the batch (with ``attention_mask``,
    ``attention_mask_2``, ... when ``attention_mask``). ``repeats`` lists every instance image that many times per
    epoch. Each example also carries:

    - ``add_time_ids``: SDXL's size conditioning, (original height, original width, crop top, crop left, target
      height, target width), the crop corner measured in the image as it was flipped (as diffusers'
      ``train_dreambooth_lora_sdxl.py`` records it); tasks of other models ignore it;
    - ``latent_key``: (stream, image, crop top, crop left, flipped): which image and augmentation the pixels are, the
      key of the latent cache (stream 0: instance, 1: class);
    - ``prompt_index``: the prompt's place in ``prompts`` (the key of pre-computed text embeddings).

    Augmentation (random crop, flip) is a pure function of ``(seed, epoch, index)``, so a resumed run sees the
    same images as an uninterrupted one. Call ``set_epoch`` at the start of each epoch.
    """

    def __init__(
        self,
        instance_images,
        instance_prompt: str | list[str],
        tokenizer,
        size: int,
        center_crop: bool = False,
        random_flip: bool = False,
        class_images=None,
        class_prompt: str | None = None,
        seed: int = 0,
        *,
        repeats: int = 1,
        interpolation: str = "bicubic",
        max_length: int | None = None,
        attention_mask: bool = False,
    ):
        self.instance_images = list(instance_images)
        self.class_images = list(class_images or [])
        self.size, self.center_crop, self.random_flip, self.seed = size, center_crop, random_flip, seed
        self.repeats, self.resample = repeats, _RESAMPLE[interpolation]
        self.epoch = 0
        if len(self) > MAX_EPOCH_EXAMPLES:
            raise ValueError(
                f"--repeats {repeats} makes an epoch of {len(self):,} examples ({len(self.instance_images):,} images × "
                f"{repeats}), more than {MAX_EPOCH_EXAMPLES:,}: each epoch's order is one permutation held in memory; "
                "lower --repeats (--max_train_steps sets the length of a run)"
            )
        prompts = [instance_prompt] * len(self.instance_images) if isinstance(instance_prompt, str) else instance_prompt
        if len(prompts) != len(self.instance_images):
            raise ValueError(f"{len(prompts)} prompts for {len(self.instance_images)} instance images")
        if self.class_images:
            prompts = [*prompts, class_prompt]
        self.prompts = list(dict.fromkeys(prompts))  # distinct, in order of first use
        self.instance_prompt_index = [self.prompts.index(p) for p in prompts[: len(self.instance_images)]]
        self.class_prompt_index = self.prompts.index(class_prompt) if self.class_images else None
        tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
        self.tokens = [self._tokenize(tokenizers, p, max_length, attention_mask) for p in self.prompts]

    @staticmethod
    def _tokenize(tokenizers, prompt: str, max_length: int | None, attention_mask: bool) -> dict[str, torch.Tensor]:
        tokens = {}
        for i, tokenizer in enumerate(tokenizers):
            length = max_length or tokenizer.model_max_length
            if length > tokenizer.model_max_length:
                raise ValueError(
                    f"--tokenizer_max_length {length} is longer than the tokenizer's {tokenizer.model_max_length} "
                    "(the text encoder has no positions beyond it); give at most that"
                )
            encoded = tokenizer(prompt, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
            tokens[_ids_key(i)] = encoded.input_ids[0]
            if attention_mask:
                tokens[_ids_key(i).replace("input_ids", "attention_mask")] = encoded.attention_mask[0]
        return tokens

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.instance_images) * self.repeats, len(self.class_images))

    def _augment(self, image: Image.Image, index: int, stream: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(pixels, add_time_ids, flipped) of one image."""
        rng = np.random.default_rng([self.seed, self.epoch, index, stream])
        original = (image.height, image.width)
        image, top, left, width = _resize_and_crop(image, self.size, self.center_crop, rng, self.resample)
        flipped = bool(self.random_flip and rng.random() < 0.5)
        if flipped:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            left = width - self.size - left  # the same crop, measured in the flipped image
        return to_pixels(image), torch.tensor([*original, top, left, self.size, self.size]), flipped

    def _example(self, image: Image.Image, prompt_index: int, index: int, stream: int, image_index: int) -> dict:
        pixels, time_ids, flipped = self._augment(image, index, stream)
        key = torch.tensor([stream, image_index, int(time_ids[2]), int(time_ids[3]), int(flipped)])
        return {
            "pixel_values": pixels,
            "add_time_ids": time_ids,
            "latent_key": key,
            "prompt_index": torch.tensor(prompt_index),
            **self.tokens[prompt_index],
        }

    def __getitem__(self, index: int) -> dict:
        position = index % (len(self.instance_images) * self.repeats)
        image_index = position // self.repeats  # diffusers' --repeats: each image repeated in place
        instance = self.instance_images[image_index]
        example = {"instance": self._example(instance, self.instance_prompt_index[image_index], index, 0, image_index)}
        if self.class_images:
            class_index = index % len(self.class_images)
            image = self.class_images[class_index]
            example["class"] = self._example(image, self.class_prompt_index, index, 1, class_index)
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
