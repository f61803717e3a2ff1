"""A whole model's unit directions for a training forward, normalised in one batch.

Each adapted layer's transform is the identity plus rank-1 terms along unit directions ``ŵ = w / ‖w‖`` of its
vectors (``reflection.py``). Normalising them layer by layer costs every layer a norm, a clamp and a division in the
forward and their derivatives in the backward. ``DirectionPlan.prepare`` does that work for all layers of a model at
once: per block shape, one concatenation, norm, clamp, division and scaling by the terms' coefficients, then one split
that hands each layer its rows ``R`` (K·n, d) and ``C R`` (the rows times their coefficients)::

    vectors of every layer ──cat──► normalise ──► R, C R ──split──► layer 1: (R, C R) per side
                                                                     layer 2: …

The layer then runs ``y = T̃(T(x) Wᵀ) + b`` as a few plain products (``directed_linear``) whose backward autograd
runs without Python; the gradients of all layers meet again at the split and go back through one normalisation.
Per layer and training step that is fewer operations than PEFT's LoRA issues (``tests/test_directions.py`` counts).

A layer uses its directions only while they are current (``current``): the plan's generation (``touch`` is called by
every change of which adapters a layer runs: added, removed, activated, re-weighted, merged, enabled) and every
vector's version (an optimizer step, or any in-place write through the parameter, changes it) must be those they were
computed from. ``inject.install_directions`` prepares them from a forward pre-hook of the model, so every training
forward of the model starts from the vectors as they are. torch only; the layers are reached by duck typing
(``layers.py`` imports this module).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .reflection import _norm_floor, cast

__all__ = ["DirectionPlan", "Directions", "current", "directed_linear", "generation", "touch"]

_generations = itertools.count(1)
_generation = 0


def touch() -> None:
    """Record that some layer's adapters changed: every plan and every prepared direction is out of date."""
    global _generation
    _generation = next(_generations)


def generation() -> int:
    return _generation


class Directions(NamedTuple):
    """One layer's directions for one forward: ``(R, C R)`` per side (None where the side is not adapted)."""

    generation: int
    vectors: tuple[torch.Tensor, ...]  # the vectors they were computed from, and their versions then
    versions: tuple[int, ...]
    input: tuple[torch.Tensor, torch.Tensor] | None
    output: tuple[torch.Tensor, torch.Tensor] | None


def current(layer) -> Directions | None:
    """``layer``'s prepared directions (its ``_directions``) if they are current (see the module docstring), else
    None."""
    found = layer._directions
    if found is None or found.generation != _generation:
        return None
    for vector, version in zip(found.vectors, found.versions):
        if vector._version != version:
            return None
    return found


class _Entry(NamedTuple):
    layer: object
    vectors: tuple[torch.Tensor, ...]  # both sides' vectors, input side first
    sides: tuple[tuple[int, int] | None, tuple[int, int] | None]  # per side: (group index, rows) or None


class _Group(NamedTuple):
    vectors: list[torch.Tensor]  # every vector of the group, in row order
    n_blocks: int
    sizes: list[int]  # rows per (entry, side), in order
    coefficients: torch.Tensor  # (rows, 1): each row's coefficient


class DirectionPlan:
    """Which vectors of which layers are normalised together; built for a generation and a set of layers.

    ``layers`` are ``EtherLayer``s running exactly one active adapter, unmerged, on their plain layer (the training
    path of ``EtherLayer.forward``); their vectors are grouped by block shape, dtype and device.
    """

    def __init__(self, layers):
        self.generation = _generation
        groups: dict[tuple, tuple[list, list, list, int]] = {}
        pending = []
        for layer in layers:
            name = layer.active_adapters[0]
            adapter = layer.ether_adapters[name]
            terms = adapter.terms(layer.strengths[name])
            sides, vectors = [], []
            for found in terms:  # input, then output
                if found is None:
                    sides.append(None)
                    continue
                first = found.vectors[0]
                key = (tuple(first.shape), first.dtype, first.device)
                members, sizes, coefficients, _ = groups.setdefault(key, ([], [], [], first.shape[0]))
                rows = len(found.vectors) * first.shape[0]
                sides.append((key, len(sizes)))
                members.extend(found.vectors)
                sizes.append(rows)
                coefficients.extend(c for c in found.coefficients for _ in range(first.shape[0]))
                vectors.extend(found.vectors)
            pending.append((layer, tuple(vectors), sides))
        keys = list(groups)
        self.groups = []
        for members, sizes, coefficients, n in (groups[key] for key in keys):
            self.groups.append(_Group(members, n, sizes, _column(coefficients, members[0])))
        self.entries = [
            _Entry(layer, vectors, tuple(None if side is None else (keys.index(side[0]), side[1]) for side in sides))
            for layer, vectors, sides in pending
        ]

    def prepare(self) -> None:
        """Normalise every vector of the plan (one batch per group) and hand each layer its directions."""
        rows, scaled = [], []
        for group in self.groups:
            stacked = torch.cat(group.vectors) if len(group.vectors) > 1 else group.vectors[0]  # (rows, b)
            norms = torch.linalg.vector_norm(stacked, dim=-1, keepdim=True)
            units = stacked / norms.clamp_min(_norm_floor(stacked.dtype))
            if group.n_blocks > 1:  # row k·n + i holds block i's direction in the columns of block i (block_rows)
                n, b = group.n_blocks, units.shape[-1]
                eye = torch.eye(n, dtype=units.dtype, device=units.device)
                units = torch.einsum("rib,ij->rijb", units.view(-1, n, b), eye).reshape(-1, n * b)
            rows.append(units.split(group.sizes))
            scaled.append((units * group.coefficients).split(group.sizes))
        for entry in self.entries:
            pairs = [
                None if side is None else (rows[side[0]][side[1]], scaled[side[0]][side[1]]) for side in entry.sides
            ]
            versions = tuple(vector._version for vector in entry.vectors)
            # into the instance's dict directly: nn.Module.__setattr__ would look for parameters and buffers first
            entry.layer.__dict__["_directions"] = Directions(self.generation, entry.vectors, versions, *pairs)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a (len, 1) column on ``like``'s device, filled there run by run (equal neighbours at once): no
    copy from the host, which would make a GPU's host wait."""
    runs: list[list] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    parts = [torch.full((count, 1), value, dtype=like.dtype, device=like.device) for value, count in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def directed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, directions: Directions):
    """``y = T̃(T(x) Wᵀ) + b`` for ``x`` (..., in), ``weight`` (out, in) from prepared ``directions``, as plain
    products: ``T(x) = x + (x Rᵀ)(C R)``, ``T̃(z) = z + (z R̃ᵀ)(C̃ R̃)``, each a thin product and an ``addmm``.

    Autograd records ``x`` and the thin ``x Rᵀ`` (K·n columns), nothing the size of the weight; the rows are cast to
    ``x``'s dtype unless autocast casts them.
    """
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (N, in)
    autocast = torch.is_autocast_enabled(x.device.type)
    inner, outer = directions.input, directions.output
    if outer is not None and torch.is_grad_enabled():  # one node: autograd would keep T(x) Wᵀ for R̃'s gradient
        y = _two_sided(flat, weight, bias, inner, outer, autocast)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
    if inner is not None:
        rows, scaled = inner if autocast else (cast(inner[0], flat.dtype), cast(inner[1], flat.dtype))
        flat = torch.addmm(flat, F.linear(flat, rows), scaled)  # T(x)
    y = F.linear(flat, weight, bias if outer is None else None)  # (N, out)
    if outer is not None:
        rows, scaled = outer if autocast else (cast(outer[0], y.dtype), cast(outer[1], y.dtype))
        y = torch.addmm(y, F.linear(y, rows), scaled)  # T̃(z), before the bias
        if bias is not None:
            y = y + bias
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def _two_sided(x, weight, bias, inner, outer, autocast: bool) -> torch.Tensor:
    """``directed_linear`` of a layer with an output side, with autograd: ``_DirectedLinear`` in the dtype the products
    would run in (autocast's, else ``x``'s)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    sides = [None if side is None else (cast(side[0], dtype), cast(side[1], dtype)) for side in (inner, outer)]
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        return _DirectedLinear.apply(
            cast(x, dtype), cast(weight, dtype), None if bias is None else cast(bias, dtype),
            inner is not None, *(t for side in sides if side is not None for t in side),
        )  # fmt: skip


class _DirectedLinear(torch.autograd.Function):
    """``y = T̃(T(x) Wᵀ) + b`` with prepared rows: ``T(x) = x + P E`` (``P = x Rᵀ``), ``T̃(z) = z + Q Ẽ`` (``Q = z R̃ᵀ``),
    shapes (N, ·). Keeps ``x`` and the thin ``P``, ``Q``; ``z = T(x) Wᵀ`` (an activation the size of the output,
    which autograd would keep for ``R̃``'s gradient) only when it is no larger than ``W`` (few tokens). Backward from
    ``g = ∂L/∂y``::

        ∂L/∂Ẽ = Qᵀ g        S = g Ẽᵀ        ∂L/∂R̃ = Sᵀ z = (Sᵀ x + (Sᵀ P) E) Wᵀ        g_z = g + S R̃
        g_h = g_z W         ∂L/∂E = Pᵀ g_h    U = g_h Eᵀ     ∂L/∂R = Uᵀ x              ∂L/∂x = g_h + U R
    """

    @staticmethod
    def forward(ctx, x, weight, bias, has_inner, *rows):
        inner = rows[:2] if has_inner else None
        outer_rows, outer_scaled = rows[2:] if has_inner else rows
        p = None
        h = x
        if inner is not None:
            p = F.linear(x, inner[0])  # (N, r)
            h = torch.addmm(x, p, inner[1])
        z = F.linear(h, weight)
        q = F.linear(z, outer_rows)  # (N, r̃)
        keep = z if x.shape[0] <= x.shape[1] else None
        y = torch.addmm(z, q, outer_scaled) if keep is not None else z.addmm_(q, outer_scaled)
        if bias is not None:
            y.add_(bias)
        ctx.has_inner, ctx.has_bias = has_inner, bias is not None
        ctx.save_for_backward(x, weight, p, q, keep, *rows)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, p, q, z, *rows = ctx.saved_tensors
        inner = rows[:2] if ctx.has_inner else None
        outer_rows, outer_scaled = rows[2:] if ctx.has_inner else rows
        needs = ctx.needs_input_grad  # x, weight, bias, has_inner, *rows
        row_grads = []
        if inner is not None:
            row_grads = [None, None]
        s = g @ outer_scaled.T  # (N, r̃)
        outer_grads = [None, None]
        if any(needs[4:]):
            if z is None:  # Sᵀ z = (Sᵀ h) Wᵀ with Sᵀ h = Sᵀ x + (Sᵀ P) E
                s_h = s.T @ x
                if inner is not None:
                    s_h.addmm_(s.T @ p, inner[1])
                s_z = F.linear(s_h, weight)
            else:
                s_z = s.T @ z
            outer_grads = [s_z, q.T @ g]
        g_z = torch.addmm(g, s, outer_rows)
        g_h = g_z @ weight  # (N, in)
        grad_x = g_h
        if inner is not None:
            u = g_h @ inner[1].T  # (N, r)
            if any(needs[4:]):
                row_grads = [u.T @ x, p.T @ g_h]
            if needs[0]:
                grad_x = g_h.addmm_(u, inner[0])
        grad_weight = None
        if needs[1]:
            h = x if inner is None else torch.addmm(x, p, inner[1])
            grad_weight = g_z.T @ h
        grad_bias = g.sum(0) if ctx.has_bias and needs[2] else None
        return grad_x if needs[0] else None, grad_weight, grad_bias, None, *row_grads, *outer_grads
