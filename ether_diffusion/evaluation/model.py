"""The world evaluator: a small CNN that reads a 64x64 image of the tiny world.

    image (3, 64, 64)
      -> encoder: 64x64x32 -> 32x32x64 -> 16x16x128 -> 8x8x192
      -> slot heads: features pooled over each position's cell of the 8x8 map (4 quadrants + centre), one
         shared MLP (+ a learned slot embedding) predicts shape (or "none"), colour, texture, size per slot
      -> background head: global pool -> background colour
      -> embedding head: global pool -> 128-d vector trained to predict which shapes, colours and textures are
         present (position-free), L2-normalised: the "DINO" of the world
      -> segmentation head: U-Net decoder back to 64x64 -> per-pixel class (background + shapes)

Slots give attribute binding for two-object images without any ordering problem: positions are the world's
discrete cells, so "the object at top left" is a slot.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ether_diffusion.world.attributes import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    POSITIONS,
    SEGMENTATION_CLASSES,
    SHAPES,
    SIZE_NAMES,
    TEXTURES,
)

from ..assets import ASSETS_DIR, AssetError

# Cell of each position on the 8x8 feature map: (row0, row1, col0, col1), half-open.
SLOT_REGIONS = {
    "top left": (0, 4, 0, 4),
    "top right": (0, 4, 4, 8),
    "bottom left": (4, 8, 0, 4),
    "bottom right": (4, 8, 4, 8),
    "center": (2, 6, 2, 6),
}


@dataclass
class EvaluatorConfig:
    widths: tuple[int, ...] = (32, 64, 128, 192)
    embedding_dim: int = 128
    image_size: int = 64
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    colours: list[str] = field(default_factory=lambda: list(COLOUR_NAMES))
    textures: list[str] = field(default_factory=lambda: list(TEXTURES))
    sizes: list[str] = field(default_factory=lambda: list(SIZE_NAMES))
    positions: list[str] = field(default_factory=lambda: list(POSITIONS))
    backgrounds: list[str] = field(default_factory=lambda: list(BACKGROUND_NAMES))
    segmentation_classes: list[str] = field(default_factory=lambda: list(SEGMENTATION_CLASSES))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> EvaluatorConfig:
        data = json.loads(text)
        data["widths"] = tuple(data["widths"])
        return cls(**data)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


@dataclass
class EvaluatorOutput:
    shape_logits: torch.Tensor  # (B, slots, 1 + shapes): index 0 is "no object here"
    colour_logits: torch.Tensor  # (B, slots, colours)
    texture_logits: torch.Tensor  # (B, slots, textures)
    size_logits: torch.Tensor  # (B, slots, sizes)
    background_logits: torch.Tensor  # (B, backgrounds)
    presence_logits: torch.Tensor  # (B, shapes + colours + textures)
    embedding: torch.Tensor  # (B, embedding_dim), unit norm
    segmentation_logits: torch.Tensor  # (B, classes, H, W)


class WorldEvaluator(nn.Module):
    def __init__(self, config: EvaluatorConfig | None = None):
        super().__init__()
        self.config = config = config or EvaluatorConfig()
        w = config.widths
        self.encoders = nn.ModuleList(
            [_conv_block(3 if i == 0 else w[i - 1], w[i]) for i in range(len(w))]
        )  # resolutions 64, 32, 16, 8
        n_slots, hidden = len(config.positions), 256
        self.slot_embedding = nn.Parameter(torch.zeros(n_slots, 2 * w[-1]))
        self.slot_mlp = nn.Sequential(nn.Linear(2 * w[-1], hidden), nn.ReLU(inplace=True))
        self.shape_head = nn.Linear(hidden, 1 + len(config.shapes))
        self.colour_head = nn.Linear(hidden, len(config.colours))
        self.texture_head = nn.Linear(hidden, len(config.textures))
        self.size_head = nn.Linear(hidden, len(config.sizes))
        self.background_head = nn.Linear(2 * w[-1], len(config.backgrounds))
        self.embedding_head = nn.Sequential(
            nn.Linear(2 * w[-1], hidden), nn.ReLU(inplace=True), nn.Linear(hidden, config.embedding_dim)
        )
        self.presence_head = nn.Linear(
            config.embedding_dim, len(config.shapes) + len(config.colours) + len(config.textures)
        )
        self.decoders = nn.ModuleList(
            [_conv_block(w[i + 1] + w[i], w[i]) for i in reversed(range(len(w) - 1))]
        )  # 8->16, 16->32, 32->64
        self.segmentation_head = nn.Conv2d(w[0], len(config.segmentation_classes), 1)

    def forward(self, pixel_values: torch.Tensor) -> EvaluatorOutput:
        """``pixel_values``: (B, 3, 64, 64) in [-1, 1]."""
        feats = []
        x = pixel_values
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        top = feats[-1]  # (B, C, 8, 8)
        slots = []
        for name in self.config.positions:
            r0, r1, c0, c1 = SLOT_REGIONS[name]
            cell = top[:, :, r0:r1, c0:c1]
            slots.append(torch.cat([cell.mean(dim=(2, 3)), cell.amax(dim=(2, 3))], dim=1))
        slot_features = self.slot_mlp(torch.stack(slots, dim=1) + self.slot_embedding)  # (B, slots, hidden)
        pooled = torch.cat([top.mean(dim=(2, 3)), top.amax(dim=(2, 3))], dim=1)  # (B, 2C)
        raw_embedding = self.embedding_head(pooled)
        y = top
        for dec, skip in zip(self.decoders, reversed(feats[:-1])):
            y = dec(torch.cat([F.interpolate(y, scale_factor=2, mode="nearest"), skip], dim=1))
        return EvaluatorOutput(
            shape_logits=self.shape_head(slot_features),
            colour_logits=self.colour_head(slot_features),
            texture_logits=self.texture_head(slot_features),
            size_logits=self.size_head(slot_features),
            background_logits=self.background_head(pooled),
            presence_logits=self.presence_head(F.relu(raw_embedding)),
            embedding=F.normalize(raw_embedding, dim=-1),
            segmentation_logits=self.segmentation_head(y),
        )


# ------------------------------------------------------------------------------------------------ files
WEIGHTS_NAME = "evaluator.safetensors"
CONFIG_NAME = "config.json"
REGENERATE_HINT = "ether-diffusion world train-evaluator --output_dir assets/evaluator"


def default_evaluator_path() -> Path:
    return ASSETS_DIR / "evaluator"


def save_evaluator(model: WorldEvaluator, directory: str | Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Half precision halves the file; load_state_dict copies it back into float32 parameters.
    state = {
        k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in model.state_dict().items()
    }
    save_file(state, str(directory / WEIGHTS_NAME), metadata={k: str(v) for k, v in (metadata or {}).items()})
    (directory / CONFIG_NAME).write_text(model.config.to_json() + "\n")
    return directory


def load_evaluator(path: str | Path | None = None, device: str | torch.device = "cpu") -> WorldEvaluator:
    """Load the evaluator (default: ``assets/evaluator``) in eval mode. A missing or corrupt file raises
    ``AssetError`` naming the file and the command that regenerates it."""
    from safetensors.torch import load_file

    directory = Path(path) if path is not None else default_evaluator_path()
    weights, config_file = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    for f in (config_file, weights):
        if not f.is_file():
            raise AssetError(f"evaluator file {f} is missing; regenerate it with: {REGENERATE_HINT}")
    try:
        config = EvaluatorConfig.from_json(config_file.read_text())
    except (ValueError, TypeError, KeyError) as err:
        raise AssetError(
            f"evaluator config {config_file} is unreadable ({err}); regenerate it with: {REGENERATE_HINT}"
        ) from err
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise AssetError(
            f"evaluator weights {weights} are corrupt ({err}); regenerate them with: {REGENERATE_HINT}"
        ) from err
    model = WorldEvaluator(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise AssetError(
            f"evaluator weights {weights} do not match {config_file} ({err}); regenerate them with: {REGENERATE_HINT}"
        ) from err
    return model.to(device).eval()
