"""Rendered datasets of the tiny world: bulk arrays for fast training and a torch Dataset for everything else.

Image ``i`` of a split is ``scene_for_seed(start + i, split)``: any machine renders the same pixels. Bulk
rendering spreads the work over processes; with one worker it renders in-process.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass

import numpy as np
import torch

from .render import render
from .scene import PRETRAIN_DROPOUT, CaptionDropout, Scene, caption, scene_for_seed
from .tokenizer import encode_world_caption


@dataclass
class RenderedArrays:
    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) uint8
    edges: np.ndarray  # (N, H, W) uint8
    scenes: list[Scene]


def _render_chunk(job: tuple[int, int, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    start, stop, split = job
    images, masks, edges, scenes = [], [], [], []
    for seed in range(start, stop):
        scene = scene_for_seed(seed, split)
        out = render(scene)
        images.append(out.image)
        masks.append(out.mask)
        edges.append(out.edges)
        scenes.append(scene.to_dict())
    return np.stack(images), np.stack(masks), np.stack(edges), scenes


def render_arrays(count: int, split: str = "pretrain", start: int = 0, workers: int = 1) -> RenderedArrays:
    """Render images ``start .. start + count - 1`` of ``split`` with their masks, edges and scenes."""
    chunk = max(1, min(2048, -(-count // max(workers, 1))))
    jobs = [(s, min(s + chunk, start + count), split) for s in range(start, start + count, chunk)]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(job) for job in jobs]
    return RenderedArrays(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
        [Scene.from_dict(d) for p in parts for d in p[3]],
    )


def caption_variants(
    scenes: list[Scene],
    vocab: dict[str, int],
    variants: int,
    seed: int,
    dropout: CaptionDropout = PRETRAIN_DROPOUT,
) -> np.ndarray:
    """(N, variants, max_length) int64 token ids: variant 0 is the full caption, the others drop words at
    random. Training picks a variant per step, so the model learns full and partial prompts alike."""
    out = []
    for index, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, index])
        texts = [caption(scene)] + [caption(scene, rng, dropout) for _ in range(variants - 1)]
        out.append([encode_world_caption(text, vocab) for text in texts])
    return np.asarray(out, dtype=np.int64)


def to_pixel_values(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8_images(pixel_values: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((pixel_values.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).numpy()


class WorldDataset(torch.utils.data.Dataset):
    """Rendered on demand: ``{"pixel_values", "caption", "mask", "edges", "scene"}`` for image ``start + i``.

    ``caption_dropout`` leaves words out at random (seeded by index and ``epoch``, so it is reproducible)."""

    def __init__(
        self,
        length: int,
        split: str = "pretrain",
        start: int = 0,
        caption_dropout: CaptionDropout | None = None,
        epoch: int = 0,
    ):
        self.length, self.split, self.start = length, split, start
        self.caption_dropout, self.epoch = caption_dropout, epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene = scene_for_seed(self.start + index, self.split)
        out = render(scene)
        rng = np.random.default_rng([self.start + index, self.epoch, 7]) if self.caption_dropout else None
        return {
            "pixel_values": to_pixel_values(out.image[None])[0],
            "caption": caption(scene, rng, self.caption_dropout),
            "mask": torch.from_numpy(out.mask.astype(np.int64)),
            "edges": torch.from_numpy(out.edges),
            "scene": scene.to_dict(),
        }
