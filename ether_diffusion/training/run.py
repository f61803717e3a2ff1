"""``Run``: what the loop hands a task and its model backend, once it has set up accelerate."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Run"]


@dataclass
class Run:
    """The accelerator and the choices the loop made."""

    accelerator: object
    weight_dtype: torch.dtype
    noise_generator: torch.Generator
    prepared: dict[str, torch.nn.Module] = field(default_factory=dict)  # name -> module wrapped for data parallel

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def module(self, name: str, fallback: torch.nn.Module) -> torch.nn.Module:
        """The prepared (data-parallel) wrapper of ``name`` if it trains, else ``fallback`` itself."""
        return self.prepared.get(name, fallback)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32)
