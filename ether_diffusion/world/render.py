"""Render a scene to pixels, plus its segmentation mask (object classes) and its edge map.

Shapes are drawn at 4x resolution with PIL and box-filtered down (anti-aliased edges); textures are computed in
object-local pixel coordinates, so they move with the object. Everything is numpy uint8, HxW(xC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .attributes import BACKGROUNDS, COLOURS, SHAPES, SIZES
from .scene import IMAGE_SIZE, Scene, WorldObject

_SUPERSAMPLE = 4
_EDGE_THRESHOLD = 40  # max per-channel step between neighbours that counts as an edge


@dataclass(frozen=True)
class Rendering:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8: 0 background, 1 + SHAPES.index(shape) for object pixels
    edges: np.ndarray  # (H, W) uint8: 255 on edges, 0 elsewhere


def _shape_alpha(obj: WorldObject, size: int) -> np.ndarray:
    """Coverage in [0, 1] of the object's silhouette, (H, W) float32."""
    k = _SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, s = obj.cx * k, obj.cy * k, SIZES[obj.size] * k
    h = s / 2
    if obj.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif obj.shape == "square":
        q = h * 0.88
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=255)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h * 0.8), (cx + h, cy + h * 0.8)], fill=255)
    elif obj.shape == "star":
        points = []
        for i in range(10):
            radius = h if i % 2 == 0 else h * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + 0.08 * h + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    elif obj.shape == "cross":
        arm = h * 0.36
        draw.rectangle([cx - arm, cy - h, cx + arm, cy + h], fill=255)
        draw.rectangle([cx - h, cy - arm, cx + h, cy + arm], fill=255)
    elif obj.shape == "heart":
        r = s * 0.26
        for sign in (-1, 1):
            x0, y0 = cx + sign * s * 0.23, cy - s * 0.2
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=255)
        draw.polygon([(cx - s * 0.48, cy - s * 0.12), (cx + s * 0.48, cy - s * 0.12), (cx, cy + h)], fill=255)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _texture_pattern(obj: WorldObject, size: int) -> np.ndarray:
    """(H, W) bool: True where the texture's second tone goes."""
    ys, xs = np.mgrid[0:size, 0:size]
    half = SIZES[obj.size] / 2
    u = np.floor(xs - (obj.cx - half)).astype(np.int64)
    v = np.floor(ys - (obj.cy - half)).astype(np.int64)
    if obj.texture == "solid":
        return np.zeros((size, size), dtype=bool)
    if obj.texture == "striped":
        return (v // 3) % 2 == 1
    if obj.texture == "dotted":
        du, dv = (u % 7) - 3, (v % 7) - 3
        return du * du + dv * dv <= 2
    if obj.texture == "checkered":
        return ((u // 4) + (v // 4)) % 2 == 1
    raise ValueError(f"unknown texture {obj.texture!r}")


def second_tone(colour: str) -> np.ndarray:
    """The darker tone of a textured object (a mid gray for black objects)."""
    rgb = np.asarray(COLOURS[colour], dtype=np.float32)
    return np.full(3, 120.0, dtype=np.float32) if colour == "black" else rgb * 0.45


def render(scene: Scene, size: int = IMAGE_SIZE) -> Rendering:
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    mask = np.zeros((size, size), dtype=np.uint8)
    for obj in scene.objects:
        alpha = _shape_alpha(obj, size)[..., None]  # (H, W, 1)
        tone = np.where(
            _texture_pattern(obj, size)[..., None], second_tone(obj.colour), np.asarray(COLOURS[obj.colour])
        )
        image = image * (1.0 - alpha) + tone * alpha
        mask[alpha[..., 0] >= 0.5] = 1 + SHAPES.index(obj.shape)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Rendering(pixels, mask, edge_map(pixels))


def edge_map(image: np.ndarray) -> np.ndarray:
    """Edges of an (H, W, 3) uint8 image: 255 where a pixel differs from its right or lower neighbour by more
    than a threshold in some channel (Canny-like: colour boundaries and texture edges, one pixel wide)."""
    img = image.astype(np.int16)
    edges = np.zeros(image.shape[:2], dtype=bool)
    edges[:, :-1] |= np.abs(img[:, 1:] - img[:, :-1]).max(axis=-1) > _EDGE_THRESHOLD
    edges[:-1, :] |= np.abs(img[1:, :] - img[:-1, :]).max(axis=-1) > _EDGE_THRESHOLD
    return edges.astype(np.uint8) * 255
