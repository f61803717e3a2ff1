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
b×b or d×d matrix. The same function transforms activations (training, unfused inference) and weight rows
(merging), because ``W·H`` has rows ``H w_r`` for a symmetric ``H``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "METHODS",
    "Method",
    "Reflection",
    "ReflectionPlus",
    "apply_low_rank",
    "apply_low_rank_batched",
    "low_rank_factors",
    "unit_blocks",
]


def unit_blocks(vectors: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Normalise each block vector to unit length. ``vectors`` (..., n, b). A zero vector stays zero."""
    eps = max(eps, torch.finfo(vectors.dtype).tiny)  # 1e-12 is 0 in float16: 0/0 would be NaN
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(eps)


def low_rank_factors(directions: torch.Tensor, coefficients: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin factors ``D`` (d, K·n) and ``E`` (K·n, d) with ``T(x) = x + (x D) E``.

    ``directions`` (K, n, b) are unit vectors per block, ``coefficients`` the K scalars of the terms (Python floats:
    no host-to-device copy, so nothing synchronises a GPU). Column ``k·n + i`` of ``D`` holds ``ŵ_k,i`` in the rows
    of block i and zeros elsewhere; row ``k·n + i`` of ``E`` is that column times ``c_k``.
    """
    k, n, b = directions.shape
    if n == 1:
        down = directions.reshape(k, b).T  # one block: the directions are the columns
    else:
        block_mask = torch.eye(n, dtype=directions.dtype, device=directions.device)
        # D[i·b + j, k·n + m] = ŵ[k, i, j] · [i == m]
        down = torch.einsum("kij,im->ijkm", directions, block_mask).reshape(n * b, k * n)
    if k == 1:
        return down, down.T * coefficients[0]
    return down, torch.cat([down[:, i * n : (i + 1) * n].T * c for i, c in enumerate(coefficients)])


def apply_low_rank(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``x + (x D) E`` along the last dimension of ``x`` (..., d)."""
    flat = x.reshape(-1, x.shape[-1])  # (N, d)
    return torch.addmm(flat, flat @ down, up).reshape(x.shape)


def apply_low_rank_batched(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Per-sample factors: ``x`` (B, ..., d), ``down`` (B, d, r), ``up`` (B, r, d)."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, N, d)
    return torch.baddbmm(flat, torch.bmm(flat, down), up).reshape(x.shape)


class Method:
    """A variant of the transform: which vectors it learns, how they start, and its rank-1 terms."""

    name: str
    vector_names: tuple[str, ...]

    def init_vectors(self, n_blocks: int, block_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def terms(self, vectors: Mapping[str, torch.Tensor], strength: float) -> tuple[torch.Tensor, list[float]]:
        """Unit directions (K, n, b) and the K coefficients of the transform at ``strength``."""
        raise NotImplementedError

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

    def terms(self, vectors, strength):
        u_hat = unit_blocks(vectors["u"])
        return u_hat.unsqueeze(0), [-2.0 * strength]


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

    def terms(self, vectors, strength):
        return unit_blocks(torch.stack([vectors["u"], vectors["v"]])), [-float(strength), float(strength)]


METHODS: dict[str, Method] = {method.name: method for method in (Reflection(), ReflectionPlus())}
