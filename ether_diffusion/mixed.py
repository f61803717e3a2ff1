"""Mixed batches: sample ``i`` of one forward pass goes through its own adapter (or the base model).

A wrapper in a mixed batch holds a ``MixedBatch`` (``EtherLayer.set_mixed_batch``): the adapter of each slot and
the slot of each sample. Each forward gathers the per-sample factors, zero-padded to a common rank so adapters with
different methods, block counts or sides mix freely, and runs one batched product per side::

    x (B, ..., d)  ->  x + (x D[slot_b]) E[slot_b]   for every sample b at once

Without autograd the gathered factors are kept while every slot's factors are the very same tensors (an adapter's
own cache returns the same tensors until a vector or strength changes), so the denoising steps of one mixed batch
gather once instead of once per step. torch only; ``layers.py`` imports this module, and the ``layer`` handed to
``MixedBatch.forward`` is that module's ``EtherLayer`` (its adapters, strengths and feature-layout helpers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from .reflection import apply_low_rank_batched

__all__ = ["GatheredFactors", "MixedBatch"]


class GatheredFactors(NamedTuple):
    """One side's per-sample factors, and what they were gathered from (for reuse across denoising steps)."""

    sources: tuple  # each slot's (D, E) factor tensors at gather time (None for no adapter), compared by identity
    repeat: int  # copies of the assignment in the batch (2 under classifier-free guidance)
    factors: tuple[torch.Tensor, torch.Tensor] | None  # (B, d, r), (B, r, d); None when no slot adapts the side


@dataclass
class MixedBatch:
    """Which adapter each sample of a wrapper's next forward passes uses."""

    slot_names: list[str | None]  # adapter per slot; None = the base model
    slot_ids: torch.Tensor  # (S,) slot index per sample, on the layer's device
    gathered: dict[str, GatheredFactors] = field(default_factory=dict)  # side -> last gather (no grad only)

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        samples = self.slot_ids.shape[0]
        if x.shape[0] % samples:
            raise ValueError(
                f"'{layer.layer_name}': batch of {x.shape[0]} does not match the mixed batch of {samples} adapter "
                "assignments (nor a multiple of it, as classifier-free guidance makes)"
            )
        # Classifier-free guidance concatenates [uncond, cond]: each half uses the same assignment.
        repeat = x.shape[0] // samples
        slots = [
            layer.ether_adapters[name].factors(layer.strengths[name], x.dtype) if name in layer.ether_adapters else None
            for name in self.slot_names
        ]
        h = x
        found = self._sample_factors(layer, "input", [None if f is None else f.input for f in slots], repeat)
        if found is not None:
            h = layer._features_back(apply_low_rank_batched(layer._features_last(h), *found))
        found = self._sample_factors(layer, "output", [None if f is None else f.output for f in slots], repeat)
        if found is None:
            return layer.base_layer(h)
        y = apply_low_rank_batched(layer._features_last(layer._product_without_bias(h)), *found)
        return layer._add_bias(layer._features_back(y))

    def _sample_factors(self, layer: nn.Module, side: str, factors: list, repeat: int):
        """Per-sample ``(D, E)`` (B, d, r), (B, r, d) from each slot's ``factors``, or ``None`` if all are empty."""
        sources = tuple(t for found in factors for t in (found or (None,)))
        cached = self.gathered.get(side)
        if (
            cached is not None
            and not torch.is_grad_enabled()
            and cached.repeat == repeat
            and len(cached.sources) == len(sources)
            and all(a is b for a, b in zip(cached.sources, sources))
        ):
            return cached.factors
        stacked = _stack_slots(layer, side, factors)
        ids = self.slot_ids.repeat(repeat)
        gathered = None if stacked is None else (stacked[0][ids], stacked[1][ids])
        if not torch.is_grad_enabled():
            self.gathered[side] = GatheredFactors(sources, repeat, gathered)
        return gathered


def _stack_slots(layer: nn.Module, side: str, factors: list):
    """Per-slot factors stacked as (S, d, r), (S, r, d), zero-padded to a common rank; ``None`` if all empty."""
    width = layer.in_features if side == "input" else layer.out_features
    device = layer.plain.weight.device
    present = [found for found in factors if found is not None]
    if not present:
        return None
    rank = max([found[0].shape[1] for found in present])  # a list, not max(generator, default=): dynamo traces it
    dtype = present[0][0].dtype
    down = torch.zeros(len(factors), width, rank, dtype=dtype, device=device)
    up = torch.zeros(len(factors), rank, width, dtype=dtype, device=device)
    for slot, found in enumerate(factors):
        if found is not None:
            down[slot, :, : found[0].shape[1]] = found[0]
            up[slot, : found[1].shape[0], :] = found[1]
    return down, up
