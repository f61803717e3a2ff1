"""Slots: one training forward that trains several adapters of one layout side by side.

A packed training step (``training/pack.py``) puts the samples of K independent runs in one batch; sample ``b`` runs
through adapter ``names[ids[b]]`` of every adapted layer. Unlike a sampling mixed batch (``mixed.py``), which zero-pads
adapters of any method to a common rank and gathers their factors once per denoising run, the slots of a training
step share one layout (method, blocks, sides: the adapters of runs with the same flags), so each layer stacks the
slots' vectors and builds every slot's transform at once::

    vectors (S, n, b) per term  ->  unit rows R (S, K·n, d), scaled rows E = C R
    x (B, ..., d)  ->  x + (x R[slot_b]ᵀ) E[slot_b]          one batched product per side

The number of operations per layer does not grow with the number of slots; the base layer's product runs once for
the whole batch, which is what makes a packed step cheaper than K steps. A ``SlotPlan`` goes further: once per step
it normalises every layer's slot vectors in one batch per vector shape (``prepare``), and each layer then only views
its rows (its vectors unchanged since, or it makes its own). Each slot's gradient is the one its own samples give (a
sample's output depends on its own adapter only). torch only.
"""

from __future__ import annotations

import torch
from torch import nn

from .inject import adapter_configs
from .reflection import _norm_floor, block_rows, cast

__all__ = ["SlotPlan", "SlotRoute", "check_same_layout"]


class SlotRoute:
    """Which adapter each sample of a training forward uses: ``names`` per slot, ``ids`` (B,) per sample.

    One route is shared by every adapted layer of a model (``EtherLayer.route_slots``); the trainer sets ``ids`` before
    each forward (``assign``). When every slot holds the same number of consecutive samples the batch is viewed as
    (S, samples per slot, ...) and no per-sample copy of the rows is made."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.ids: torch.Tensor | None = None
        self.per_slot: int | None = None  # samples per slot when the batch is S equal consecutive groups
        self.plan: SlotPlan | None = None  # every layer's rows made in one batch per step, when the trainer asks

    def assign(self, counts: list[int], device) -> None:
        """Samples per slot, in batch order: slot ``k``'s ``counts[k]`` samples follow slot ``k - 1``'s."""
        if len(counts) != len(self.names):
            raise ValueError(f"{len(counts)} sample counts for {len(self.names)} slots")
        ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        self.ids = ids.to(device)
        self.per_slot = counts[0] if counts and len(set(counts)) == 1 else None

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        ids = self.ids
        if ids is None or x.shape[0] != ids.shape[0]:
            raise ValueError(
                f"'{layer.layer_name}': a batch of {x.shape[0]} samples, but the slot route assigns "
                f"{None if ids is None else ids.shape[0]}"
            )
        adapters = [layer.ether_adapters[name] for name in self.names]
        strength = layer.strengths[self.names[0]]
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        h = x
        sides = adapters[0].sides
        if "input" in sides:
            rows = self._rows(layer, adapters, "input", strength, dtype)
            h = layer._features_back(self._apply(layer._features_last(cast(h, dtype)), rows))
        if "output" not in sides:
            return layer.base_layer(h)
        y = layer._features_last(layer._product_without_bias(h))
        y = self._apply(y, self._rows(layer, adapters, "output", strength, y.dtype))
        return layer._add_bias(layer._features_back(y))

    def _rows(self, layer, adapters: list, side: str, strength: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        planned = None if self.plan is None else self.plan.rows_of(layer, side, self.names)
        if planned is None:
            return _slot_rows(adapters, side, strength, dtype)
        return _with_coefficients(*planned, dtype)

    def _apply(self, x: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x + (x Rᵀ) E`` with each sample's own slot's ``R``, ``E`` (S, r, d)."""
        units, scaled = rows
        slots = units.shape[0]
        if self.per_slot is not None:  # (S, m·N, d): the slots' rows as they are
            flat = x.reshape(slots, -1, x.shape[-1])
        else:  # (B, N, d): each sample's rows gathered
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            units, scaled = units.index_select(0, self.ids), scaled.index_select(0, self.ids)
        return torch.baddbmm(flat, torch.bmm(flat, units.transpose(1, 2)), scaled).reshape(x.shape)


def _slot_rows(adapters: list, side: str, strength: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, E)`` (S, K·n, d) of every slot's transform on ``side``: unit directions placed in their blocks, and the
    same rows times their terms' coefficients. One stack of every slot's vectors: the operations do not grow with S."""
    method = adapters[0].method
    terms = [method.rank_one_terms(adapter.vectors(side), strength) for adapter in adapters]
    coefficients = terms[0].coefficients
    k = len(coefficients)
    stacked = torch.stack([vector for found in terms for vector in found.vectors])  # (S·K, n, b)
    count, n, b = stacked.shape
    # rows (s, k·n + m) hold slot s's term k's direction of block m in its columns
    return _with_coefficients(_unit_rows(stacked).view(count // k, k * n, n * b), coefficients, dtype)


def _unit_rows(stacked: torch.Tensor) -> torch.Tensor:
    """``block_rows`` of the (M, n, b) vectors made unit length: (M·n, n·b)."""
    return block_rows(stacked / stacked.norm(dim=-1, keepdim=True).clamp_min(_norm_floor(stacked.dtype)))


def _with_coefficients(rows: torch.Tensor, coefficients, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, E)``: the (S, K·n, d) unit rows in ``dtype`` and the same rows times their terms' coefficients."""
    rows = cast(rows, dtype)
    if len(set(coefficients)) == 1:
        return rows, rows * coefficients[0]
    return rows, rows * _scale(tuple(coefficients), rows.shape[1] // len(coefficients), dtype, rows.device)


class _Planned:
    """One (layer, side) of a ``SlotPlan``: its S·K vectors' place in their group and the rows made from them."""

    __slots__ = ("vectors", "versions", "start", "key", "terms", "coefficients", "rows")

    def __init__(self, vectors: tuple, start: int, key: tuple, terms: int, coefficients: tuple):
        self.vectors, self.start, self.key, self.terms, self.coefficients = vectors, start, key, terms, coefficients
        self.versions: tuple | None = None
        self.rows: torch.Tensor | None = None


class SlotPlan:
    """Every routed layer's slot rows, made in one batch per vector shape: ``prepare()`` (once per step, after the
    optimizers stepped) stacks every layer's S·K vectors of a shape, normalises them and places their blocks at once;
    a layer's forward views its (S, K·n, d) rows. A layer whose vectors changed since (an in-place write: their
    versions) or which the plan does not hold makes its own rows (``_slot_rows``): never stale rows."""

    def __init__(self, layers, names: list[str]):
        self.names = list(names)
        self.groups: dict[tuple, list[torch.Tensor]] = {}
        self.entries: dict[tuple[int, str], _Planned] = {}
        for layer in layers:
            adapters = [layer.ether_adapters[name] for name in self.names]
            strength = layer.strengths[self.names[0]]
            method = adapters[0].method
            for side in adapters[0].sides:
                terms = [method.rank_one_terms(adapter.vectors(side), strength) for adapter in adapters]
                vectors = tuple(vector for found in terms for vector in found.vectors)
                key = (tuple(vectors[0].shape), vectors[0].dtype, vectors[0].device)
                members = self.groups.setdefault(key, [])
                self.entries[(id(layer), side)] = _Planned(vectors, len(members), key, len(terms[0].coefficients),
                                                           tuple(terms[0].coefficients))  # fmt: skip
                members.extend(vectors)

    def prepare(self) -> None:
        made = {}
        for key, members in self.groups.items():
            made[key] = _unit_rows(torch.stack(members))  # (M·n, n·b) of the (M, n, b) vectors
        for entry in self.entries.values():
            n, b = entry.key[0]
            count = len(entry.vectors)
            rows = made[entry.key][entry.start * n : (entry.start + count) * n]
            entry.rows = rows.view(count // entry.terms, entry.terms * n, n * b)
            entry.versions = tuple(vector._version for vector in entry.vectors)

    def rows_of(self, layer, side: str, names: list[str]) -> tuple[torch.Tensor, tuple] | None:
        """``(rows, coefficients)`` of ``layer``'s ``side`` if prepared from its current vectors, else None."""
        entry = self.entries.get((id(layer), side))
        if entry is None or entry.rows is None or names != self.names:
            return None
        if any(vector._version != version for vector, version in zip(entry.vectors, entry.versions)):
            return None
        return entry.rows, entry.coefficients


_SCALES: dict[tuple, torch.Tensor] = {}


def _scale(coefficients: tuple[float, ...], n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(K·n, 1): term k's coefficient for each of its n rows, made once per layout and device."""
    key = (tuple(coefficients), n, dtype, str(device))
    found = _SCALES.get(key)
    if found is None:
        found = _SCALES[key] = torch.tensor(coefficients, dtype=dtype).repeat_interleave(n)[:, None].to(device)
    return found


def check_same_layout(models: dict[str, nn.Module], names: list[str]) -> None:
    """Raise unless adapters ``names`` cover the same layers with the same method, blocks and sides (what slots of one
    step need)."""
    for component, model in models.items():
        configs = adapter_configs(model)
        missing = [name for name in names if name not in configs]
        if missing:
            raise KeyError(f"{component} has no adapters {missing}")
        layouts = {
            (c.method, c.n_blocks, tuple(c.sides), tuple(c.target_suffixes)) for c in (configs[name] for name in names)
        }
        if len(layouts) > 1:
            raise ValueError(
                f"slots of one step need one adapter layout (method, blocks, sides, targets); {component} has "
                f"{len(layouts)}: {sorted(layouts)}"
            )
