"""Training the world evaluator: targets from scenes, augmentations that make rendered images look generated,
the multi-task loss, and held-out accuracy per attribute."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ether_diffusion.world.attributes import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    POSITIONS,
    SHAPES,
    SIZE_NAMES,
    TEXTURES,
)
from ether_diffusion.world.scene import Scene

from .model import EvaluatorOutput, WorldEvaluator

IGNORE = -100


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Per-slot labels (shape 0 = empty; colour/texture/size IGNORE on empty slots), background, presence."""
    n, slots = len(scenes), len(POSITIONS)
    shape = torch.zeros(n, slots, dtype=torch.long)
    colour = torch.full((n, slots), IGNORE, dtype=torch.long)
    texture = torch.full((n, slots), IGNORE, dtype=torch.long)
    size = torch.full((n, slots), IGNORE, dtype=torch.long)
    background = torch.zeros(n, dtype=torch.long)
    presence = torch.zeros(n, len(SHAPES) + len(COLOUR_NAMES) + len(TEXTURES))
    for i, scene in enumerate(scenes):
        background[i] = BACKGROUND_NAMES.index(scene.background)
        for obj in scene.objects:
            s = POSITIONS.index(obj.position)
            shape[i, s] = 1 + SHAPES.index(obj.shape)
            colour[i, s] = COLOUR_NAMES.index(obj.colour)
            texture[i, s] = TEXTURES.index(obj.texture)
            size[i, s] = SIZE_NAMES.index(obj.size)
            presence[i, SHAPES.index(obj.shape)] = 1
            presence[i, len(SHAPES) + COLOUR_NAMES.index(obj.colour)] = 1
            presence[i, len(SHAPES) + len(COLOUR_NAMES) + TEXTURES.index(obj.texture)] = 1
    return {
        "shape": shape,
        "colour": colour,
        "texture": texture,
        "size": size,
        "background": background,
        "presence": presence,
    }


def _gaussian_kernels(sigmas: torch.Tensor, radius: int = 2) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, device=sigmas.device, dtype=torch.float32)
    k = torch.exp(-(x[None] ** 2) / (2 * sigmas[:, None].clamp(min=1e-3) ** 2))
    return k / k.sum(dim=1, keepdim=True)  # (B, 2r+1)


def augment(pixels: torch.Tensor, masks: torch.Tensor, generator: torch.Generator):
    """Degrade a batch like a generator would: shift by up to 2 px, colour jitter, blur, resampling, noise.

    ``pixels`` (B, 3, H, W) in [-1, 1]; ``masks`` (B, H, W) long (shifted along). Colour jitter is mild so
    that no colour turns into another."""
    b, _, h, w = pixels.shape
    dev = pixels.device

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*(shape or (b,)), device=dev, generator=generator)

    # Shift with edge replication; the mask follows.
    shifts = torch.randint(-2, 3, (2,), generator=generator, device=dev).tolist()
    pad = 2
    pixels = F.pad(pixels, (pad,) * 4, mode="replicate")[
        :, :, pad + shifts[0] : pad + shifts[0] + h, pad + shifts[1] : pad + shifts[1] + w
    ]
    masks = F.pad(masks[:, None].float(), (pad,) * 4, mode="replicate")[
        :, 0, pad + shifts[0] : pad + shifts[0] + h, pad + shifts[1] : pad + shifts[1] + w
    ].long()
    x = (pixels + 1) / 2
    x = x * u(0.85, 1.15)[:, None, None, None] * u(0.93, 1.07, b, 3)[:, :, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.85, 1.15)[:, None, None, None] + mean
    # Separable Gaussian blur, sigma in [0, 1.2] px per image.
    kernels = _gaussian_kernels(u(0.0, 1.2))  # (B, 5)
    x = x.reshape(1, b * 3, h, w)
    kx = kernels.repeat_interleave(3, dim=0)[:, None, None, :]
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), kx, groups=b * 3)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), kx.transpose(2, 3), groups=b * 3)
    x = x.reshape(b, 3, h, w)
    # Half the batch is down- and up-sampled (the softness of a VAE decoder).
    soft = torch.rand(b, device=dev, generator=generator) < 0.5
    resampled = F.interpolate(
        F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False),
        size=(h, w),
        mode="bilinear",
        align_corners=False,
    )
    x = torch.where(soft[:, None, None, None], resampled, x)
    x = x + torch.randn(x.shape, device=dev, generator=generator) * u(0.0, 0.06)[:, None, None, None]
    return x.clamp(0, 1) * 2 - 1, masks


def evaluator_loss(out: EvaluatorOutput, targets: dict[str, torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    def ce(logits, labels):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)

    return (
        ce(out.shape_logits, targets["shape"])
        + ce(out.colour_logits, targets["colour"])
        + ce(out.texture_logits, targets["texture"])
        + ce(out.size_logits, targets["size"])
        + F.cross_entropy(out.background_logits, targets["background"])
        + F.binary_cross_entropy_with_logits(out.presence_logits, targets["presence"])
        + F.cross_entropy(out.segmentation_logits, masks)
    )


@torch.no_grad()
def attribute_accuracy(
    model: WorldEvaluator,
    pixels: torch.Tensor,
    targets: dict[str, torch.Tensor],
    masks: torch.Tensor,
    batch_size: int = 512,
) -> dict[str, float]:
    """Accuracy per attribute on labelled images: shape per slot (empty included), position (each object's
    slot read as occupied), colour/texture/size on occupied slots, background per image, and segmentation
    pixel accuracy and mIoU."""
    model.eval()
    correct: dict[str, float] = {}
    counts: dict[str, float] = {}
    inter = torch.zeros(len(model.config.segmentation_classes))
    union = torch.zeros_like(inter)

    def add(name, hits, total):
        correct[name] = correct.get(name, 0.0) + float(hits)
        counts[name] = counts.get(name, 0.0) + float(total)

    device = next(model.parameters()).device
    for i in range(0, pixels.shape[0], batch_size):
        out = model(pixels[i : i + batch_size].to(device))
        t = {k: v[i : i + batch_size].to(device) for k, v in targets.items()}
        occupied = t["shape"] > 0
        pred_shape = out.shape_logits.argmax(-1)
        add("shape", (pred_shape == t["shape"]).sum(), t["shape"].numel())
        add("position", (pred_shape[occupied] > 0).sum(), occupied.sum())
        for name in ("colour", "texture", "size"):
            pred = getattr(out, f"{name}_logits").argmax(-1)
            add(name, (pred[occupied] == t[name][occupied]).sum(), occupied.sum())
        add("background", (out.background_logits.argmax(-1) == t["background"]).sum(), t["background"].numel())
        seg = out.segmentation_logits.argmax(1).cpu()
        m = masks[i : i + batch_size]
        add("segmentation_pixel", (seg == m).sum(), m.numel())
        for c in range(len(inter)):
            inter[c] += ((seg == c) & (m == c)).sum()
            union[c] += ((seg == c) | (m == c)).sum()
    result = {name: correct[name] / max(counts[name], 1) for name in correct}
    valid = union > 0
    result["segmentation_miou"] = float((inter[valid] / union[valid]).mean())
    return result


def cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    warm = min(1.0, (step + 1) / warmup)
    return base * warm * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


def arrays_to_tensors(images: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return pixels, torch.from_numpy(masks.astype(np.int64))
