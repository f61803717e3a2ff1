"""Wrappers that hold an untouched base layer and apply ETHER transforms around it.

``EtherLinear`` wraps ``nn.Linear``; ``EtherConv2d`` wraps a 1×1 ``nn.Conv2d`` (SD 1.x ``proj_in``/``proj_out``).
A wrapper holds any number of named adapters (``ether_adapters``), applies the active ones in order, and can
merge them into the base weight and back. torch only: no diffusers import here.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import directions
from .config import EtherConfig
from .mixed import MixedBatch
from .reflection import METHODS, Terms, apply_low_rank, cast, reflected_linear

__all__ = [
    "LAYER_TYPES",
    "EtherAdapter",
    "EtherConv2d",
    "EtherLayer",
    "EtherLinear",
    "Factors",
    "SideTerms",
    "parameter_name",
    "plain_layer",
]


def parameter_name(vector: str, side: str) -> str:
    """Name of a learned vector: ``ether_u``/``ether_v`` on the input side, ``ether_u_out``/``ether_v_out``."""
    return f"ether_{vector}" if side == "input" else f"ether_{vector}_out"


def plain_layer(module: nn.Module) -> nn.Module:
    """The ``nn.Linear`` / ``nn.Conv2d`` under ``module``: itself, or found along ``.base_layer`` through other
    adapters' wrappers (a PEFT LoRA layer keeps its original layer there, as ours do)."""
    while not isinstance(module, (nn.Linear, nn.Conv2d)) and isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is held by a quantisation tensor subclass (torchao's int8, NF4 or float8 weights: see
    ``quantize.py``). Such a weight computes through ``F.linear`` only: the layer then applies its transforms to the
    activations around the base layer, and cannot merge or keep a merged copy."""
    return type(weight) not in (torch.Tensor, nn.Parameter)


def layer_generator(seed: int, layer_name: str) -> torch.Generator:
    """A CPU generator for one layer's initial vectors: stable across runs (crc32, not Python's salted hash)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(layer_name.encode())) % (2**63))


class Factors(NamedTuple):
    """The thin factors ``(D (d, K·n), E (K·n, d))`` of an adapter's transform per side; ``None`` if not adapted."""

    input: tuple[torch.Tensor, torch.Tensor] | None
    output: tuple[torch.Tensor, torch.Tensor] | None


class SideTerms(NamedTuple):
    """An adapter's rank-1 terms per side (``reflection.Terms``); ``None`` if not adapted."""

    input: Terms | None
    output: Terms | None


class _CachedFactors(NamedTuple):
    strength: float
    dtype: torch.dtype
    vectors: tuple[torch.Tensor, ...]  # copies of the vectors the factors were computed from
    factors: Factors


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
        self._cache: _CachedFactors | None = None  # inference only; see ``factors``
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
        parameters = self._parameters  # a dict lookup per vector: this runs in every training forward
        return {v: parameters[parameter_name(v, side)] for v in self.method.vector_names}

    def terms(self, strength: float) -> SideTerms:
        """Both sides' vectors and coefficients at ``strength``, for ``reflected_linear``."""
        method = self.method
        found = [method.rank_one_terms(self.vectors(side), strength) if side in self.sides else None
                 for side in ("input", "output")]  # fmt: skip
        return SideTerms(*found)

    def caches_factors(self) -> bool:
        """Whether ``factors`` keeps its result: sampling on the CPU only (see there)."""
        return not (
            torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or any(v.device.type != "cpu" for v in self._parameters.values())
        )

    def factors(self, strength: float, dtype: torch.dtype) -> Factors:
        """Both sides' ``(D, E)`` in ``dtype`` at ``strength``.

        Without autograd (sampling) on the CPU the factors are kept, with a copy of the vectors they were computed
        from, and reused while every vector still equals its copy. Comparing values, not version counters, sees every
        way a vector changes: in place, through ``.data`` (``EMAModel.copy_to``), ``load_state_dict``, ``.to()``.
        On an accelerator that comparison would make the host wait for the device once per layer and forward, so
        there the factors are recomputed instead (a few small kernels on the vectors, queued without waiting);
        meta tensors (parameter counting) and ``torch.compile`` graphs (which fuse the few small ops) never cache.
        """
        if not self.caches_factors():
            return self._compute_factors(strength, dtype)  # traced into a compiled graph, no data-dependent check
        vectors = tuple(self._parameters.values())
        cached = self._cache
        if (
            cached is None
            or cached.strength != strength
            or cached.dtype != dtype
            or len(vectors) != len(cached.vectors)
            or not all(_same_values(v, copy) for v, copy in zip(vectors, cached.vectors))
        ):
            copies = tuple(v.detach().clone() for v in vectors)
            cached = self._cache = _CachedFactors(strength, dtype, copies, self._compute_factors(strength, dtype))
        return cached.factors

    def _compute_factors(self, strength: float, dtype: torch.dtype) -> Factors:
        found = {}
        for side in self.sides:
            down, up = self.method.factors(self.vectors(side), strength)
            found[side] = (down.to(dtype), up.to(dtype))
        return Factors(found.get("input"), found.get("output"))

    def extra_repr(self) -> str:
        return f"method={self.method.name}, n_blocks={self.n_blocks}, sides={self.sides}"


def _same_values(tensor: torch.Tensor, copy: torch.Tensor) -> bool:
    """Whether ``tensor`` still holds the values of ``copy``. CPU tensors numpy can view are compared there, without
    a dispatched torch operation (this runs per layer and sampling step)."""
    if tensor.shape != copy.shape or tensor.dtype != copy.dtype or tensor.device != copy.device:
        return False
    if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_VIEWABLE:
        return np.array_equal(tensor.data.numpy(), copy.numpy())
    return torch.equal(tensor, copy)


_NUMPY_VIEWABLE = (torch.float32, torch.float64, torch.float16)


class _MergedWeight(NamedTuple):
    """A layer's weight with its one active adapter folded in, for sampling (``EtherLayer.forward``)."""

    adapter: nn.Module
    strength: float
    dtype: torch.dtype
    vectors: tuple[torch.Tensor, ...]  # copies of the vectors it was made from
    base_weight: torch.Tensor  # the base weight it was made from (a merge or a replaced weight makes another)
    base_version: int
    weight: torch.Tensor  # T̃ · W · T, shaped as the base weight


class EtherLayer(nn.Module):
    """Common machinery of the wrappers. Subclasses say how to reach features and the bias-free base product."""

    def __init__(self, base_layer: nn.Module, layer_name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        self.layer_name = layer_name
        self.ether_adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.strengths: dict[str, float] = {}
        self._enabled = True
        self.merged_adapters: list[str] = []
        self._weight_before_merge: torch.Tensor | None = None  # the base weight while adapters are merged
        self._merge_delta: torch.Tensor | None = None  # what merge added, when another adapter sits inside
        self._mixed = None  # per-sample routing: a sampling MixedBatch or a training slots.SlotRoute
        self._directions: directions.Directions | None = None  # set by each training forward of the model
        #: sampling keeps ``W' = T̃ W T`` while the adapter, its vectors and strength are unchanged (one product per
        #: forward, as the base layer; costs a copy of the weight): ``inject.set_merged_cache`` switches it off
        self.merged_cache = True
        self._merged: _MergedWeight | None = None

    def __getstate__(self):
        """A copy (``copy.deepcopy``, pickling) leaves out what is derived from the vectors: the prepared directions
        (one forward's autograd graph) and the merged weight (made again on use)."""
        state = dict(self.__dict__)
        state["_directions"] = None
        state["_merged"] = None
        return state

    @property
    def adapters_enabled(self) -> bool:
        """False: the layer computes its base layer alone (``inject.enable_adapters``)."""
        return self._enabled

    @adapters_enabled.setter
    def adapters_enabled(self, enabled: bool) -> None:
        self._enabled = bool(enabled)
        directions.touch()

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

    @classmethod
    def widths(cls, base_layer: nn.Module) -> tuple[int, int]:
        """``(in, out)`` widths of ``base_layer`` (or of the plain layer inside it) as this wrapper adapts it."""
        raise NotImplementedError

    @classmethod
    def unsupported(cls, base_layer: nn.Module) -> str | None:
        """Why this wrapper cannot adapt ``base_layer`` (e.g. "a 3×3 convolution"), or ``None`` when it can."""
        return None

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
        directions.touch()
        return adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into '{self.layer_name}'; unmerge before deleting it")
        del self.ether_adapters[name]
        self.strengths.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]
        directions.touch()

    def set_active(self, names: list[str], strengths: list[float] | None = None) -> None:
        if self.merged_adapters:
            raise RuntimeError(f"'{self.layer_name}' has merged adapters {self.merged_adapters}; unmerge first")
        strengths = [1.0] * len(names) if strengths is None else list(strengths)
        self.active_adapters = [n for n in names if n in self.ether_adapters]
        for name, strength in zip(names, strengths):
            if name in self.ether_adapters:
                self.strengths[name] = float(strength)
        directions.touch()

    def set_mixed_batch(self, slot_names: list[str | None] | None, slot_ids: torch.Tensor | None = None) -> None:
        """Route sample i through adapter ``slot_names[slot_ids[i]]`` (``None`` = base model); ``None`` ends it."""
        directions.touch()
        if slot_names is None:
            self._mixed = None
            return
        if self.merged_adapters:
            raise RuntimeError(f"'{self.layer_name}' has merged adapters; unmerge before a mixed batch")
        self._mixed = MixedBatch(list(slot_names), slot_ids.to(self.plain.weight.device))

    def route_slots(self, route) -> None:
        """Train several adapters of one layout side by side: sample ``b`` of each forward runs through adapter
        ``route.names[route.ids[b]]`` (``slots.SlotRoute``, shared by every layer of the model); ``None`` ends it."""
        directions.touch()
        if route is not None and self.merged_adapters:
            raise RuntimeError(f"'{self.layer_name}' has merged adapters; unmerge before training slots")
        self._mixed = route

    # --- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.adapters_enabled or self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        if self._mixed is not None:
            return self._mixed.forward(self, x)
        if not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        if (
            len(self.active_adapters) == 1
            and isinstance(base, (nn.Linear, nn.Conv2d))  # not stacked on a LoRA
            and not is_quantized(base.weight)  # a quantised base computes through F.linear only: the general path
        ):
            name = self.active_adapters[0]
            adapter = self.ether_adapters[name]
            if not adapter.caches_factors():  # training, GPUs, compiled graphs
                prepared = None if torch.compiler.is_compiling() else directions.current(self)
                if prepared is not None:  # a training forward of the model: its directions normalised in one batch
                    weight = base.weight.view(self.out_features, self.in_features)  # a 1×1 conv's is (out, in, 1, 1)
                    y = directions.directed_linear(self._features_last(x), weight, base.bias, prepared)
                    return self._features_back(y)
                return self._reflected(x, base, adapter.terms(self.strengths[name]))  # the whole layer as one node
            if self.merged_cache:  # sampling on the CPU: the base layer's one product, with T̃ W T
                return self._with_weight(x, self._merged_weight(adapter, self.strengths[name], x.dtype))
        factors = [self.ether_adapters[n].factors(self.strengths[n], x.dtype) for n in self.active_adapters]
        h = x
        for found in factors:  # y = W · H_k ⋯ H_1 x: the first active adapter acts first
            if found.input is not None:
                h = self._features_back(apply_low_rank(self._features_last(h), *found.input))
        outputs = [found.output for found in factors if found.output is not None]
        if not outputs:
            return self.base_layer(h, *args, **kwargs)
        y = self._features_last(self._product_without_bias(h))  # H̃ acts on W x, before the bias
        for output in outputs:
            y = apply_low_rank(y, *output)
        return self._add_bias(self._features_back(y))

    def _merged_weight(self, adapter: EtherAdapter, strength: float, dtype: torch.dtype) -> torch.Tensor:
        """``T̃ · W · T`` of ``adapter`` at ``strength``, in ``dtype``: kept while the adapter, strength, dtype, base
        weight and every vector's values are those it was made from (``_same_values``: an in-place write, through
        ``.data`` too, as an EMA copy does, makes a new one)."""
        cached, weight = self._merged, self.plain.weight
        vectors = tuple(adapter._parameters.values())
        if (
            cached is None
            or cached.adapter is not adapter
            or cached.strength != strength
            or cached.dtype != dtype
            or cached.base_weight is not weight
            or cached.base_version != weight._version
            or not all(_same_values(v, copy) for v, copy in zip(vectors, cached.vectors))
        ):
            copies = tuple(v.detach().clone() for v in vectors)
            precision = torch.promote_types(weight.dtype, torch.float32)  # as merge: fp32 at least
            matrix = weight.detach().view(self.out_features, self.in_features).to(precision)
            factors = adapter._compute_factors(strength, precision)
            if factors.input is not None:
                matrix = apply_low_rank(matrix, *factors.input)
            if factors.output is not None:
                matrix = apply_low_rank(matrix.T, *factors.output).T
            merged = matrix.to(dtype).reshape(weight.shape).contiguous()
            cached = self._merged = _MergedWeight(adapter, strength, dtype, copies, weight, weight._version, merged)
        return cached.weight

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's computation with ``weight`` in place of its own."""
        raise NotImplementedError

    def _reflected(self, x: torch.Tensor, base: nn.Module, terms: SideTerms) -> torch.Tensor:
        """``H̃ (W (H x)) + b`` through ``reflected_linear`` for the plain layer ``base``, in the dtype the base layer
        would compute in."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        weight, bias = base.weight, base.bias
        y = reflected_linear(
            cast(self._features_last(x), dtype),
            cast(weight.view(self.out_features, self.in_features), dtype),  # a 1×1 conv's is (out, in, 1, 1)
            None if bias is None else cast(bias, dtype),
            terms.input,
            terms.output,
        )
        return self._features_back(y)

    # --- merge ------------------------------------------------------------------------------------------------
    def _transform_matrix(self, matrix: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Weight form of the transforms of ``names``: ``H̃_k⋯H̃_1 · W · H_k⋯H_1`` for ``W`` = ``matrix``."""
        factors = {name: self.ether_adapters[name].factors(self.strengths[name], matrix.dtype) for name in names}
        for name in reversed(names):  # rows of W·H_k⋯H_1 are H_1⋯H_k w_r
            if factors[name].input is not None:
                matrix = apply_low_rank(matrix, *factors[name].input)
        for name in names:  # columns of H̃_k⋯H̃_1·W are H̃_k⋯H̃_1 c
            if factors[name].output is not None:
                matrix = apply_low_rank(matrix.T, *factors[name].output).T
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
        if is_quantized(self.plain.weight):
            raise RuntimeError(
                f"'{self.layer_name}' has a quantised base weight, which cannot hold a merged adapter: sample unfused, "
                "or load the adapter into the unquantised model to merge or fuse it (or export it as a LoRA)"
            )
        weight = self.plain.weight
        if self.stacked:
            # Another adapter adds ΔW inside: add ETHER(W + ΔW) - (W + ΔW) to W, so that fusing or unfusing that
            # adapter (PEFT adds and subtracts ΔW in the same weight) commutes with this merge.
            effective = self._effective_matrix().float()
            merged = self._transform_matrix(effective, names) - effective
        else:
            merged = self._transform_matrix(self._weight_matrix().float(), names)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(
                f"merging {names} into '{self.layer_name}' gives non-finite weights (the adapter holds NaN or inf "
                "values); nothing was changed"
            )
        if self.stacked:  # unmerge subtracts exactly this (the inner adapter may fuse or unfuse meanwhile)
            self._merge_delta = merged.to(weight.dtype).view_as(weight)
            weight.add_(self._merge_delta)
        else:
            # Unmerge restores this copy, bit for bit. Re-applying a reflection (H·H = I) would undo it only up to
            # rounding, the error growing with every fuse/unfuse cycle; ETHER+ may be singular.
            self._weight_before_merge = weight.detach().clone()
            weight.copy_(merged.to(weight.dtype).view_as(weight))
        self.merged_adapters = names
        directions.touch()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly (bit for bit) as it was before ``merge``. A no-op when nothing is merged.

        With another adapter inside (a PEFT LoRA fused or unfused since), only what this merge added is taken away,
        so that adapter's own fuse state is kept."""
        if not self.merged_adapters:
            return
        weight = self.plain.weight
        if self._merge_delta is not None:
            weight.sub_(self._merge_delta)
        else:
            weight.copy_(self._weight_before_merge)
        self._weight_before_merge = None
        self._merge_delta = None
        self.merged_adapters = []
        directions.touch()

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}, enabled={self.adapters_enabled}"


class EtherLinear(EtherLayer):
    """ETHER around an ``nn.Linear``: ``y = H̃ (W (H x)) + b``."""

    def __init__(self, base_layer: nn.Module, layer_name: str = ""):
        super().__init__(base_layer, layer_name)
        self.in_features, self.out_features = self.widths(base_layer)

    @classmethod
    def widths(cls, base_layer):
        plain = plain_layer(base_layer)
        return plain.in_features, plain.out_features

    def _weight_matrix(self):
        return self.plain.weight

    def _with_weight(self, x, weight):
        bias = self.base_layer.bias
        return F.linear(x, weight, None if bias is None else cast(bias, weight.dtype))

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
        reason = self.unsupported(base_layer)
        if reason is not None:
            raise ValueError(f"'{layer_name}' is {reason}. Exclude it from target_modules.")
        super().__init__(base_layer, layer_name)
        self.in_features, self.out_features = self.widths(base_layer)

    @classmethod
    def widths(cls, base_layer):
        plain = plain_layer(base_layer)
        return plain.in_channels, plain.out_channels

    @classmethod
    def unsupported(cls, base_layer):
        # Only a pointwise convolution is a linear map over channels at each pixel.
        base_layer = plain_layer(base_layer)
        found = [
            f"{what} {value}"
            for what, value, pointwise in (
                ("stride", base_layer.stride, (1, 1)),
                ("padding", base_layer.padding, (0, 0)),
                ("groups", base_layer.groups, 1),
                ("dilation", base_layer.dilation, (1, 1)),
            )
            if value != pointwise and not (what == "padding" and value == "valid")
        ]
        if base_layer.kernel_size != (1, 1):
            found = []
        elif not found:
            return None
        kernel = "×".join(str(k) for k in base_layer.kernel_size)
        return (
            f"a {kernel} convolution{' with ' + ', '.join(found) if found else ''}; ETHER adapts only 1×1 "
            "convolutions (stride 1, no padding, one group)"
        )

    def _weight_matrix(self):
        return self.plain.weight.view(self.out_features, self.in_features)

    def _with_weight(self, x, weight):
        bias = self.base_layer.bias
        return F.conv2d(x, weight, None if bias is None else cast(bias, weight.dtype))

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
