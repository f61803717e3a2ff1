"""The field's metrics, measured with the world evaluator instead of CLIP, DINO, LPIPS and a segmenter.

| field              | here                                                                  |
|--------------------|-----------------------------------------------------------------------|
| CLIP-T             | ``prompt_fidelity``: fraction of a prompt's attributes read in the image |
| DINO / CLIP-I      | ``subject_fidelity``: mean cosine of embeddings, generated vs instances |
| LPIPS (diversity)  | ``diversity``: mean pairwise embedding distance among generated images  |
| segmenter + mIoU   | ``segment`` and ``miou``                                              |

Images may be PIL images, uint8 arrays (H, W, 3) or (N, H, W, 3), float arrays in [0, 1] (a pipeline's
``output_type="np"``) or tensors (N, 3, H, W) in [-1, 1]; other sizes are resized to 64x64.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ether_diffusion.world.scene import PromptAttributes, parse_prompt

from .model import WorldEvaluator, load_evaluator

ATTRIBUTES = ("shape", "colour", "texture", "size", "position", "background")


@lru_cache(maxsize=1)
def _default_evaluator() -> WorldEvaluator:
    return load_evaluator()


def _evaluator(evaluator: WorldEvaluator | None) -> WorldEvaluator:
    return evaluator if evaluator is not None else _default_evaluator()


def as_pixel_batch(images, size: int = 64) -> torch.Tensor:
    """Any supported image collection -> (N, 3, size, size) float32 in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        x = x[None] if x.ndim == 3 else x
    else:
        if not isinstance(images, np.ndarray):
            images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
        arr = images[None] if images.ndim == 3 else images
        arr = arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)
        x = torch.from_numpy(arr).permute(0, 3, 1, 2) * 2 - 1
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1, 1)


@dataclass(frozen=True)
class SlotReading:
    position: str
    shape: str
    colour: str
    texture: str
    size: str
    confidence: float  # probability that the slot holds an object


@dataclass(frozen=True)
class ImageReading:
    objects: tuple[SlotReading, ...]  # occupied slots only
    background: str


@torch.no_grad()
def read_images(images, evaluator: WorldEvaluator | None = None, batch_size: int = 256) -> list[ImageReading]:
    """What the evaluator sees in each image: the object at each occupied position, and the background."""
    model = _evaluator(evaluator)
    cfg = model.config
    device = next(model.parameters()).device
    pixels = as_pixel_batch(images, cfg.image_size)
    readings = []
    for i in range(0, pixels.shape[0], batch_size):
        out = model(pixels[i : i + batch_size].to(device))
        shape_prob = out.shape_logits.softmax(-1).cpu()
        colour, texture, size = (getattr(out, f"{n}_logits").argmax(-1).cpu() for n in ("colour", "texture", "size"))
        background = out.background_logits.argmax(-1).cpu()
        for b in range(shape_prob.shape[0]):
            objects = []
            for s, position in enumerate(cfg.positions):
                shape_index = int(shape_prob[b, s].argmax())
                if shape_index == 0:
                    continue
                objects.append(
                    SlotReading(
                        position,
                        cfg.shapes[shape_index - 1],
                        cfg.colours[colour[b, s]],
                        cfg.textures[texture[b, s]],
                        cfg.sizes[size[b, s]],
                        float(1 - shape_prob[b, s, 0]),
                    )
                )
            readings.append(ImageReading(tuple(objects), cfg.backgrounds[background[b]]))
    return readings


def score_reading(reading: ImageReading, prompt: PromptAttributes) -> dict[str, list[bool]]:
    """Per attribute, whether each attribute the prompt names was found.

    Each prompt object is matched to the unused occupied slot that agrees with it on most named attributes
    (position counts half, so a right object in the wrong place is still that object); its attributes are then
    scored against that slot. A prompt object with no slot left fails all its attributes."""
    found: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
    used: set[int] = set()
    for wanted in prompt.objects:
        named = {k: getattr(wanted, k) for k in ("shape", "colour", "texture", "size") if getattr(wanted, k)}

        def agreement(slot: SlotReading, named=named, wanted=wanted) -> float:
            hits = sum(getattr(slot, k) == v for k, v in named.items())
            return hits + 0.5 * (wanted.position is not None and slot.position == wanted.position)

        candidates = [i for i in range(len(reading.objects)) if i not in used]
        best = max(candidates, key=lambda i: agreement(reading.objects[i]), default=None)
        for key, value in named.items():
            found[key].append(best is not None and getattr(reading.objects[best], key) == value)
        if wanted.position is not None:
            found["position"].append(best is not None and reading.objects[best].position == wanted.position)
        if best is not None:
            used.add(best)
    if prompt.background is not None:
        found["background"].append(reading.background == prompt.background)
    return found


def prompt_fidelity(images, prompts, evaluator: WorldEvaluator | None = None) -> dict[str, float]:
    """Fraction of the prompts' attributes found in the images, per attribute and overall (our CLIP-T).

    ``prompts``: one caption (str) or ``PromptAttributes`` per image. Attributes a prompt does not name are
    not scored; an attribute no prompt names is absent from the result."""
    parsed = [parse_prompt(p) if isinstance(p, str) else p for p in prompts]
    readings = read_images(images, evaluator)
    if len(readings) != len(parsed):
        raise ValueError(f"{len(readings)} images but {len(parsed)} prompts")
    totals: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
    for reading, prompt in zip(readings, parsed):
        for key, hits in score_reading(reading, prompt).items():
            totals[key] += hits
    result = {key: float(np.mean(hits)) for key, hits in totals.items() if hits}
    every = [h for hits in totals.values() for h in hits]
    result["overall"] = float(np.mean(every)) if every else float("nan")
    return result


@torch.no_grad()
def embed(images, evaluator: WorldEvaluator | None = None, batch_size: int = 256) -> torch.Tensor:
    """(N, D) unit-norm embeddings."""
    model = _evaluator(evaluator)
    device = next(model.parameters()).device
    pixels = as_pixel_batch(images, model.config.image_size)
    return torch.cat(
        [model(pixels[i : i + batch_size].to(device)).embedding.cpu() for i in range(0, pixels.shape[0], batch_size)]
    )


def subject_fidelity(generated, instance_images, evaluator: WorldEvaluator | None = None) -> float:
    """Mean cosine similarity between every generated image and every instance image (our DINO / CLIP-I)."""
    a, b = embed(generated, evaluator), embed(instance_images, evaluator)
    return float((a @ b.T).mean())


def instance_self_similarity(instance_images, evaluator: WorldEvaluator | None = None) -> float:
    """Mean cosine similarity among the instance images themselves (pairs of distinct images): the ceiling a
    subject-driven model can reach on ``subject_fidelity``."""
    e = embed(instance_images, evaluator)
    n = e.shape[0]
    if n < 2:
        raise ValueError("need at least two instance images")
    sims = e @ e.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def diversity(images, evaluator: WorldEvaluator | None = None) -> float:
    """Mean pairwise embedding distance (1 - cosine) among images (our LPIPS diversity); 0 for identical."""
    e = embed(images, evaluator)
    n = e.shape[0]
    if n < 2:
        raise ValueError("need at least two images")
    sims = e @ e.T
    return float(1 - (sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def segment(images, evaluator: WorldEvaluator | None = None, batch_size: int = 256) -> np.ndarray:
    """(N, 64, 64) uint8 class ids (0 background, 1 + shape index), like the world's masks."""
    model = _evaluator(evaluator)
    device = next(model.parameters()).device
    pixels = as_pixel_batch(images, model.config.image_size)
    parts = [
        model(pixels[i : i + batch_size].to(device)).segmentation_logits.argmax(1).cpu()
        for i in range(0, pixels.shape[0], batch_size)
    ]
    return torch.cat(parts).numpy().astype(np.uint8)


def miou(pred_masks, true_masks, num_classes: int | None = None) -> float:
    """Mean intersection over union over the classes that occur in either mask set (background included)."""
    pred, true = np.asarray(pred_masks), np.asarray(true_masks)
    if pred.shape != true.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {true.shape}")
    num_classes = num_classes or int(max(pred.max(), true.max())) + 1
    ious = []
    for c in range(num_classes):
        p, t = pred == c, true == c
        union = np.logical_or(p, t).sum()
        if union:
            ious.append(np.logical_and(p, t).sum() / union)
    return float(np.mean(ious))
