"""Put ETHER adapters into any ``nn.Module`` and take them out again.

One walk over ``named_modules`` finds the targets; ``LAYER_TYPES`` says which wrapper each base layer gets.
Everything here works on a plain ``nn.Module`` (a diffusers UNet, a CLIP text encoder, a toy MLP).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from . import coexist, directions
from .config import TARGET_PRESETS, EtherConfig, check_adapter_name
from .layers import LAYER_TYPES, EtherLayer, is_quantized, plain_layer

__all__ = [
    "Target",
    "active_adapters",
    "adapter_configs",
    "adapter_layers",
    "adapter_names",
    "adapter_parameters",
    "adapter_state_dict",
    "add_adapter_to_targets",
    "check_can_add",
    "count_parameters",
    "delete_adapter",
    "eject",
    "enable_adapters",
    "find_targets",
    "inject",
    "load_adapter_state_dict",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "mixed_batch",
    "plan_injection",
    "restore_on_failure",
    "set_active_adapters",
    "strengths_in_words",
    "unmerge_adapters",
]


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, EtherLayer]]:
    """``(path, wrapper)`` for every ETHER wrapper in ``model``; ``path`` is the adapted module's original path."""
    for path, module in model.named_modules():
        if isinstance(module, EtherLayer):
            yield path, module


def adapter_configs(model: nn.Module) -> dict[str, EtherConfig]:
    """The config each adapter of ``model`` was injected with, by adapter name."""
    return dict(getattr(model, "_ether_configs", {}))


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update(dict.fromkeys(layer.ether_adapters))
    return list(names)


def _wrapper_type(module: nn.Module) -> type[EtherLayer] | None:
    for cls in type(module).__mro__:
        if cls in LAYER_TYPES:
            return LAYER_TYPES[cls]
    return None


class Target(NamedTuple):
    """A module ``config`` targets, where it sits, and whether (and how) ETHER can adapt it."""

    path: str
    module: nn.Module  # a base layer, or a wrapper already there (its adapters get one more)
    parent: nn.Module  # the module holding it, as attribute ``child``
    child: str
    wrapper: type[EtherLayer] | None  # None when ETHER cannot adapt the module
    widths: tuple[int, int] | None  # (in, out)
    problem: str | None  # why ETHER cannot adapt it ("a 3×3 convolution; ...")


def _walk(module: nn.Module, path: str = "", parent: nn.Module | None = None, child: str = "", seen=None):
    """``(path, module, parent, child)`` in ``named_modules`` order, not descending into ETHER wrappers."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    yield path, module, parent, child
    if isinstance(module, EtherLayer):
        return  # its base layer and adapter vectors are not targets
    for name, sub in module._modules.items():
        if sub is not None:
            yield from _walk(sub, f"{path}.{name}" if path else name, module, name, seen)


def find_targets(model: nn.Module, config: EtherConfig) -> list[Target]:
    """Every module of ``model`` that ``config`` targets, in one walk; changes nothing."""
    targets = []
    for path, module, parent, child in _walk(model):
        if not (path and config.is_target(path)):
            continue
        if isinstance(module, EtherLayer):
            targets.append(
                Target(path, module, parent, child, type(module), (module.in_features, module.out_features), None)
            )
            continue
        # A PEFT LoRA layer (or another wrapper keeping the original as ``base_layer``) is wrapped whole: ETHER then
        # acts on what it computes (see coexist.py).
        wrapper = _wrapper_type(plain_layer(module))
        if wrapper is None:
            kinds = " and ".join(t.__name__ for t in LAYER_TYPES)
            problem = f"a module of type {type(module).__name__}; ETHER adapts {kinds} layers"
            targets.append(Target(path, module, parent, child, None, None, problem))
        else:
            problem = wrapper.unsupported(module)
            targets.append(Target(path, module, parent, child, wrapper, wrapper.widths(module), problem))
    return targets


def _divisors(width: int) -> str:
    return ", ".join(str(d) for d in range(1, width + 1) if width % d == 0)


def check_can_add(model: nn.Module, adapter_name: str, activate: bool = True) -> None:
    """Raise unless ``model`` can take a new adapter ``adapter_name`` (a valid name, not in use, nothing merged)."""
    check_adapter_name(adapter_name)
    existing = [layer for _, layer in adapter_layers(model)]  # one walk for both checks
    if adapter_name in adapter_configs(model) or any(adapter_name in layer.ether_adapters for layer in existing):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; delete it or pick another name")
    if activate and any(layer.merged_adapters for layer in existing):
        raise RuntimeError("the model has merged adapters; unmerge them before adding and activating another")


def plan_injection(model: nn.Module, config: EtherConfig, adapter_name: str, activate: bool = True) -> list[Target]:
    """Every check ``inject`` makes, without touching the model: the targets, or an error naming the problem."""
    check_can_add(model, adapter_name, activate)
    targets = find_targets(model, config)
    if not targets:
        kinds = sorted({type(m).__name__ for _, m in model.named_modules() if _wrapper_type(m)})
        raise ValueError(
            f"no module of {type(model).__name__} matches target_modules={config.target_modules!r} "
            f"(exclusions {config.exclude_modules}); adaptable layer types present: {kinds}"
        )
    unsupported = [f"'{t.path}' ({t.problem})" for t in targets if t.problem is not None]
    if unsupported:
        raise ValueError(
            f"target_modules={config.target_modules!r} matches {len(unsupported)} layer(s) ETHER cannot adapt: "
            + "; ".join(unsupported[:3])
            + (f"; and {len(unsupported) - 3} more" if len(unsupported) > 3 else "")
            + ". Narrow target_modules (presets: "
            + ", ".join(sorted(TARGET_PRESETS))
            + ") or add those layers to exclude_modules."
        )
    for target in targets:
        for side, width in zip(("input", "output"), target.widths):
            if side in config.sides and width % config.n_blocks:
                raise ValueError(
                    f"n_blocks={config.n_blocks} does not divide the {side} width {width} of '{target.path}'; "
                    f"n_blocks values that divide {width}: {_divisors(width)}"
                )
    return targets


def inject(
    model: nn.Module,
    config: EtherConfig,
    adapter_name: str = "default",
    activate: bool = True,
    initialize: bool = True,
) -> list[str]:
    """Add adapter ``adapter_name`` built from ``config`` to every targeted layer; returns the adapted paths.

    All or nothing: everything is checked before the model is touched (an unsupported layer, a width not divisible
    by ``n_blocks``, a name already in use raise and leave the model as it was), and should anything still fail
    half-way the model is restored. With ``activate`` the new adapter becomes the only active one (strength 1).
    ``initialize=False`` leaves the vectors unset (uninitialised memory), for callers that load every vector right
    after (``load_adapter``), saving the random draws.
    """
    targets = plan_injection(model, config, adapter_name, activate)
    with restore_on_failure(model):
        add_adapter_to_targets(model, targets, config, adapter_name, activate, initialize)
    return [target.path for target in targets]


def add_adapter_to_targets(
    model: nn.Module,
    targets: list[Target],
    config: EtherConfig,
    adapter_name: str,
    activate: bool = True,
    initialize: bool = True,
) -> None:
    """``inject``'s work for targets that ``plan_injection`` (or an equivalent check) accepted."""
    for target in targets:
        layer = target.module
        if not isinstance(layer, EtherLayer):
            layer = target.wrapper(layer, layer_name=target.path)
            setattr(target.parent, target.child, layer)
        layer.add_adapter(adapter_name, config, initialize=initialize)
    configs = adapter_configs(model)
    configs[adapter_name] = config
    model._ether_configs = configs
    coexist.install(model)  # save_pretrained writes plain weights; PEFT LoRAs load beside the wrappers
    install_directions(model)
    if activate:
        set_active_adapters(model, [adapter_name])


#: model -> the plan of its training forward's directions (``directions.DirectionPlan``), kept apart from the model
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepare_directions(model: nn.Module, args) -> None:
    """``model``'s forward pre-hook: before a forward with autograd, every adapted layer's unit directions are
    normalised in one batch (``directions.py``); sampling and compiled graphs compute their own."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    plan = _plans.get(model)
    if plan is None or plan.generation != directions.generation():
        layers = [layer for _, layer in adapter_layers(model) if _runs_one_adapter(layer)]
        plan = _plans[model] = directions.DirectionPlan(layers)
    plan.prepare()


def _runs_one_adapter(layer: EtherLayer) -> bool:
    """Whether ``EtherLayer.forward`` trains ``layer`` on prepared directions: one active adapter, unmerged, enabled,
    not in a mixed batch, on its plain layer."""
    return (
        layer.adapters_enabled
        and not layer.merged_adapters
        and layer._mixed is None
        and len(layer.active_adapters) == 1
        and isinstance(layer.base_layer, (nn.Linear, nn.Conv2d))
        and not is_quantized(layer.base_layer.weight)
    )


def install_directions(model: nn.Module) -> None:
    """Register ``_prepare_directions`` on ``model`` (idempotent)."""
    if _prepare_directions not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_prepare_directions)


def uninstall_directions(model: nn.Module) -> None:
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _prepare_directions:
            del model._forward_pre_hooks[key]
    _plans.pop(model, None)


class _LayerState(NamedTuple):
    layer: EtherLayer
    adapters: tuple[str, ...]
    active: list[str]
    strengths: dict[str, float]
    enabled: bool


@contextlib.contextmanager
def restore_on_failure(model: nn.Module):
    """Within the block, changes to ``model``'s adapters are undone if an exception escapes.

    Recorded first: where each wrapper sits, its adapters, active adapters, strengths and switch, and the model's
    adapter configs. Undone: wrappers added in the block (the original modules go back), adapters added to wrappers
    that were there, and the activation. Base weights are not recorded: the block must not merge.
    """
    before = {
        path: _LayerState(
            layer,
            tuple(layer.ether_adapters),
            list(layer.active_adapters),
            dict(layer.strengths),
            layer.adapters_enabled,
        )
        for path, layer in adapter_layers(model)
    }
    configs = dict(model._ether_configs) if "_ether_configs" in model.__dict__ else None
    try:
        yield
    except BaseException:
        for path, layer in list(adapter_layers(model)):
            state = before.get(path)
            if state is None or state.layer is not layer:  # placed in the block: what was there goes back
                model.set_submodule(path, layer.base_layer if state is None else state.layer)
                continue
            for name in [n for n in layer.ether_adapters if n not in state.adapters]:
                del layer.ether_adapters[name]
            layer.active_adapters = list(state.active)
            layer.strengths = dict(state.strengths)
            layer.adapters_enabled = state.enabled  # (and the prepared directions are out of date)
        if configs is None:
            model.__dict__.pop("_ether_configs", None)
            coexist.uninstall(model)
            uninstall_directions(model)
        else:
            model._ether_configs = configs
        raise


def eject(model: nn.Module, keep_merged: bool = False) -> list[str]:
    """Remove every wrapper, putting the original module objects back; returns their paths.

    Merged adapters are unmerged first unless ``keep_merged`` (then the base weights keep the fused change).
    """
    paths = []
    for path, layer in list(adapter_layers(model)):
        if not keep_merged:
            layer.unmerge()
        model.set_submodule(path, layer.base_layer)
        paths.append(path)
    if hasattr(model, "_ether_configs"):
        del model._ether_configs
    coexist.uninstall(model)
    uninstall_directions(model)
    return paths


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter; wrappers left without adapters are ejected."""
    if adapter_name not in adapter_names(model):
        raise KeyError(f"no adapter named {adapter_name!r}; the model has {adapter_names(model)}")
    for path, layer in list(adapter_layers(model)):
        if adapter_name in layer.ether_adapters:
            layer.delete_adapter(adapter_name)
            if not layer.ether_adapters:
                model.set_submodule(path, layer.base_layer)
    model._ether_configs.pop(adapter_name, None)
    if not model._ether_configs:
        coexist.uninstall(model)
        uninstall_directions(model)


def set_active_adapters(model: nn.Module, names: str | list[str], strengths: float | list[float] | None = None):
    """Activate ``names`` (applied in this order) with per-adapter ``strengths`` (default 1.0 each)."""
    names = [names] if isinstance(names, str) else list(names)
    if isinstance(strengths, (int, float)):
        strengths = [float(strengths)] * len(names)
    if strengths is not None and len(strengths) != len(names):
        raise ValueError(f"got {len(strengths)} strengths for {len(names)} adapters")
    layers = [layer for _, layer in adapter_layers(model)]
    known = list(dict.fromkeys(name for layer in layers for name in layer.ether_adapters))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown adapters {unknown}; the model has {known}")
    for layer in layers:
        layer.set_active(names, strengths)


def active_adapters(model: nn.Module) -> list[str]:
    for _, layer in adapter_layers(model):
        return list(layer.active_adapters)
    return []


def enable_adapters(model: nn.Module, enabled: bool = True) -> None:
    """Switch the (unmerged) adapters on or off without removing them."""
    for _, layer in adapter_layers(model):
        if layer.merged_adapters and not enabled:
            raise RuntimeError(f"'{layer.layer_name}' has merged adapters; unmerge before disabling adapters")
        layer.adapters_enabled = enabled


def set_merged_cache(model: nn.Module, enabled: bool = True) -> None:
    """Whether sampling on the CPU keeps each adapted layer's transformed weight ``T̃ W T`` (the default: one product
    per layer and step, as the base model) or applies the transforms to the activations each step (no copy of the
    weights: for memory-tight machines). Either computes the same layer; ``fuse_ether`` is the zero-copy way to the
    base model's cost."""
    for _, layer in adapter_layers(model):
        layer.merged_cache = bool(enabled)
        if not enabled:
            layer._merged = None


def merge_adapters(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
    """Fold adapters into the base weights. If a safe merge fails, layers already merged are restored."""
    done = []
    try:
        for _, layer in adapter_layers(model):
            layer.merge(adapter_names, safe_merge=safe_merge)
            done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge()
        raise


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


@contextlib.contextmanager
def mixed_batch(model: nn.Module, per_sample: list[str | None]):
    """Run sample ``i`` of the next forward passes through adapter ``per_sample[i]`` (``None`` = base model).

    A batch that is a multiple of ``len(per_sample)`` repeats the assignment, as classifier-free guidance's
    ``[uncond, cond]`` concatenation needs. Strengths come from ``set_active_adapters`` (default 1.0).
    """
    known = adapter_names(model)
    unknown = sorted({n for n in per_sample if n is not None and n not in known})
    if unknown:
        raise KeyError(f"unknown adapters {unknown} in the mixed batch; the model has {known}")
    slots = list(dict.fromkeys(per_sample))
    ids = torch.tensor([slots.index(n) for n in per_sample], dtype=torch.long)
    layers = [layer for _, layer in adapter_layers(model)]
    try:
        for layer in layers:
            layer.set_mixed_batch(slots, ids)
        yield model
    finally:
        for layer in layers:
            layer.set_mixed_batch(None)


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The adapter vectors, found by visiting the wrappers (never by matching parameter names)."""
    params = []
    for _, layer in adapter_layers(model):
        for name, adapter in layer.ether_adapters.items():
            if adapter_name is None or name == adapter_name:
                params.extend(adapter.parameters())
    return params


def mark_only_adapters_trainable(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the vectors of ``adapter_name`` (default: all adapters)."""
    model.requires_grad_(False)
    params = adapter_parameters(model, adapter_name)
    for param in params:
        param.requires_grad_(True)
    return params


def count_parameters(model: nn.Module, adapter_name: str | None = None) -> int:
    return sum(p.numel() for p in adapter_parameters(model, adapter_name))


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``{"<original module path>.ether_u": tensor, ...}``: keys independent of the wrapper's internals."""
    state = {}
    for path, layer in adapter_layers(model):
        adapter = layer.ether_adapters[adapter_name] if adapter_name in layer.ether_adapters else None
        if adapter is None:
            continue
        for name, param in adapter.named_parameters():
            state[f"{path}.{name}"] = param.detach()
    if not state:
        raise KeyError(f"no adapter named {adapter_name!r}; the model has {adapter_names(model)}")
    return state


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (and {len(keys) - limit} more)" if len(keys) > limit else shown


def load_adapter_state_dict(model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into adapter ``adapter_name``, strictly: missing, unexpected or misshaped keys raise."""
    expected = {}
    for path, layer in adapter_layers(model):
        if adapter_name in layer.ether_adapters:
            for name, param in layer.ether_adapters[adapter_name].named_parameters():
                expected[f"{path}.{name}"] = param
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(p.shape)})"
        for k, p in expected.items()
        if k in state and state[k].shape != p.shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} keys with the wrong shape: {_listing(misshaped)}")
    if problems:
        raise ValueError(f"adapter {adapter_name!r} does not fit this model: " + "; ".join(problems))
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(state[key])


def strengths_in_words(components: dict[str, nn.Module]) -> str:
    """The strengths of the active adapters, in words (``"strength 0.8"``, ``"strengths 1, 0.6"``): what messages
    about overflowing weights name as the cause."""
    for model in components.values():
        for _, layer in adapter_layers(model):
            found = [f"{layer.strengths[n]:g}" for n in layer.active_adapters]
            return f"strength{'s' if len(found) > 1 else ''} {', '.join(found)}"
    return "their strengths"
