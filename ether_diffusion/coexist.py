"""ETHER wrappers living with the model code of diffusers, transformers and PEFT.

An ETHER wrapper replaces a layer in its parent, so two things that walk a model by module name would break:

- **Saving.** ``save_pretrained`` (diffusers models, transformers models, and so a pipeline's ``save_pretrained``)
  writes ``state_dict()``: wrapped layers appear as ``…to_q.base_layer.weight`` plus adapter vectors, and a reload
  silently leaves ``…to_q.weight`` randomly initialised. The guard here makes ``save_pretrained`` write plain
  weights under the original names, **as the model computes them now**: fused adapters as fused, active unfused
  adapters folded in (exactly, without touching the live weights), disabled or inactive adapters left out. The
  folder then reloads with ``from_pretrained`` into the model that was saved, with no ETHER code needed. Weights that
  are not finite as computed are refused before anything is written (``finite.check_finite``).
- **PEFT LoRA.** PEFT wraps only layer types it knows, so ``load_lora_weights`` into a model that already holds
  ETHER wrappers would fail. The guard steps the wrappers aside while PEFT injects (each base layer back in its
  place), then puts each wrapper back around whatever sits there now: the PEFT layer. Loading in the other order
  (LoRA first) gives the same structure, ``inject`` wrapping the PEFT layer. Either way the layer computes
  ``ETHER(W + ΔW_LoRA)``: the ETHER transforms act on the LoRA-adapted layer, and fusing or unfusing either adapter
  leaves the output unchanged (ETHER fuses additively there, see ``EtherLayer.merge``).

``install(model)`` sets the guards as instance attributes on a model that has those methods (``inject`` does
it); ``uninstall`` removes them. torch only: nothing here imports diffusers, transformers or PEFT.
"""

from __future__ import annotations

import contextlib
import copy
import types

import torch
from torch import nn

from .delta import layer_lora_factors
from .finite import check_finite
from .layers import EtherLayer

__all__ = ["GUARDED_METHODS", "install", "plain_modules", "uninstall", "wrappers_aside"]


def _wrappers(model: nn.Module) -> list[tuple[str, EtherLayer]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, EtherLayer)]


def _plain_copy(layer: EtherLayer) -> nn.Module:
    """The layer as it computes now, as a plain module: its base layer, or a copy of it with the active unfused
    adapters folded into a new weight tensor (the live weight is not touched)."""
    if layer.merged_adapters:
        return layer.base_layer  # the fused weight is the base weight now
    if not isinstance(layer.base_layer, (nn.Linear, nn.Conv2d)):
        active = layer.active_adapters if layer.adapters_enabled else []
        if not active:
            return layer.base_layer
        raise RuntimeError(
            f"'{layer.layer_name}' applies ETHER adapters {active} on top of another adapter (a PEFT LoRA); fuse "
            "the ETHER adapters first (fuse_ether(pipe)) to save the model, or unload one of them"
        )
    factors = layer_lora_factors(layer)
    if factors is None:
        return layer.base_layer
    base = layer.base_layer
    weight = base.weight.detach()
    merged = (weight.to(torch.float64).reshape(factors.up.shape[0], -1) + factors.delta()).to(weight.dtype)
    plain = copy.copy(base)  # same class and settings; its own parameter dict
    plain._parameters = dict(base._parameters)
    plain._parameters["weight"] = nn.Parameter(merged.view_as(weight), requires_grad=False)
    return plain


@contextlib.contextmanager
def plain_modules(model: nn.Module):
    """Within the block, every ETHER wrapper of ``model`` is replaced by a plain module computing what it computes
    now (see the module docstring); the wrappers return afterwards, unchanged."""
    layers = _wrappers(model)
    plain = [(path, _plain_copy(layer)) for path, layer in layers]  # all checked before anything moves
    try:
        for path, module in plain:
            model.set_submodule(path, module)
        yield model
    finally:
        for path, layer in layers:
            model.set_submodule(path, layer)


@contextlib.contextmanager
def wrappers_aside(model: nn.Module):
    """Within the block, each wrapper's base layer is back in its place (PEFT sees the layers it knows). Afterwards
    every wrapper returns around whatever sits there now, e.g. a PEFT LoRA layer wrapping the base layer; fused
    ETHER adapters are unfused before and fused again after, so they fold in on top of the new adapter."""
    layers = _wrappers(model)
    fused = {}
    for path, layer in layers:
        if layer.merged_adapters:
            fused[path] = list(layer.merged_adapters)
            layer.unmerge()
    try:
        for path, layer in layers:
            model.set_submodule(path, layer.base_layer)
        yield model
    finally:
        for path, layer in layers:
            now = model.get_submodule(path)
            if now is not layer.base_layer:
                layer.base_layer = now
            model.set_submodule(path, layer)
        for path, layer in layers:
            if path in fused:
                layer.merge(fused[path])


def _saving(name: str):
    def method(self, *args, **kwargs):
        with plain_modules(self):
            # weights as computed: a strength far from 1 overflows them, and a file of infinities draws black images
            advice = "the ETHER adapters act at a strength too far from 1: lower it (set_ether_adapters) and save again"
            check_finite(self.state_dict(), "the weight", advice)
            return getattr(type(self), name)(self, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"``{name}`` with ETHER wrappers saved as plain weights (``ether_diffusion.coexist``)."
    return method


def _injecting(name: str):
    def method(self, *args, **kwargs):
        with wrappers_aside(self):
            return getattr(type(self), name)(self, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"``{name}`` with ETHER wrappers stepped aside for PEFT (``ether_diffusion.coexist``)."
    return method


#: Method name → guard factory. diffusers models load LoRAs with ``load_lora_adapter``, transformers models (the
#: text encoders) with ``load_adapter``; both add training adapters with ``add_adapter``.
GUARDED_METHODS = {
    "save_pretrained": _saving,
    "load_lora_adapter": _injecting,
    "load_adapter": _injecting,
    "add_adapter": _injecting,
}


def install(model: nn.Module) -> None:
    """Guard the methods of ``GUARDED_METHODS`` that ``model``'s class has (instance attributes; idempotent)."""
    for name, factory in GUARDED_METHODS.items():
        if callable(getattr(type(model), name, None)) and name not in vars(model):
            object.__setattr__(model, name, types.MethodType(factory(name), model))


def uninstall(model: nn.Module) -> None:
    for name in GUARDED_METHODS:
        if isinstance(vars(model).get(name), types.MethodType):
            del vars(model)[name]
