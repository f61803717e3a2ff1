"""The exact weight change of an ETHER wrapper as thin LoRA factors (the math behind ``export.py``).

Every transform here is the identity plus thin factors, ``H = I + D·E`` (``reflection.py``). For a layer with base
weight ``W`` (out, in), input-side transforms ``P = H_k ⋯ H_1`` and output-side transforms ``Q = H̃_k ⋯ H̃_1`` (the
adapters active on it, in order, at their strengths)::

    W' = Q · W · P
    W' - W = W·(P - I)  +  (Q - I)·W·P

    P - I = Σ_j D_j · A_j,     A_j = E_j · H_{j-1} ⋯ H_1        (telescoping the product; r_j rows each)
    Q - I = Σ_j D̃_j · Ã_j,     Ã_j = Ẽ_j · H̃_{j-1} ⋯ H̃_1

    up   (out, R) = [ W·D_1 … W·D_k | D̃_1 … D̃_k ]
    down (R, in)  = [ A_1 ; … ; A_k ; Ã_1·W·P ; … ; Ã_k·W·P ]

so ``W' = W + up · down`` exactly, with ``R = Σ r_j + Σ r̃_j``. Computed in float64 from the base weight. torch
only: no diffusers import here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import EtherLayer
from .reflection import apply_low_rank

__all__ = ["LoraFactors", "layer_lora_factors"]


@dataclass
class LoraFactors:
    """The exact weight change of one layer, ``ΔW = up · down``: ``down`` (r, in), ``up`` (out, r), float64."""

    down: torch.Tensor
    up: torch.Tensor
    conv: bool  # a 1×1 convolution: written as 4-D (r, in, 1, 1) / (out, r, 1, 1)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        return self.up @ self.down


def _plain_base(layer: EtherLayer) -> nn.Module:
    base = layer.base_layer
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        raise ValueError(
            f"'{layer.layer_name}' wraps a {type(base).__name__} (another adapter, e.g. a PEFT LoRA, sits under "
            "ETHER there); export from a pipeline that holds only ETHER adapters"
        )
    return base


def _chain(rows: torch.Tensor, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``rows · H_a · H_b ⋯`` for ``factors`` = [(D_a, E_a), (D_b, E_b), …] (row vectors times each transform)."""
    for down, up in factors:
        rows = apply_low_rank(rows, down, up)
    return rows


def _side_factors(layer: EtherLayer, names: list[str], side: str):
    """[(D_j, E_j)] in float64 for the active adapters that transform ``side``, in the order they act."""
    found = []
    for name in names:
        factors = getattr(layer.ether_adapters[name].factors(layer.strengths[name], torch.float64), side)
        if factors is not None:
            found.append(tuple(t.detach() for t in factors))
    return found


def _telescoped(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(D, A)`` with ``H_k ⋯ H_1 - I = D · A`` exactly: ``D = [D_1 … D_k]``, ``A_j = E_j · H_{j-1} ⋯ H_1``."""
    if not factors:
        return None
    rows = [_chain(up, list(reversed(factors[:j]))) for j, (_, up) in enumerate(factors)]
    return torch.cat([down for down, _ in factors], dim=1), torch.cat(rows, dim=0)


@torch.no_grad()
def layer_lora_factors(layer: EtherLayer) -> LoraFactors | None:
    """The exact LoRA of what ``layer`` computes now (its active, enabled adapters at their strengths).

    ``None`` when no adapter acts on the layer (none active, or adapters disabled). Raises when adapters are
    fused into the weight (the base weight is then gone: unfuse first).
    """
    if layer.merged_adapters:
        raise RuntimeError(
            f"'{layer.layer_name}' has {layer.merged_adapters} fused into its weight; unfuse_ether(pipe) before "
            "exporting (the LoRA is computed from the base weight)"
        )
    names = [n for n in layer.active_adapters if n in layer.ether_adapters] if layer.adapters_enabled else []
    if not names:
        return None
    base = _plain_base(layer)
    weight = base.weight.detach().to(torch.float64).reshape(layer.out_features, layer.in_features)  # W (out, in)
    input_side = _side_factors(layer, names, "input")
    output_side = _side_factors(layer, names, "output")
    ups, downs = [], []
    telescoped = _telescoped(input_side)
    if telescoped is not None:  # W·(P - I) = (W·D)·A
        ups.append(weight @ telescoped[0])
        downs.append(telescoped[1])
    telescoped = _telescoped(output_side)
    if telescoped is not None:  # (Q - I)·W·P = D̃·(Ã·W·P); rows times P apply H_k first
        ups.append(telescoped[0])
        downs.append(_chain(telescoped[1] @ weight, list(reversed(input_side))))
    if not ups:
        return None
    return LoraFactors(down=torch.cat(downs), up=torch.cat(ups, dim=1), conv=isinstance(base, nn.Conv2d))
