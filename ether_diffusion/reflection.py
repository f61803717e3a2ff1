"""The math of ETHER and ETHER+: block Householder transforms, applied without dense matrices.

torch only: this module imports neither diffusers nor anything heavier.

Notation. ``nn.Linear`` keeps ``W`` as (out, in) and computes ``y = W x + b``. ETHER acts on the input side::

                 in = n·b                         n blocks of size b
            ┌─────┬─────┬─────┐           ┌─────┐
       out  │ W_1 │ W_2 │ W_3 │     ·     │ H_1 │                 H_i = I - 2 û_i û_iᵀ         (ETHER)
            └─────┴─────┴─────┘           │     ├─────┐           H_i = I - û_i û_iᵀ + v̂_i v̂_iᵀ  (ETHER+)
                                          └─────┤ H_2 │
                                                │     ├─────┐
          W' = W · diag(H_1 … H_n)              └─────┤ H_3 │
                                                      └─────┘

ETHER+ two-sided adds an output-side ``H̃`` (out × out): ``W' = H̃ · W · H`` with ``H̃`` applied to ``W x`` before
the bias is added.

Every transform used here is the identity plus a few rank-1 terms per block::

    T(x)_i = x_i + Σ_k c_k (ŵ_k,iᵀ x_i) ŵ_k,i        (block i, term k)

ETHER has one term (ŵ = û, c = -2s), ETHER+ two (û with c = -s, v̂ with c = +s), where ``s`` is the adapter's
strength (1 = the method as published). Collecting the terms of all blocks into two thin block-sparse matrices
``D`` (d, K·n) and ``E`` (K·n, d) gives ``T(x) = x + (x D) E``: two skinny matmuls, O(tokens · d · K·n), never a
b×b or d×d matrix. The same function transforms activations (unfused inference) and weight rows (merging), because
``W·H`` has rows ``H w_r`` for a symmetric ``H``.

A training forward of a whole model normalises its layers' directions in one batch (``directions.py``) and runs each
layer as plain products. Where no such batch was prepared (a layer called on its own, a compiled graph), the whole
adapted layer, ``y = T̃(T(x) Wᵀ) + b``, runs as one autograd node (``reflected_linear``): with ``R`` (K·n, d) the unit
directions placed in their blocks and ``C`` the coefficients, ``T(x) = x + (x Rᵀ C) R`` and the backward is written
out (``_ReflectedLinear``), so a layer costs a handful of kernels and keeps no activation but its input, whatever the
number of sides and terms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "METHODS",
    "Method",
    "Reflection",
    "ReflectionPlus",
    "Terms",
    "apply_low_rank",
    "apply_low_rank_batched",
    "cast",
    "low_rank_factors",
    "reflected_linear",
    "unit_blocks",
]


def _norm_floor(dtype: torch.dtype, eps: float = 1e-12) -> float:
    return max(eps, torch.finfo(dtype).tiny)  # 1e-12 is 0 in float16: 0/0 would be NaN


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``; no call at all when it already is (this runs per tensor and layer in every step)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def unit_blocks(vectors: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Normalise each block vector to unit length. ``vectors`` (..., n, b). A zero vector stays zero."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(_norm_floor(vectors.dtype, eps))


def block_rows(directions: torch.Tensor) -> torch.Tensor:
    """``R`` (K·n, n·b): row ``k·n + i`` holds ``directions[k, i]`` (K, n, b) in the columns of block i, zeros
    elsewhere."""
    k, n, b = directions.shape
    if n == 1:
        return directions.reshape(k, b)
    block_mask = torch.eye(n, dtype=directions.dtype, device=directions.device)
    # R[k·n + m, i·b + j] = ŵ[k, i, j] · [i == m]
    return torch.einsum("kij,im->kmij", directions, block_mask).reshape(k * n, n * b)


def low_rank_factors(directions: torch.Tensor, coefficients: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin factors ``D`` (d, K·n) and ``E`` (K·n, d) with ``T(x) = x + (x D) E``.

    ``directions`` (K, n, b) are unit vectors per block, ``coefficients`` the K scalars of the terms (Python floats:
    no host-to-device copy, so nothing synchronises a GPU). ``D = Rᵀ`` (``block_rows``: column ``k·n + i`` holds
    ``ŵ_k,i`` in the rows of block i), ``E = C R``: row ``k·n + i`` of ``E`` is that column times ``c_k``. ``D`` is a
    transposed view: ``x @ D`` then runs as the fast ``x @ Rᵀ`` (a row-major (d, r) operand is several times slower on
    CPUs).
    """
    n = directions.shape[1]
    rows = block_rows(directions)  # (K·n, d)
    if len(coefficients) == 1:
        return rows.T, rows * coefficients[0]
    return rows.T, torch.cat([rows[i * n : (i + 1) * n] * c for i, c in enumerate(coefficients)])


def apply_low_rank(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``x + (x D) E`` along the last dimension of ``x`` (..., d)."""
    flat = x.reshape(-1, x.shape[-1])  # (N, d)
    return torch.addmm(flat, flat @ down, up).reshape(x.shape)


def apply_low_rank_batched(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Per-sample factors: ``x`` (B, ..., d), ``down`` (B, d, r), ``up`` (B, r, d)."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, N, d)
    return torch.baddbmm(flat, torch.bmm(flat, down), up).reshape(x.shape)


class Terms(NamedTuple):
    """One side's transform ``T(x) = x + Σ_k c_k (x·ŵ_k) ŵ_k``: the learned vectors ``w_k`` (n, b) as stored, and the
    coefficients ``c_k`` (Python floats) of their rank-1 terms. ``ŵ`` = ``w`` normalised per block."""

    vectors: tuple[torch.Tensor, ...]
    coefficients: tuple[float, ...]


def reflected_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    input_terms: Terms | None,
    output_terms: Terms | None,
) -> torch.Tensor:
    """``y = T̃(T(x) Wᵀ) + b`` for ``x`` (..., in), ``weight`` (out, in): a linear layer with ETHER transforms on its
    input side (``T``) and output side (``T̃``, acting before the bias), as one autograd node.

    Equal to ``apply_low_rank`` around ``F.linear`` (tested), with fewer kernels and less memory: the vectors are
    normalised, placed in their blocks and applied without autograd recording each step, and the backward needs only
    ``x`` (see ``_ReflectedLinear``). ``x``, ``weight`` and ``bias`` share one dtype; the vectors may be wider (fp32
    vectors on a bf16 model): the products run in ``x``'s dtype, the normalisation in the vectors'.
    """
    sides = (input_terms, output_terms)
    vectors = [v for terms in sides if terms is not None for v in terms.vectors]
    coefficients = tuple(None if terms is None else tuple(terms.coefficients) for terms in sides)
    # keeping W·T(x) for the backward only pays when the vectors will get gradients (not when sampling)
    keep = torch.is_grad_enabled() and any(v.requires_grad for v in vectors)
    y = _ReflectedLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, (*coefficients, keep), *vectors)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class _Side(NamedTuple):
    """One side's transform, ready to apply: ``T(z) = z + (z Eᵀ) R`` with ``E = C R``."""

    units: torch.Tensor  # (K, n, b) unit directions, in the vectors' dtype
    norms: torch.Tensor  # (K, n, 1) the vectors' norms before clamping
    rows: torch.Tensor  # R (K·n, d) in the compute dtype
    scaled: torch.Tensor  # E = C R: row k·n + i of R times c_k

    @classmethod
    def build(cls, vectors: Sequence[torch.Tensor], coefficients: Sequence[float], dtype: torch.dtype) -> _Side:
        stacked = vectors[0].unsqueeze(0) if len(vectors) == 1 else torch.stack(vectors)  # (K, n, b)
        norms = torch.linalg.vector_norm(stacked, dim=-1, keepdim=True)
        units = stacked / norms.clamp_min(_norm_floor(stacked.dtype))
        rows = cast(block_rows(units), dtype)
        n = units.shape[1]
        if len(coefficients) == 1:
            return cls(units, norms, rows, rows * coefficients[0])
        return cls(units, norms, rows, torch.cat([rows[k * n : (k + 1) * n] * c for k, c in enumerate(coefficients)]))

    def vector_grads(self, rows_grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Gradients of the stored vectors from the gradient ``∂L/∂R`` (where ``E = C R`` is counted in): keep each
        row's own block, then go back through ``ŵ = w / max(‖w‖, eps)``:
        ``g_w = (g_ŵ - [‖w‖ ≥ eps] ŵ (ŵ·g_ŵ)) / max(‖w‖, eps)``."""
        k, n, b = self.units.shape
        grad = cast(rows_grad, self.units.dtype).view(k, n, n, b).diagonal(dim1=1, dim2=2).transpose(1, 2)  # (K, n, b)
        floor = _norm_floor(self.units.dtype)
        radial = (self.units * grad).sum(-1, keepdim=True) * (self.norms >= floor)
        return ((grad - self.units * radial) / self.norms.clamp_min(floor)).unbind(0)


class _ReflectedLinear(torch.autograd.Function):
    """``y = T̃(T(x) Wᵀ) + b`` with ``T(x) = x + (x Eᵀ) R``, ``T̃(z) = z + (z Ẽᵀ) R̃`` (``E = C R``); shapes (N, ·).

    Forward, with the thin ``P = x Eᵀ`` (N, r) and ``Q = z Ẽᵀ`` (N, r̃) kept::

        h = x + P R            z = h Wᵀ            y = z + Q R̃ + b

    Backward from ``g = ∂L/∂y``. ``I + Rᵀ C R`` is symmetric, so the gradients are the forward's products read the
    other way (``∂L/∂R`` counts R and E = C R)::

        S = g Ẽᵀ               ∂L/∂R̃ = Qᵀ g + Sᵀ z
        g_z = g + S R̃          g_h = g_z W
        U = g_h Eᵀ             ∂L/∂R = Pᵀ g_h + Uᵀ x,      ∂L/∂x = g_h + U R

    ``Sᵀ z`` reads ``z`` when it is no larger than ``W`` (few tokens: N ≤ in), and is ``(Sᵀ x + (Sᵀ P) R) Wᵀ``
    otherwise, so that many tokens keep no activation but ``x``. Every product is thin (r ≪ d) but those with ``W``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, plan, *vectors):
        # x (N, in), weight (out, in), bias (out,) or None; vectors: the input side's, then the output side's;
        # plan: both sides' coefficients (or None) and whether to keep z for the vectors' gradients
        inner_terms, outer_terms, keep = plan
        split = len(inner_terms or ())
        inner = outer = p = q = z = None
        h = x
        if inner_terms is not None:
            inner = _Side.build(vectors[:split], inner_terms, x.dtype)
            p = x @ inner.scaled.T  # (N, r)
            h = torch.addmm(x, p, inner.rows)  # T(x)
        if outer_terms is None:
            y = F.linear(h, weight, bias)
        else:
            outer = _Side.build(vectors[split:], outer_terms, x.dtype)
            y = F.linear(h, weight)
            q = y @ outer.scaled.T  # (N, r̃)
            if keep and x.shape[0] <= x.shape[1]:
                z = y.clone()
            y.addmm_(q, outer.rows)  # T̃(z), before the bias
            if bias is not None:
                y.add_(bias)
        ctx.coefficients = (inner_terms, outer_terms)
        ctx.save_for_backward(x, weight, p, q, z, *(inner or (None,) * 4), *(outer or (None,) * 4))
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, p, q, z, *sides = ctx.saved_tensors
        inner_terms, outer_terms = ctx.coefficients
        inner = None if inner_terms is None else _Side(*sides[:4])
        outer = None if outer_terms is None else _Side(*sides[4:])
        needs = ctx.needs_input_grad  # x, weight, bias, plan, *vectors
        vectors = any(needs[4:])
        grad_x = grad_weight = grad_bias = None
        inner_grads = (None,) * len(inner_terms or ())
        outer_grads = (None,) * len(outer_terms or ())
        g_z = g
        if outer is not None:
            s = g @ outer.scaled.T  # (N, r̃)
            if vectors:
                if z is None:  # Sᵀ z = (Sᵀ h) Wᵀ, Sᵀ h = Sᵀ x + (Sᵀ P) R
                    s_h = s.T @ x
                    if inner is not None:
                        s_h.addmm_(s.T @ p, inner.rows)
                    s_z = F.linear(s_h, weight)
                else:
                    s_z = s.T @ z
                outer_grads = outer.vector_grads(s_z.addmm_(q.T, g))  # Sᵀ z + Qᵀ g
            g_z = torch.addmm(g, s, outer.rows)
        h = x
        if inner is not None:
            if needs[1]:
                h = torch.addmm(x, p, inner.rows)
            g_h = g_z @ weight  # (N, in)
            u = g_h @ inner.scaled.T  # (N, r)
            if vectors:
                inner_grads = inner.vector_grads(torch.addmm(p.T @ g_h, u.T, x))  # Pᵀ g_h + Uᵀ x
            if needs[0]:
                grad_x = g_h.addmm_(u, inner.rows)
        elif needs[0]:
            grad_x = g_z @ weight
        if needs[1]:
            grad_weight = g_z.T @ h
        if needs[2]:
            grad_bias = g.sum(0)
        return grad_x, grad_weight, grad_bias, None, *inner_grads, *outer_grads


class Method:
    """A variant of the transform: which vectors it learns, how they start, and its rank-1 terms."""

    name: str
    vector_names: tuple[str, ...]

    def init_vectors(self, n_blocks: int, block_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def rank_one_terms(self, vectors: Mapping[str, torch.Tensor], strength: float) -> Terms:
        """The vectors of the K rank-1 terms (as stored, not yet normalised) and their coefficients at ``strength``."""
        raise NotImplementedError

    def terms(self, vectors: Mapping[str, torch.Tensor], strength: float) -> tuple[torch.Tensor, list[float]]:
        """Unit directions (K, n, b) and the K coefficients of the transform at ``strength``."""
        found = self.rank_one_terms(vectors, strength)
        stacked = found.vectors[0].unsqueeze(0) if len(found.vectors) == 1 else torch.stack(found.vectors)
        return unit_blocks(stacked), list(found.coefficients)

    def factors(self, vectors: Mapping[str, torch.Tensor], strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        return low_rank_factors(*self.terms(vectors, strength))


def _uniform_blocks(n_blocks: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    # Kaiming-uniform with fan_in = block size, the convention of PEFT's orthogonal adapters.
    bound = block_size**-0.5
    return (torch.rand(n_blocks, block_size, generator=generator) * 2 - 1) * bound


class Reflection(Method):
    """ETHER: ``H = I - 2 û ûᵀ`` per block. Orthogonal, symmetric, ``H·H = I``, never the identity.

    Strength ``s`` gives ``H(s) = I - 2s û ûᵀ = (1 - s)·I + s·H``: the layer output is interpolated linearly between
    the base model (s = 0) and the reflected one (s = 1). A reflection has no path of orthogonal matrices to the
    identity (det H = -1), so intermediate strengths are not orthogonal: at s = 0.5 the transform projects out û
    and is singular. Use s in {0, 1} for the method as published; other values are a blend.
    """

    name = "ether"
    vector_names = ("u",)

    def init_vectors(self, n_blocks, block_size, generator):
        return {"u": _uniform_blocks(n_blocks, block_size, generator)}

    def rank_one_terms(self, vectors, strength):
        return Terms((vectors["u"],), (-2.0 * strength,))


class ReflectionPlus(Method):
    """ETHER+: ``H+ = I - û ûᵀ + v̂ v̂ᵀ`` per block; the identity at init (``v = -u``).

    Eigenvalues ``1 ± |sin θ|`` (cos θ = û·v̂), so ``H+`` is singular only when û ⊥ v̂ and cannot be undone by
    re-applying it. Strength ``s`` gives ``H+(s) = I - s(û ûᵀ - v̂ v̂ᵀ)`` with eigenvalues ``1 ± s|sin θ|``: a
    smooth path from the identity (s = 0) to ``H+`` (s = 1) that stays non-singular for every s < 1.
    """

    name = "ether_plus"
    vector_names = ("u", "v")

    def init_vectors(self, n_blocks, block_size, generator):
        u = _uniform_blocks(n_blocks, block_size, generator)
        return {"u": u, "v": -u.clone()}

    def rank_one_terms(self, vectors, strength):
        return Terms((vectors["u"], vectors["v"]), (-float(strength), float(strength)))


METHODS: dict[str, Method] = {method.name: method for method in (Reflection(), ReflectionPlus())}
