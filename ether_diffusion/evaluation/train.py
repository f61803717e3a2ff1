"""Training the world evaluator: targets from scenes, augmentations that make rendered images look generated,
the multi-task loss, held-out accuracy per attribute, and the run that writes the shipped evaluator:

    ether-diffusion world train-evaluator --output_dir assets/evaluator
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ether_diffusion.world.attributes import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    POSITIONS,
    SHAPES,
    SIZE_NAMES,
    TEXTURES,
)
from ether_diffusion.world.dataset import render_arrays
from ether_diffusion.world.scene import Scene

from .model import EvaluatorConfig, EvaluatorOutput, WorldEvaluator, save_evaluator

IGNORE = -100
HELD_OUT_START = 10_000_000  # seeds of held-out images: never used for training


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


# ------------------------------------------------------------------------------------------------ the run
def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="assets/evaluator")
    p.add_argument("--num_images", type=int, default=20000, help="rendered training images (split 'all')")
    p.add_argument("--num_eval_images", type=int, default=2000, help="held-out rendered images")
    p.add_argument("--max_train_steps", type=int, default=3000)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--render_workers", type=int, default=1)
    p.add_argument(
        "--time_budget_minutes",
        type=float,
        default=None,
        help="stop training after this much wall time (learning rate decayed to it)",
    )
    args = p.parse_args(argv)
    if min(args.num_images, args.num_eval_images, args.max_train_steps, args.train_batch_size) < 1:
        p.error("--num_images, --num_eval_images, --max_train_steps and --train_batch_size must be >= 1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(args: argparse.Namespace) -> dict:
    """Train, measure held-out accuracy, write the evaluator with ``metrics.json`` and a README; returns the metrics."""
    started = time.time()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = WorldEvaluator(EvaluatorConfig()).to(device)
    steps_done = _train(model, args, device)
    train_seconds = time.time() - started

    held = render_arrays(args.num_eval_images, "all", start=HELD_OUT_START, workers=args.render_workers)
    held_pixels, held_masks = arrays_to_tensors(held.images, held.masks)
    held_targets = scene_targets(held.scenes)
    clean = attribute_accuracy(model, held_pixels, held_targets, held_masks)
    aug_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    aug_pixels, aug_masks = augment(held_pixels.to(device), held_masks.to(device), aug_gen)
    augmented = attribute_accuracy(model, aug_pixels, held_targets, aug_masks.cpu())
    info = {
        "held_out_clean": clean,
        "held_out_augmented": augmented,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_seconds": round(train_seconds),
        "train_steps": steps_done,
        "args": vars(args),
    }
    out = save_evaluator(model.cpu(), args.output_dir, metadata={"format": "ether-diffusion-world-evaluator/1"})
    (out / "metrics.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(readme(info))
    print(json.dumps(info, indent=2))
    return info


def _train(model: WorldEvaluator, args: argparse.Namespace, device: torch.device) -> int:
    """Train ``model`` on ``--num_images`` rendered images; returns the steps done (fewer if the budget ran out)."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    train = render_arrays(args.num_images, "all", start=0, workers=args.render_workers)
    images = torch.from_numpy(train.images).permute(0, 3, 1, 2).contiguous().to(device)  # uint8
    masks = torch.from_numpy(train.masks).long().to(device)
    targets = {k: v.to(device) for k, v in scene_targets(train.scenes).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    model.train()
    budget = args.time_budget_minutes * 60 if args.time_budget_minutes else None
    t0 = time.time()
    bar = tqdm(range(args.max_train_steps), desc="evaluator")
    for step in bar:
        elapsed = time.time() - t0
        if budget and elapsed > budget:
            tqdm.write(f"evaluator: time budget reached at step {step}")
            return step
        progress_step = max(step, int(args.max_train_steps * elapsed / budget)) if budget else step
        idx = torch.randint(0, images.shape[0], (args.train_batch_size,), device=device, generator=generator)
        pixels, batch_masks = augment(images[idx].float() / 127.5 - 1, masks[idx], generator)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(progress_step, args.max_train_steps, args.learning_rate)
        loss = evaluator_loss(model(pixels), {k: v[idx] for k, v in targets.items()}, batch_masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return args.max_train_steps


def readme(info: dict) -> str:
    """The evaluator's README: what it reads, the command that trained it, its held-out accuracy."""
    a = info["args"]
    rows = "\n".join(
        f"| {name} | {info['held_out_clean'][name]:.4f} | {info['held_out_augmented'][name]:.4f} |"
        for name in info["held_out_clean"]
    )
    return f"""# World evaluator

A small CNN (`ether_diffusion.evaluation.WorldEvaluator`, about 1.8M parameters, stored in half precision)
that reads 64x64 images of the tiny world: per position (top left, top right, bottom left, bottom right,
center) the shape (or empty), colour, texture and size of the object there; the background; a 128-d
unit-norm embedding (trained to predict which shapes, colours and textures are present); a per-pixel
segmentation (background + one class per shape).

Trained by

    ether-diffusion world train-evaluator --output_dir {a["output_dir"]} --num_images {a["num_images"]} \\
        --max_train_steps {a["max_train_steps"]} --train_batch_size {a["train_batch_size"]} \\
        --learning_rate {a["learning_rate"]} --seed {a["seed"]} --device {a["device"]} \\
        --time_budget_minutes {a["time_budget_minutes"]} --num_eval_images {a["num_eval_images"]}

on {info["device"]} in {info["train_seconds"]} s ({info["train_steps"]} steps), on rendered images
(all attribute combinations, subjects included) with augmentations: shift by up to 2 px,
brightness/contrast/per-channel gain jitter, Gaussian blur (sigma up to 1.2 px), 2x down-and-up resampling for
half the batch, Gaussian noise.

## Held-out accuracy

{a["num_eval_images"]} rendered images whose seeds were never used in training. Shape is scored per slot
(empty slots included), position as "each object's slot is read as occupied", colour/texture/size on occupied
slots, background per image; segmentation as pixel accuracy and mean IoU over classes.

| attribute | clean | augmented |
|---|---|---|
{rows}

Regenerate with the command above (deterministic up to GPU non-determinism).
"""
