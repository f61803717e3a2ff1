"""ETHER adapters in diffusers pipelines, with the verbs of diffusers' LoRA loaders.

Works on any pipeline object with a denoiser (a ``unet``: SD 1.x/2.x, SDXL; or a ``transformer``: SD3, Flux) and its
text encoders (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``), as ``config.ADAPTABLE_COMPONENTS`` lists::

    pipe = StableDiffusionPipeline.from_pretrained("assets/tiny-sd")        # or FluxPipeline, StableDiffusion3Pipeline
    load_ether_weights(pipe, "my-subject/ether_adapter.safetensors", adapter_name="subject")
    image = pipe("a photo of sks star").images[0]

A file records the model family it was made for (``families.py``); loading it into another family's pipeline, or into
a pipeline of a family this library does not support, fails with one message that names both.

``EtherStableDiffusionPipeline`` offers the same functions as methods (``pipe.load_ether_weights(...)``) and
mixed batches: ``pipe(prompts, ether_adapters=["a", "b", None])`` runs each prompt with its own adapter.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from .config import ADAPTABLE_COMPONENTS, DENOISER_COMPONENTS
from .families import FAMILIES, check_supported_pipeline, other_family, pipeline_family
from .finite import check_finite
from .inject import (
    active_adapters,
    adapter_layers,
    adapter_names,
    delete_adapter,
    eject,
    enable_adapters,
    merge_adapters,
    mixed_batch,
    set_active_adapters,
    strengths_in_words,
    unmerge_adapters,
)
from .io import AdapterFile, AdapterMismatchError, load_adapter, read_adapter_file, save_adapter

__all__ = [
    "ADAPTABLE_COMPONENTS",
    "EtherLoaderMixin",
    "EtherStableDiffusionPipeline",
    "delete_ether_adapters",
    "disable_ether",
    "enable_ether",
    "ether_mixed_batch",
    "fuse_ether",
    "get_active_ether_adapters",
    "get_list_ether_adapters",
    "load_ether_weights",
    "save_ether_weights",
    "set_ether_adapters",
    "unfuse_ether",
    "unload_ether_weights",
]


def _components(pipe) -> dict[str, nn.Module]:
    found = {c: getattr(pipe, c, None) for c in ADAPTABLE_COMPONENTS}
    return {c: m for c, m in found.items() if isinstance(m, nn.Module)}


def _made_for(source: AdapterFile) -> str:
    """What the file was made for, in words: its recorded family, else what its components say."""
    family = FAMILIES.get(source.model_family or "")
    if family is not None:
        return f"{family.label} ({family.pipeline})"
    if "transformer" in source.configs:
        return "a transformer model (SD3 or Flux)"
    if "unet" in source.configs:
        return "a UNet model (Stable Diffusion 1.x/2.x or XL)"
    return "a model with other components"


def _check_family(pipe, source: AdapterFile) -> None:
    """Refuse, with one message naming both, a pipeline of an unsupported family and a file made for another family
    than the pipeline's (before any layer is compared: "layers this model lacks" is not the cause then)."""
    check_supported_pipeline(pipe)
    where = source.path or "<adapter>"
    family = pipeline_family(pipe)
    made = other_family(source.model_family, family)
    if made is not None:
        raise AdapterMismatchError(
            f"'{where}' is an adapter for {made.label} models ({made.pipeline}), and this {type(pipe).__name__} is a "
            f"{family.label} pipeline: load it into a {made.pipeline} of the model it was trained on"
            + (f" ({source.base_model})" if source.base_model else "")
        )
    absent = sorted(c for c in source.configs if not isinstance(getattr(pipe, c, None), nn.Module))
    if absent:
        what = f"a {family.label} pipeline" if family is not None else "pipeline"
        raise AdapterMismatchError(
            f"'{where}' is an adapter for {_made_for(source)} and adapts {absent}, which this {type(pipe).__name__} "
            f"({what}) does not have; load it into a pipeline of the model it was trained on"
        )


def load_ether_weights(
    pipe,
    pretrained_path: str | os.PathLike | AdapterFile,
    adapter_name: str | None = None,
    weight_name: str | None = None,
) -> str:
    """Load an adapter file (or a folder holding one, or an ``AdapterFile`` already read) under ``adapter_name`` and
    make it the active adapter. A file made for another model family than the pipeline's is refused with both named
    (``AdapterMismatchError``), as is a pipeline of a family ether-diffusion does not support
    (``families.UnsupportedModelError``); nothing is changed then."""
    if isinstance(pretrained_path, AdapterFile):
        source = pretrained_path
    else:
        source = read_adapter_file(pretrained_path, weight_name)
    _check_family(pipe, source)
    name = load_adapter(source, _components(pipe), adapter_name)
    set_ether_adapters(pipe, [name])
    return name


def get_list_ether_adapters(pipe) -> dict[str, list[str]]:
    """``{component: [adapter names]}`` for the components that carry adapters."""
    return {c: names for c, m in _components(pipe).items() if (names := adapter_names(m))}


def get_active_ether_adapters(pipe) -> list[str]:
    active: dict[str, None] = {}
    for model in _components(pipe).values():
        active.update(dict.fromkeys(active_adapters(model)))
    return list(active)


def set_ether_adapters(pipe, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None):
    """Activate adapters (applied in this order) with strengths; ``docs/adapters.md`` (Strength) says what they mean."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if adapter_weights is None or isinstance(adapter_weights, (int, float)):
        weights = [1.0 if adapter_weights is None else float(adapter_weights)] * len(names)
    else:
        weights = [float(w) for w in adapter_weights]
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} adapter weights for {len(names)} adapters")
    for name, weight in zip(names, weights):
        if not math.isfinite(weight):  # every weight it touched would become NaN or infinite
            raise ValueError(f"the weight {weight} of adapter {name!r} is not a finite number; give one such as 0.8")
    listed = get_list_ether_adapters(pipe)
    known = {n for names_ in listed.values() for n in names_}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown adapters {unknown}; loaded: {sorted(known)}")
    for component, model in _components(pipe).items():
        present = listed.get(component, [])
        if present:
            pairs = [(n, w) for n, w in zip(names, weights) if n in present]
            set_active_adapters(model, [n for n, _ in pairs], [w for _, w in pairs])


def delete_ether_adapters(pipe, adapter_names: str | list[str]) -> None:
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    listed = get_list_ether_adapters(pipe)
    unknown = [n for n in names if not any(n in v for v in listed.values())]
    if unknown:
        raise KeyError(f"unknown adapters {unknown}; loaded: {listed}")
    for component, model in _components(pipe).items():
        for name in names:
            if name in listed.get(component, []):
                delete_adapter(model, name)


def fuse_ether(pipe, adapter_names: list[str] | None = None, safe_fusing: bool = False) -> None:
    """Fold the active adapters (or ``adapter_names``) into the weights: sampling then costs nothing extra.

    ``safe_fusing`` refuses fused weights that are NaN or infinite in the weights' own dtype (a strength far from 1
    overflows them; in float16 anything beyond 65504 does), naming the layer and the strengths. If any component
    fails, all are restored.
    """
    components = _components(pipe)
    strengths = strengths_in_words(components)
    done = []
    try:
        for component, model in components.items():
            merge_adapters(model, adapter_names)
            done.append(model)
            if safe_fusing:  # checked as stored, after the cast to the weight's dtype
                fused = {
                    f"{component}.{p}.weight": layer.plain.weight
                    for p, layer in adapter_layers(model)
                    if layer.merged_adapters
                }
                half = any(w.dtype == torch.float16 for w in fused.values())
                wider = ", or load the model in float32" if half else ""
                advice = f"the adapters act at {strengths}: fuse them at a smaller strength{wider}"
                check_finite(fused, "the fused weight", advice, outcome="nothing was fused")
    except Exception:
        for model in done:
            unmerge_adapters(model)
        raise


def unfuse_ether(pipe) -> None:
    """Restore the weights as they were before ``fuse_ether``, bit for bit (from copies kept at fuse time)."""
    for model in _components(pipe).values():
        unmerge_adapters(model)


def unload_ether_weights(pipe) -> None:
    """Remove all adapters, restoring the original modules. Fused adapters stay fused (as with LoRA)."""
    for model in _components(pipe).values():
        eject(model, keep_merged=True)


def enable_ether(pipe) -> None:
    for model in _components(pipe).values():
        enable_adapters(model, True)


def disable_ether(pipe) -> None:
    """Run the base model while keeping the adapters loaded (unfuse first if they are fused)."""
    for model in _components(pipe).values():
        enable_adapters(model, False)


def save_ether_weights(
    save_directory: str | os.PathLike,
    pipe=None,
    adapter_name: str = "default",
    base_model: str | None = None,
    extra: dict[str, str] | None = None,
    **components,
) -> Path:
    """Save one adapter of a pipeline (or of components passed as ``unet=…, text_encoder=…``) to one file; a pipeline's
    model family is recorded in it."""
    parts = dict(_components(pipe)) if pipe is not None else {}
    parts.update({c: m for c, m in components.items() if m is not None})
    if base_model is None and pipe is not None:
        base_model = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    family = pipeline_family(pipe) if pipe is not None else None
    return save_adapter(save_directory, parts, adapter_name, base_model=base_model, extra=extra,
                        model_family=None if family is None else family.name)  # fmt: skip


@contextlib.contextmanager
def ether_mixed_batch(pipe, adapter_per_prompt: list[str | None], num_images_per_prompt: int = 1):
    """Within the block, prompt ``i`` of a pipeline call is generated with adapter ``adapter_per_prompt[i]``.

    The text encoders see one row per prompt; the denoiser (UNet or transformer) sees ``num_images_per_prompt`` rows
    per prompt, doubled by classifier-free guidance (handled by the layers). ``None`` generates that prompt with the
    base model.
    """
    listed = {n for names in get_list_ether_adapters(pipe).values() for n in names}
    unknown = sorted({n for n in adapter_per_prompt if n is not None and n not in listed})
    if unknown:
        raise KeyError(f"unknown adapters {unknown}; loaded: {sorted(listed)}")
    per_latent = [name for name in adapter_per_prompt for _ in range(num_images_per_prompt)]
    with contextlib.ExitStack() as stack:
        for component, model in _components(pipe).items():
            if not adapter_names(model):
                continue
            known = set(adapter_names(model))
            # An adapter without this component runs the base component for its prompts.
            rows = per_latent if component in DENOISER_COMPONENTS else list(adapter_per_prompt)
            stack.enter_context(mixed_batch(model, [n if n in known else None for n in rows]))
        yield pipe


class EtherLoaderMixin:
    """The module's functions as pipeline methods, plus ``ether_adapters=`` on ``__call__`` for mixed batches."""

    load_ether_weights = load_ether_weights
    set_ether_adapters = set_ether_adapters
    get_active_ether_adapters = get_active_ether_adapters
    get_list_ether_adapters = get_list_ether_adapters
    delete_ether_adapters = delete_ether_adapters
    fuse_ether = fuse_ether
    unfuse_ether = unfuse_ether
    unload_ether_weights = unload_ether_weights
    enable_ether = enable_ether
    disable_ether = disable_ether

    def save_ether_weights(self, save_directory, adapter_name: str = "default", **kwargs) -> Path:
        return save_ether_weights(save_directory, self, adapter_name, **kwargs)

    @torch.no_grad()
    def __call__(self, prompt=None, *args, ether_adapters: list[str | None] | None = None, **kwargs):
        if ether_adapters is None:
            return super().__call__(prompt, *args, **kwargs)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if len(prompts) != len(ether_adapters):
            raise ValueError(
                f"ether_adapters names {len(ether_adapters)} adapters for {len(prompts)} prompts; "
                "give one adapter (or None for the base model) per prompt"
            )
        per_prompt = kwargs.get("num_images_per_prompt") or 1
        with ether_mixed_batch(self, ether_adapters, per_prompt):
            return super().__call__(prompts, *args, **kwargs)


class EtherStableDiffusionPipeline(EtherLoaderMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with ETHER adapter methods; ``from_pretrained`` loads any SD 1.x/2.x folder."""
