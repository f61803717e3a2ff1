"""Wrappers that hold an untouched base layer and apply ETHER transforms around it.

``EtherLinear`` wraps ``nn.Linear``; ``EtherConv2d`` wraps a 1×1 ``nn.Conv2d`` (SD 1.x ``proj_in``/``proj_out``).
A wrapper holds any number of named adapters (``ether_adapters``), applies the active ones in order, and can
merge them into the base weight and back. torch only: no diffusers import here.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import EtherConfig
from .reflection import METHODS, apply_low_rank, apply_low_rank_batched

__all__ = ["LAYER_TYPES", "EtherAdapter", "EtherConv2d", "EtherLayer", "EtherLinear", "parameter_name", "plain_layer"]


def parameter_name(vector: str, side: str) -> str:
    """Name of a learned vector: ``ether_u``/``ether_v`` on the input side, ``ether_u_out``/``ether_v_out``."""
    return f"ether_{vector}" if side == "input" else f"ether_{vector}_out"


def plain_layer(module: nn.Module) -> nn.Module:
    """The ``nn.Linear`` / ``nn.Conv2d`` under ``module``: itself, or found along ``.base_layer`` through other
    adapters' wrappers (a PEFT LoRA layer keeps its original layer there, as ours do)."""
    while not isinstance(module, (nn.Linear, nn.Conv2d)) and isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def layer_generator(seed: int, layer_name: str) -> torch.Generator:
    """A CPU generator for one layer's initial vectors: stable across runs (crc32, not Python's salted hash)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(layer_name.encode())) % (2**63))


class EtherAdapter(nn.Module):
    """The learned vectors of one named adapter on one layer: (n_blocks, width / n_blocks) per vector and side."""

    def __init__(
        self,
        config: EtherConfig,
        in_features: int,
        out_features: int,
        generator: torch.Generator | None,
        device=None,
        dtype=None,
    ):
        """``generator=None`` allocates the vectors without drawing them (their values are loaded next)."""
        super().__init__()
        self.method = METHODS[config.method]
        self.n_blocks = config.n_blocks
        self.sides = tuple(config.sides)
        self._cache: dict[str, tuple] = {}  # side -> (key, D, E), inference only
        widths = {"input": in_features, "output": out_features}
        for side in self.sides:
            shape = (self.n_blocks, widths[side] // self.n_blocks)
            if generator is None:
                vectors = {v: torch.empty(shape, device=device, dtype=dtype) for v in self.method.vector_names}
            else:
                vectors = self.method.init_vectors(*shape, generator)
            for vector, value in vectors.items():
                parameter = nn.Parameter(value.to(device=device, dtype=dtype))
                self.register_parameter(parameter_name(vector, side), parameter)

    def vectors(self, side: str) -> dict[str, torch.Tensor]:
        return {v: getattr(self, parameter_name(v, side)) for v in self.method.vector_names}

    def factors(self, side: str, strength: float, dtype: torch.dtype):
        """``(D, E)`` of this side's transform in ``dtype``, or ``None`` when the side is not adapted.

        Without autograd (sampling) the factors are cached until a vector changes (tracked by its version
        counter), so unfused inference pays only for the two skinny matmuls.
        """
        if side not in self.sides:
            return None
        vectors = self.vectors(side)
        if torch.is_grad_enabled():
            down, up = self.method.factors(vectors, strength)
            return down.to(dtype), up.to(dtype)
        key = (side, strength, dtype, *((id(v), v._version, v.device) for v in vectors.values()))
        cached = self._cache.get(side)
        if cached is None or cached[0] != key:
            down, up = self.method.factors(vectors, strength)
            cached = self._cache[side] = (key, down.to(dtype), up.to(dtype))
        return cached[1], cached[2]

    def extra_repr(self) -> str:
        return f"method={self.method.name}, n_blocks={self.n_blocks}, sides={self.sides}"


class EtherLayer(nn.Module):
    """Common machinery of the wrappers. Subclasses say how to reach features and the bias-free base product."""

    def __init__(self, base_layer: nn.Module, layer_name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        self.layer_name = layer_name
        self.ether_adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.strengths: dict[str, float] = {}
        self.adapters_enabled = True
        self.merged_adapters: list[str] = []
        self._weight_before_merge: torch.Tensor | None = None
        self._merge_delta: torch.Tensor | None = None  # what merge added, when another adapter sits inside
        # (slot names, per-sample slot index) while a mixed batch runs; see ``set_mixed_batch``.
        self._mixed: tuple[list[str | None], torch.Tensor] | None = None
        # side -> (the slots' factor tensors, repeat, gathered (B, d, r), (B, r, d)): reused across the denoising
        # steps of one mixed batch while the factors are the very same tensors (no grad, nothing changed)
        self._mixed_cache: dict[str, tuple] = {}

    @property
    def plain(self) -> nn.Module:
        """The plain ``nn.Linear`` / ``nn.Conv2d`` whose weight this wrapper transforms."""
        return plain_layer(self.base_layer)

    @property
    def stacked(self) -> bool:
        """True when another adapter's layer (a PEFT LoRA) sits between this wrapper and the plain layer: the
        transforms then act on what that layer computes, ``W + ΔW``."""
        return self.base_layer is not self.plain

    def get_base_layer(self) -> nn.Module:
        """Itself. diffusers' ``unload_lora_weights`` replaces every module that has a ``base_layer`` by its
        ``get_base_layer()`` (PEFT's convention); answering ``self`` keeps ETHER in place when LoRAs are removed."""
        return self

    # --- to be provided by subclasses -------------------------------------------------------------------------
    in_features: int
    out_features: int

    def _weight_matrix(self) -> torch.Tensor:
        """The base weight viewed as (out, in)."""
        raise NotImplementedError

    def _features_last(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _features_back(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _product_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _add_bias(self, y: torch.Tensor, sign: int = 1) -> torch.Tensor:
        raise NotImplementedError

    def _probe(self, dtype: torch.dtype) -> torch.Tensor:
        """The input that makes ``_product_without_bias`` return the effective weight (transposed)."""
        raise NotImplementedError

    def _effective_matrix(self) -> torch.Tensor:
        """(out, in) the linear map the base layer computes (with any adapter inside it), bias removed."""
        weight = self.plain.weight
        product = self._product_without_bias(self._probe(weight.dtype).to(weight.device))  # (in, out[, 1, 1])
        return product.reshape(self.in_features, self.out_features).T

    # --- adapters ---------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: EtherConfig, initialize: bool = True) -> EtherAdapter:
        if name in self.ether_adapters:
            raise ValueError(f"'{self.layer_name}' already has an adapter named {name!r}")
        weight = self.plain.weight
        adapter = EtherAdapter(
            config,
            self.in_features,
            self.out_features,
            layer_generator(config.init_seed, self.layer_name) if initialize else None,
            device=weight.device,
            dtype=weight.dtype,
        )
        self.ether_adapters[name] = adapter
        self.strengths[name] = 1.0
        return adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into '{self.layer_name}'; unmerge before deleting it")
        del self.ether_adapters[name]
        self.strengths.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str], strengths: list[float] | None = None) -> None:
        if self.merged_adapters:
            raise RuntimeError(f"'{self.layer_name}' has merged adapters {self.merged_adapters}; unmerge first")
        strengths = [1.0] * len(names) if strengths is None else list(strengths)
        self.active_adapters = [n for n in names if n in self.ether_adapters]
        for name, strength in zip(names, strengths):
            if name in self.ether_adapters:
                self.strengths[name] = float(strength)

    def set_mixed_batch(self, slot_names: list[str | None] | None, slot_ids: torch.Tensor | None = None) -> None:
        """Route sample i through adapter ``slot_names[slot_ids[i]]`` (``None`` = base model); ``None`` ends it."""
        if slot_names is None:
            self._mixed = None
            return
        if self.merged_adapters:
            raise RuntimeError(f"'{self.layer_name}' has merged adapters; unmerge before a mixed batch")
        self._mixed = (list(slot_names), slot_ids.to(self.plain.weight.device))
        self._mixed_cache = {}

    # --- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.adapters_enabled or self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        if self._mixed is not None:
            return self._forward_mixed(x)
        adapters = [(self.ether_adapters[n], self.strengths[n]) for n in self.active_adapters]
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        h = x
        for adapter, strength in adapters:  # y = W · H_k ⋯ H_1 x: the first active adapter acts first
            factors = adapter.factors("input", strength, x.dtype)
            if factors is not None:
                h = self._features_back(apply_low_rank(self._features_last(h), *factors))
        output_factors = [f for a, s in adapters if (f := a.factors("output", s, x.dtype)) is not None]
        if not output_factors:
            return self.base_layer(h, *args, **kwargs)
        y = self._features_last(self._product_without_bias(h))  # H̃ acts on W x, before the bias
        for factors in output_factors:
            y = apply_low_rank(y, *factors)
        return self._add_bias(self._features_back(y))

    def _sample_factors(self, side: str, slot_names: list[str | None], ids: torch.Tensor, dtype: torch.dtype):
        """Per-sample factors (B, d, r), (B, r, d) for the batch's slot ids; ``None`` if no slot adapts ``side``.

        Without grad, the stacked and gathered tensors are kept while every slot's factors are the same tensors
        (the adapters' own caches return them until a vector or strength changes), so the denoising steps of one
        mixed batch gather once instead of once per step."""
        factors = []
        for name in slot_names:
            adapter = self.ether_adapters[name] if name in self.ether_adapters else None
            factors.append(adapter.factors(side, self.strengths[name], dtype) if adapter is not None else None)
        flat = tuple(t for f in factors for t in (f or (None,)))
        cached = self._mixed_cache.get(side)
        if (
            cached is not None
            and not torch.is_grad_enabled()
            and len(cached[0]) == len(flat)
            and all(a is b for a, b in zip(cached[0], flat))
            and cached[1].shape == ids.shape
            and torch.equal(cached[1], ids)
        ):
            return cached[2]
        stacked = self._slot_factors(side, factors, dtype)
        result = None if stacked is None else (stacked[0][ids], stacked[1][ids])
        if not torch.is_grad_enabled():
            self._mixed_cache[side] = (flat, ids, result)
        return result

    def _slot_factors(self, side: str, factors: list, dtype: torch.dtype):
        """Stacked per-slot factors (S, d, r), (S, r, d), zero-padded to a common rank; ``None`` if all empty."""
        width = self.in_features if side == "input" else self.out_features
        weight = self.plain.weight
        rank = max((f[0].shape[1] for f in factors if f is not None), default=0)
        if rank == 0:
            return None
        down = torch.zeros(len(factors), width, rank, dtype=dtype, device=weight.device)
        up = torch.zeros(len(factors), rank, width, dtype=dtype, device=weight.device)
        for slot, found in enumerate(factors):
            if found is not None:
                down[slot, :, : found[0].shape[1]] = found[0]
                up[slot, : found[1].shape[0], :] = found[1]
        return down, up

    def _forward_mixed(self, x: torch.Tensor) -> torch.Tensor:
        slot_names, slot_ids = self._mixed
        if x.shape[0] % slot_ids.shape[0]:
            raise ValueError(
                f"'{self.layer_name}': batch of {x.shape[0]} does not match the mixed batch of "
                f"{slot_ids.shape[0]} adapter assignments (nor a multiple of it, as classifier-free guidance makes)"
            )
        # Classifier-free guidance concatenates [uncond, cond]: each half uses the same assignment.
        ids = slot_ids.repeat(x.shape[0] // slot_ids.shape[0])
        h = x
        found = self._sample_factors("input", slot_names, ids, x.dtype)
        if found is not None:
            h = self._features_back(apply_low_rank_batched(self._features_last(h), *found))
        found = self._sample_factors("output", slot_names, ids, x.dtype)
        if found is None:
            return self.base_layer(h)
        y = apply_low_rank_batched(self._features_last(self._product_without_bias(h)), *found)
        return self._add_bias(self._features_back(y))

    # --- merge ------------------------------------------------------------------------------------------------
    def _transform_matrix(self, matrix: torch.Tensor, names: list[str], inverse: bool) -> torch.Tensor:
        """Weight form of the active transforms: ``H̃_k⋯H̃_1 · W · H_k⋯H_1`` (or its inverse for self-inverse H)."""
        for name in names if inverse else reversed(names):  # rows of W·H_k⋯H_1 are H_1⋯H_k w_r
            factors = self.ether_adapters[name].factors("input", self.strengths[name], matrix.dtype)
            if factors is not None:
                matrix = apply_low_rank(matrix, *factors)
        for name in reversed(names) if inverse else names:  # columns of H̃_k⋯H̃_1·W are H̃_k⋯H̃_1 c
            factors = self.ether_adapters[name].factors("output", self.strengths[name], matrix.dtype)
            if factors is not None:
                matrix = apply_low_rank(matrix.T, *factors).T
        return matrix

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the adapters (default: the active ones) into the base weight. Merging the same set again is a no-op."""
        names = list(
            self.active_adapters if adapter_names is None else [n for n in adapter_names if n in self.ether_adapters]
        )
        if self.merged_adapters:
            if names == self.merged_adapters:
                return
            raise RuntimeError(
                f"'{self.layer_name}' already has {self.merged_adapters} merged; unmerge before merging {names}"
            )
        if not names:
            return
        weight = self.plain.weight
        if self.stacked:
            # Another adapter adds ΔW inside: add ETHER(W + ΔW) - (W + ΔW) to W, so that fusing or unfusing that
            # adapter (PEFT adds and subtracts ΔW in the same weight) commutes with this merge.
            effective = self._effective_matrix().float()
            merged = self._transform_matrix(effective, names, inverse=False) - effective
        else:
            merged = self._transform_matrix(self._weight_matrix().float(), names, inverse=False)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(
                f"merging {names} into '{self.layer_name}' gives non-finite weights (the adapter holds NaN or inf "
                "values); nothing was changed"
            )
        self.merged_adapters = names
        if self.stacked:
            self._merge_delta = merged.to(weight.dtype).view_as(weight)
            weight.add_(self._merge_delta)
            return
        exact_inverse = weight.dtype in (torch.float32, torch.float64) and all(
            self.ether_adapters[n].method.self_inverse and self.strengths[n] == 1.0 for n in names
        )
        # A reflection undoes itself; anything else (ETHER+, blended strengths, half precision) keeps a copy.
        self._weight_before_merge = None if exact_inverse else weight.detach().clone()
        weight.copy_(merged.to(weight.dtype).view_as(weight))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight as it was before ``merge``. A no-op when nothing is merged."""
        if not self.merged_adapters:
            return
        weight = self.plain.weight
        if self._merge_delta is not None:
            weight.sub_(self._merge_delta)
        elif self._weight_before_merge is not None:
            weight.copy_(self._weight_before_merge)
        else:
            restored = self._transform_matrix(self._weight_matrix().float(), self.merged_adapters, inverse=True)
            weight.copy_(restored.to(weight.dtype).view_as(weight))
        self._weight_before_merge = None
        self._merge_delta = None
        self.merged_adapters = []

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}, enabled={self.adapters_enabled}"


class EtherLinear(EtherLayer):
    """ETHER around an ``nn.Linear``: ``y = H̃ (W (H x)) + b``."""

    def __init__(self, base_layer: nn.Module, layer_name: str = ""):
        super().__init__(base_layer, layer_name)
        self.in_features = self.plain.in_features
        self.out_features = self.plain.out_features

    def _weight_matrix(self):
        return self.plain.weight

    def _product_without_bias(self, x):
        if self.stacked:  # the inner adapter's output, bias removed
            return self._add_bias(self.base_layer(x), sign=-1)
        return F.linear(x, self.base_layer.weight)

    def _add_bias(self, y, sign=1):
        bias = self.plain.bias
        return y if bias is None else y + sign * bias

    def _probe(self, dtype):
        return torch.eye(self.in_features, dtype=dtype)


class EtherConv2d(EtherLayer):
    """ETHER around a 1×1 ``nn.Conv2d`` (a per-pixel linear map over channels)."""

    def __init__(self, base_layer: nn.Module, layer_name: str = ""):
        conv = plain_layer(base_layer)
        pointwise = (
            conv.kernel_size == (1, 1)
            and conv.stride == (1, 1)
            and conv.groups == 1
            and conv.padding in ((0, 0), "valid")
            and conv.dilation == (1, 1)
        )
        if not pointwise:
            raise TypeError(
                f"'{layer_name}' is a {conv.kernel_size} convolution; ETHER adapts only 1×1 convolutions "
                "(stride 1, no padding, one group). Exclude it from target_modules."
            )
        super().__init__(base_layer, layer_name)
        self.in_features = conv.in_channels
        self.out_features = conv.out_channels

    def _weight_matrix(self):
        return self.plain.weight.view(self.out_features, self.in_features)

    def _features_last(self, x):
        return x.movedim(1, -1)

    def _features_back(self, x):
        return x.movedim(-1, 1)

    def _product_without_bias(self, x):
        if self.stacked:  # the inner adapter's output, bias removed
            return self._add_bias(self.base_layer(x), sign=-1)
        return F.conv2d(x, self.base_layer.weight)

    def _add_bias(self, y, sign=1):
        bias = self.plain.bias
        return y if bias is None else y + sign * bias.view(1, -1, *([1] * (y.dim() - 2)))

    def _probe(self, dtype):
        return torch.eye(self.in_features, dtype=dtype)[:, :, None, None]  # ``in`` one-pixel images


#: Base layer type → wrapper. Looked up along the type's MRO, so subclasses of ``nn.Linear`` are found too.
LAYER_TYPES: dict[type[nn.Module], type[EtherLayer]] = {nn.Linear: EtherLinear, nn.Conv2d: EtherConv2d}
