"""The condition encoder of controllable synthesis and its attachment to a UNet.

A small conv net (OFT's and ETHER's setup: eight 3×3 convs with SiLU between, three stride-2 steps for SD's ×8
VAE, the last conv zero-initialised) maps the control image, in [0, 1], to the width and resolution of the UNet's
``conv_in`` output, where it is added. Nothing else in the UNet changes, so with a fresh encoder (zero output) and
identity adapters the model is exactly the base model.

The addition is a forward hook on ``conv_in``. The encoder runs once per control image, not once per denoising
step: ``set_condition(unet, residual)`` stores its output, and the hook adds it to every UNet call, repeated along
the batch when classifier-free guidance doubles it (the control reaches both branches).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

__all__ = [
    "ConditionEncoder",
    "ConditionEncoderConfig",
    "ConditionMismatchError",
    "attach_condition_encoder",
    "detach_condition_encoder",
    "set_condition",
]

PAPER_BLOCK_CHANNELS = (16, 32, 96, 256)  # SD-1.5: 3→16, 16→16, 16→32 s2, 32→32, 32→96 s2, 96→96, 96→256 s2, →320


class ConditionMismatchError(ValueError):
    """A condition encoder that does not fit this UNet / VAE."""


@dataclass
class ConditionEncoderConfig:
    embedding_channels: int = 320  # the UNet's conv_in output width (block_out_channels[0])
    conditioning_channels: int = 3
    block_channels: tuple[int, ...] = field(default=PAPER_BLOCK_CHANNELS)

    def __post_init__(self):
        self.block_channels = tuple(int(c) for c in self.block_channels)
        if not self.block_channels or min(self.block_channels) < 1:
            raise ValueError(f"block_channels must be positive widths, got {self.block_channels}")
        if self.embedding_channels < 1 or self.conditioning_channels < 1:
            raise ValueError("embedding_channels and conditioning_channels must be positive")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_channels) - 1)

    @classmethod
    def for_model(cls, unet, vae_scale_factor: int, conditioning_channels: int = 3) -> ConditionEncoderConfig:
        """The paper's layout, its strides matched to the VAE (one stride-2 step per halving)."""
        steps = int(round(math.log2(vae_scale_factor)))
        if 2**steps != vae_scale_factor:
            raise ConditionMismatchError(f"the VAE's scale factor {vae_scale_factor} is not a power of two")
        widths = PAPER_BLOCK_CHANNELS[: steps + 1] + (PAPER_BLOCK_CHANNELS[-1],) * max(0, steps + 1 - 4)
        return cls(unet.conv_in.out_channels, conditioning_channels, widths)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_channels"] = list(self.block_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ConditionEncoderConfig:
        unknown = set(d) - {"embedding_channels", "conditioning_channels", "block_channels"}
        if unknown:
            raise ValueError(f"unknown condition encoder settings {sorted(unknown)}")
        return cls(**d)


class ConditionEncoder(nn.Module):
    def __init__(self, config: ConditionEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or ConditionEncoderConfig()
        widths = config.block_channels
        self.conv_in = nn.Conv2d(config.conditioning_channels, widths[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.Conv2d(c_in, c_out, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(widths[-1], config.embedding_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # a fresh encoder adds nothing: training starts at the base model
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.conv_in(condition))
        for conv in self.blocks:
            x = nn.functional.silu(conv(x))
        return self.conv_out(x)

    def check_fits(self, unet, vae_scale_factor: int) -> None:
        """Raise ``ConditionMismatchError`` unless the output matches the UNet's conv_in width and resolution."""
        problems = []
        if self.config.embedding_channels != unet.conv_in.out_channels:
            problems.append(
                f"it outputs {self.config.embedding_channels} channels, the UNet's conv_in {unet.conv_in.out_channels}"
            )
        if self.config.downsample_factor != vae_scale_factor:
            problems.append(f"it downsamples ×{self.config.downsample_factor}, the VAE ×{vae_scale_factor}")
        if problems:
            raise ConditionMismatchError(
                "the condition encoder does not fit this model: "
                + "; ".join(problems)
                + ". Load it into the base model it was trained with."
            )


class _ConditionHook:
    def __init__(self, encoder: ConditionEncoder):
        self.encoder = encoder
        self.residual: torch.Tensor | None = None
        self.handle = None

    def __call__(self, module, inputs, output):
        residual = self.residual
        if residual is None:
            return output
        if residual.shape[0] != output.shape[0]:
            if output.shape[0] % residual.shape[0]:
                raise ValueError(
                    f"{residual.shape[0]} control images for a UNet batch of {output.shape[0]}: give one control "
                    "image, or one per prompt"
                )
            residual = residual.repeat(output.shape[0] // residual.shape[0], 1, 1, 1)  # CFG: [uncond; cond]
        if residual.shape[1:] != output.shape[1:]:
            raise ValueError(
                f"the control features have shape {tuple(residual.shape[1:])} but the UNet's conv_in gives "
                f"{tuple(output.shape[1:])}: the control image must have the generated image's size"
            )
        return output + residual.to(output.dtype)


def attach_condition_encoder(unet, encoder: ConditionEncoder) -> None:
    """Add ``encoder``'s output (set with ``set_condition``) to ``unet.conv_in``'s output from now on."""
    detach_condition_encoder(unet)
    hook = _ConditionHook(encoder)
    hook.handle = unet.conv_in.register_forward_hook(hook)
    unet._ether_condition = hook


def detach_condition_encoder(unet) -> ConditionEncoder | None:
    hook = getattr(unet, "_ether_condition", None)
    if hook is None:
        return None
    hook.handle.remove()
    del unet._ether_condition
    return hook.encoder


def attached_encoder(unet) -> ConditionEncoder | None:
    hook = getattr(unet, "_ether_condition", None)
    return None if hook is None else hook.encoder


def set_condition(unet, residual: torch.Tensor | None) -> None:
    """The encoder output to add on the next UNet calls (``None``: add nothing)."""
    hook = getattr(unet, "_ether_condition", None)
    if hook is None:
        raise RuntimeError("this UNet has no condition encoder attached; call attach_condition_encoder first")
    hook.residual = residual
