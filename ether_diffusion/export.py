"""Exact export of ETHER adapters as LoRA files, for diffusers, ComfyUI, A1111 and Forge.

Every transform of this library is the identity plus thin factors, so the weight change an adapter makes is exactly
low-rank and needs no SVD: ``W' = W + up · down`` with the factors of ``delta.py`` (computed in float64 from the base
weight, cast once to the file's dtype). Ranks: ETHER ``n`` (n_blocks), one-sided ETHER+ ``2n``, two-sided ETHER+
``4n``, composed adapters the sum. The bias is unchanged (output transforms act before it).

Two formats:

- ``"diffusers"``: the keys ``pipe.save_lora_weights`` writes (``unet.<path>.lora_A.weight`` / ``lora_B.weight``,
  ``text_encoder.…``) and its ``lora_adapter_metadata`` (rank and alpha per layer, so every layer has scale 1);
  ``pipe.load_lora_weights(file)`` reads it. 1×1 convolutions (``proj_in``/``proj_out`` of SD 1.x) get 4-D
  ``(r, in, 1, 1)`` / ``(out, r, 1, 1)`` tensors, as PEFT's LoRA ``Conv2d`` holds them.
  SD3 and Flux files hold ``transformer.<path>`` keys (the format diffusers' SD3/Flux DreamBooth scripts write).
- ``"kohya"``: ``lora_unet_<path>`` / ``lora_te_<path>`` (SDXL: ``lora_te1_`` and ``lora_te2_``) with
  ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``: the format A1111, Forge and ComfyUI read. Every layer
  gets the same rank (smaller factors are zero-padded) and ``alpha = rank``: diffusers' kohya converter keeps
  per-layer alphas under stale names, so a file whose layers have different ranks loads there with wrong scales.
  Flux: kohya's sd-scripts names, which follow the original (BFL) checkpoint:
  ``lora_unet_double_blocks_<i>_img_attn_qkv`` is one fused layer for diffusers' ``to_q``, ``to_k``, ``to_v``
  (``single_blocks_<i>_linear1``: q, k, v and the MLP input), so a fused layer's factors are the members' side by side
  (``up`` block-diagonal, each member in its own equal share of the rank: the layout diffusers' Flux converter splits
  back exactly); every layer keeps its own rank with ``alpha = rank`` (that converter reads each layer's alpha). SD3
  has no kohya export: diffusers reads SD3 LoRA in its own format only.

Only what the family's LoRA loader reads can be exported: ``unet``/``transformer`` and the CLIP text encoders; an
adapter on a T5 encoder (SD3's ``text_encoder_3``, Flux's ``text_encoder_2``) is refused: no loader would apply it.

A LoRA weight ``λ`` scales ``lora_B · lora_A``; one-sided transforms are linear in ETHER strength (``λ`` = strength
``λ`` of the exported adapter), two-sided ETHER+ is not (``(Q - I)·W·P`` is quadratic in strength), so export at
the strength you want and load the LoRA at weight 1 (``docs/export.md``).
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file
from torch import nn

from ._version import __version__
from .config import ADAPTABLE_COMPONENTS, DTYPES, EtherConfig
from .delta import LoraFactors, layer_lora_factors
from .families import FAMILIES, model_family, other_family, pipeline_family, supported_families
from .files import atomic_write
from .finite import check_finite
from .inject import adapter_layers, set_active_adapters, strengths_in_words
from .io import AdapterFile, AdapterMismatchError, load_adapter, read_adapter_file
from .models import load_pipeline
from .reflection import METHODS
from .sources import default_model

__all__ = [
    "FORMATS",
    "LORA_COMPONENTS",
    "LORA_WEIGHT_NAME",
    "ExportSummary",
    "LoraFactors",  # re-exported from delta
    "export_adapters",
    "kohya_name",
    "layer_lora_factors",
    "lora_factors",
    "lora_file_size",
    "lora_rank",
    "lora_state_dict",
    "save_lora",
]

FORMATS = ("diffusers", "kohya")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(folder) finds it

#: kohya prefixes of the components a Stable Diffusion pipeline adapts.
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}

#: The components each family's ``pipe.load_lora_weights`` reads (diffusers' ``_lora_loadable_modules``), with what
#: each is, for messages. T5 encoders take no LoRA there.
LORA_COMPONENTS = {
    "sd": {"unet": "the UNet", "text_encoder": "the CLIP text encoder"},
    "sdxl": {"unet": "the UNet", "text_encoder": "the first CLIP text encoder", "text_encoder_2": "the second one"},
    "sd3": {"transformer": "the MMDiT", "text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G"},
    "flux": {"transformer": "the Flux transformer", "text_encoder": "CLIP-L"},
}
_T5 = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}

# Flux in kohya's sd-scripts names (the original checkpoint's layers). A fused layer lists its diffusers members in
# the order of its output rows.
_FLUX_DOUBLE = {
    "attn.to_out.0": "img_attn_proj",
    "attn.to_add_out": "txt_attn_proj",
    "ff.net.0.proj": "img_mlp_0",
    "ff.net.2": "img_mlp_2",
    "ff_context.net.0.proj": "txt_mlp_0",
    "ff_context.net.2": "txt_mlp_2",
    "norm1.linear": "img_mod_lin",
    "norm1_context.linear": "txt_mod_lin",
}
_FLUX_DOUBLE_FUSED = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_FLUX_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
_FLUX_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


@dataclass
class ExportSummary:
    """What ``save_lora`` wrote."""

    path: Path
    format: str
    dtype: str
    layers: dict[str, int]  # {component: number of layers} (Flux kohya: of the file, q/k/v fused into one)
    ranks: dict[str, list[int]]  # {component: sorted distinct ranks before padding} (Flux kohya: the file's)
    file_rank: int | None  # kohya: the one rank of every layer in the file; diffusers and Flux kohya: None (per layer)
    bytes: int
    notes: list[str] = field(default_factory=list)
    #: the largest difference between a weight change the file applies (its factors in ``dtype``, multiplied in
    #: float64) and the adapter's own, over every layer; and that difference over the layer's largest change
    max_weight_error: float = 0.0
    max_relative_error: float = 0.0


def rounding_error(factors: Mapping[str, Mapping[str, LoraFactors]], dtype: torch.dtype) -> tuple[float, float]:
    """``(absolute, relative)``: how far the weight changes of ``factors`` stored in ``dtype`` are from the exact
    ones, the largest over layers (relative: over that layer's largest change)."""
    worst, relative = 0.0, 0.0
    for layers in factors.values():
        for layer in layers.values():
            exact = layer.delta()
            stored = layer.up.to(dtype).double() @ layer.down.to(dtype).double()
            error = (stored - exact).abs().max().item()
            worst = max(worst, error)
            relative = max(relative, error / max(exact.abs().max().item(), 1e-300))
    return worst, relative


def lora_rank(config: EtherConfig) -> int:
    """The LoRA rank one adapter of ``config`` adds to each layer: one rank-1 term per learned vector, block and
    side (ETHER ``n``, one-sided ETHER+ ``2n``, two-sided ETHER+ ``4n``). Composed adapters add their ranks."""
    return len(METHODS[config.method].vector_names) * config.n_blocks * len(config.sides)


def lora_factors(model: nn.Module) -> dict[str, LoraFactors]:
    """``{module path: LoraFactors}`` for every layer of ``model`` whose ETHER adapters act now."""
    found = {}
    for path, layer in adapter_layers(model):
        factors = layer_lora_factors(layer)
        if factors is not None:
            found[path] = factors
    return found


def kohya_name(component: str, path: str, two_encoders: bool = False) -> str:
    """``lora_unet_down_blocks_0_…_to_q`` for ``("unet", "down_blocks.0.….to_q")``: the name A1111/ComfyUI use.

    With ``two_encoders`` (SDXL; Flux's CLIP-L) the first text encoder is ``lora_te1_``, as kohya's files name it.
    A text encoder's layers are named from the original CLIP layout, ``text_model.encoder.layers.…``, whatever
    transformers calls them now (5.x dropped the ``text_model.`` level of ``CLIPTextModel``): kohya's sd-scripts,
    ComfyUI's key map and A1111 match ``lora_te_text_model_encoder_layers_<i>_<module>`` and nothing else."""
    if component not in KOHYA_PREFIXES:
        raise ValueError(f"the kohya format names only {sorted(KOHYA_PREFIXES)}; got a component {component!r}")
    prefix = "lora_te1_" if two_encoders and component == "text_encoder" else KOHYA_PREFIXES[component]
    if component != "unet" and not path.startswith("text_model."):
        path = f"text_model.{path}"
    return prefix + path.replace(".", "_")


def _shaped(factors: LoraFactors, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``down`` (rank, in[, 1, 1]) and ``up`` (out, rank[, 1, 1]), zero-padded from ``factors.rank`` to ``rank``."""
    down, up = factors.down, factors.up
    if rank > factors.rank:
        down = torch.cat([down, down.new_zeros(rank - factors.rank, down.shape[1])])
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - factors.rank)], dim=1)
    if factors.conv:
        down, up = down[:, :, None, None], up[:, :, None, None]
    return down.to(dtype).contiguous(), up.to(dtype).contiguous()


def _peft_metadata(layers: Mapping[str, LoraFactors]) -> dict:
    """The LoraConfig fields diffusers rebuilds the adapter from: scale ``alpha / r = 1`` on every layer."""
    ranks = {path: f.rank for path, f in layers.items()}
    common = collections.Counter(ranks.values()).most_common(1)[0][0]
    others = {path: r for path, r in ranks.items() if r != common}
    return {
        "r": common,
        "lora_alpha": common,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": sorted(layers),
        "init_lora_weights": True,
    }


def _family_of(components: Mapping[str, nn.Module], family: str | None) -> str:
    """The model family the components come from: given, else told by the denoiser as ``pipeline_family`` tells it
    (the transformer's class; SDXL's UNet by its added conditioning); Stable Diffusion when there is no denoiser."""
    if family is not None:
        if family not in LORA_COMPONENTS:
            raise ValueError(f"unknown model family {family!r}; choose one of {sorted(LORA_COMPONENTS)}")
        return family
    found = pipeline_family(SimpleNamespace(**components))
    if found is None and components.get("transformer") is not None:
        name = type(components["transformer"]).__name__
        raise ValueError(f"no LoRA export for a {name} transformer; supported: {supported_families()}")
    return found.name if found is not None else "sd"


def _check_loadable(factors: Mapping[str, object], family: str) -> None:
    loadable = LORA_COMPONENTS[family]
    extra = [c for c in factors if c not in loadable]
    if extra:
        what = ", ".join(f"{c} (a T5 encoder)" if c == _T5.get(family) else c for c in extra)
        readable = ", ".join(f"{c} ({label})" for c, label in loadable.items())
        raise ValueError(
            f"the adapters change {what} of this {FAMILIES[family].label} model, and "
            f"{FAMILIES[family].pipeline}.load_lora_weights reads LoRA only for {readable}: no LoRA file can "
            "reproduce them. Use the ETHER file itself there (load_ether_weights), or export an adapter that leaves "
            f"{', '.join(extra)} unchanged"
        )


def _out_features(model: nn.Module, path: str) -> int:
    module = model.get_submodule(path)
    return getattr(module, "base_layer", module).weight.shape[0]


def _flux_name(path: str) -> tuple[str, str, tuple[str, ...] | None]:
    """``(sd-scripts name, block prefix, fused members or None)`` of a Flux transformer layer."""
    for pattern, kind, single, fused in (
        (r"transformer_blocks\.(\d+)\.(.+)", "double_blocks", _FLUX_DOUBLE, _FLUX_DOUBLE_FUSED),
        (r"single_transformer_blocks\.(\d+)\.(.+)", "single_blocks", _FLUX_SINGLE, _FLUX_SINGLE_FUSED),
    ):
        match = re.fullmatch(pattern, path)
        if match:
            index, rest = match.groups()
            prefix = path[: -len(rest) - 1]
            if rest in single:
                return f"{kind}_{index}_{single[rest]}", prefix, None
            for name, members in fused.items():
                if rest in members:
                    return f"{kind}_{index}_{name}", prefix, members
            break
    raise ValueError(
        f"the Flux layer '{path}' has no kohya name here: the Flux kohya export writes the double and single blocks' "
        "attention, feed-forward and modulation layers (diffusers' converter reads the embedding and final layers of "
        "such files under other names). Export with format='diffusers'"
    )


def _fused(members: Sequence[LoraFactors | None], rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused layer's ``(down, up)`` from its members' factors (``None``: a member without adapter; ``rows``: each
    member's output features): member j's factors fill the j-th equal share of the rank, ``up`` is block-diagonal."""
    present = [f for f in members if f is not None]
    share = max(f.rank for f in present)
    rank = share * len(members)
    down = present[0].down.new_zeros(rank, present[0].down.shape[1])
    up = present[0].up.new_zeros(sum(rows), rank)
    row = 0
    for j, (factors, count) in enumerate(zip(members, rows)):
        if factors is not None:
            down[j * share : j * share + factors.rank] = factors.down
            up[row : row + count, j * share : j * share + factors.rank] = factors.up
        row += count
    return down, up


def _flux_kohya_factors(layers: Mapping[str, LoraFactors], model: nn.Module) -> dict[str, tuple]:
    """``{sd-scripts name without prefix: (down, up)}`` of a Flux transformer's layers, fused layers joined."""
    named: dict[str, tuple] = {}
    fused: dict[str, tuple[str, tuple[str, ...]]] = {}
    for path, factors in layers.items():
        if factors.conv:
            raise ValueError(f"'{path}' is a convolution, which the Flux kohya format does not hold")
        name, prefix, members = _flux_name(path)
        if members is None:
            named[name] = (factors.down, factors.up)
        else:
            fused[name] = (prefix, members)
    for name, (prefix, members) in fused.items():
        paths = [f"{prefix}.{m}" for m in members]
        named[name] = _fused([layers.get(p) for p in paths], [_out_features(model, p) for p in paths])
    return named


def lora_state_dict(
    components: Mapping[str, nn.Module],
    format: str = "diffusers",
    dtype: torch.dtype = torch.float16,
    family: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, dict[str, LoraFactors]]]:
    """The LoRA tensors and safetensors metadata of what the components' active ETHER adapters do now.

    ``family`` ("sd", "sdxl", "sd3", "flux") names the layers; default: told by the components. Returns
    ``(tensors, metadata, factors)``; ``factors`` is ``{component: {path: LoraFactors}}`` (float64, unpadded).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {FORMATS}")
    family = _family_of(components, family)
    if format == "kohya" and family == "sd3":
        raise ValueError(
            "Stable Diffusion 3 has no kohya LoRA export: diffusers reads SD3 LoRA only in its own format "
            "('transformer.' keys, what its SD3 DreamBooth script writes); export with format='diffusers'"
        )
    factors = {c: found for c, m in components.items() if m is not None and (found := lora_factors(m))}
    if not factors:
        raise ValueError(
            "no active ETHER adapter acts on these components: load one (load_ether_weights) and keep it active "
            "and enabled before exporting"
        )
    _check_loadable(factors, family)
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt"}
    if format == "diffusers":
        peft_metadata = {}
        for component, layers in factors.items():
            for path, layer in layers.items():
                down, up = _shaped(layer, layer.rank, dtype)
                tensors[f"{component}.{path}.lora_A.weight"] = down
                tensors[f"{component}.{path}.lora_B.weight"] = up
            for key, value in _peft_metadata(layers).items():
                peft_metadata[f"{component}.{key}"] = value
        metadata["lora_adapter_metadata"] = json.dumps(peft_metadata, indent=2, sort_keys=True)
        return tensors, metadata, factors
    if family == "flux":  # per-layer ranks, alpha = rank: the Flux converter reads each layer's alpha
        named = {}
        for component, layers in factors.items():
            if component == "transformer":
                fused = _flux_kohya_factors(layers, components[component])
                named.update({f"lora_unet_{n}": f for n, f in fused.items()})
            else:
                named.update({kohya_name(component, p, two_encoders=True): (f.down, f.up) for p, f in layers.items()})
        for name, (down, up) in named.items():
            tensors[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
            tensors[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
        rank = max(down.shape[0] for down, _ in named.values())
    else:
        rank = max(layer.rank for layers in factors.values() for layer in layers.values())
        two_encoders = family == "sdxl"  # lora_te1_ / lora_te2_
        for component, layers in factors.items():
            for path, layer in layers.items():
                name = kohya_name(component, path, two_encoders)
                down, up = _shaped(layer, rank, dtype)
                tensors[f"{name}.lora_down.weight"] = down
                tensors[f"{name}.lora_up.weight"] = up
                tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float32)
    metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    return tensors, metadata, factors


def lora_file_size(
    components: Mapping[str, nn.Module], format: str = "diffusers", dtype: str = "fp16", family: str | None = None
) -> int:
    """Bytes of the LoRA file ``save_lora`` would write for these components (without its provenance metadata).

    Works on a model built on the meta device (the SD-1.5 UNet without its 860M weights): only shapes matter.
    """
    tensors, header, _ = lora_state_dict(components, format, DTYPES[dtype], family)
    zeros = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in tensors.items()}
    return len(save(zeros, metadata=header))


def _resolve_output(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        return path / LORA_WEIGHT_NAME
    if path.suffix != ".safetensors":
        raise ValueError(f"write the LoRA to a .safetensors file (or an existing folder), not '{path}'")
    return path


def save_lora(
    path: str | os.PathLike,
    pipe=None,
    format: str = "diffusers",
    dtype: str | torch.dtype = "fp32",
    metadata: Mapping[str, str] | None = None,
    family: str | None = None,
    **components: nn.Module,
) -> ExportSummary:
    """Write what the pipeline's active ETHER adapters do now as one LoRA ``.safetensors`` file, atomically.

    ``pipe`` is a pipeline with ETHER adapters loaded (``load_ether_weights``, ``set_ether_adapters`` for several
    adapters and strengths); components may also be passed as ``unet=…, text_encoder=…``. ``path`` is a
    ``.safetensors`` file or a folder (then ``pytorch_lora_weights.safetensors`` in it). ``metadata`` adds string
    pairs to the file's header.
    """
    dtype_name = dtype if isinstance(dtype, str) else next((k for k, v in DTYPES.items() if v == dtype), None)
    if dtype_name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    parts = {}
    if pipe is not None:
        parts = {c: m for c in ADAPTABLE_COMPONENTS if isinstance(m := getattr(pipe, c, None), nn.Module)}
        family = family or getattr(pipeline_family(pipe), "name", None)
    parts.update({c: m for c, m in components.items() if m is not None})
    family = _family_of(parts, family)
    tensors, header, factors = lora_state_dict(parts, format, DTYPES[dtype_name], family)
    header.update({str(k): str(v) for k, v in (metadata or {}).items()})
    header["ether_diffusion_version"] = __version__
    path = _resolve_output(path)
    # A strength far from 1 overflows the factors (two-sided ETHER+ grows with its square): a file of infinities would
    # load without complaint and draw black images, so it is refused, naming the layer, the dtype and the strengths.
    wider = "in fp32 or bf16 (CLI: --dtype fp32), or " if dtype_name == "fp16" else ""
    advice = f"the adapters act at {strengths_in_words(parts)}: export {wider}at a smaller strength"
    check_finite(tensors, "the LoRA factor", advice)
    with atomic_write(path, "the LoRA") as tmp:
        save_file(tensors, str(tmp), metadata=header)
    layers = {c: [f.rank for f in found.values()] for c, found in factors.items()}
    per_layer = format == "kohya" and family == "flux"
    if per_layer:  # the file's layers (q, k, v fused into one) and their ranks, not the adapted layers'
        layers = collections.defaultdict(list)
        for key, tensor in tensors.items():
            if key.endswith(".lora_down.weight"):
                layers["transformer" if key.startswith("lora_unet_") else "text_encoder"].append(tensor.shape[0])
    worst, relative = rounding_error(factors, DTYPES[dtype_name])
    return ExportSummary(
        path=path,
        format=format,
        dtype=dtype_name,
        max_weight_error=worst,
        max_relative_error=relative,
        layers={c: len(ranks) for c, ranks in layers.items()},
        ranks={c: sorted(set(ranks)) for c, ranks in layers.items()},
        file_rank=int(header["ss_network_dim"]) if format == "kohya" and not per_layer else None,
        bytes=path.stat().st_size,
    )


# What A1111, Forge, ComfyUI's managers and kohya's tools read to tell which base model a LoRA is for: kohya's
# ``ss_base_model_version``/``ss_v2`` and the Stability AI model spec (``modelspec.*``, version 1.0.0), with the
# architecture names of kohya's sd-scripts (library/sai_model_spec.py).
MODELSPEC_IMPLEMENTATIONS = {
    "sd": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "sd3": "diffusers",
    "flux": "https://github.com/black-forest-labs/flux",
}


def base_model_metadata(pipe, family: str, title: str) -> dict[str, str]:
    """The header fields that say what ``pipe``'s model is (``family``: ``sd``, ``sdxl``, ``sd3``, ``flux``): SD 1.x
    or 2.x (a 1024-wide text context), epsilon or v prediction (the scheduler's), the native resolution (the
    denoiser's sample size times the VAE's scale), Flux dev or schnell (guidance embedding)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    config = getattr(denoiser, "config", {})
    scheduler = getattr(getattr(pipe, "scheduler", None), "config", {})
    v_prediction = scheduler.get("prediction_type") == "v_prediction"
    side = int(config.get("sample_size") or 0) * int(getattr(pipe, "vae_scale_factor", 8) or 8)
    v2 = family == "sd" and config.get("cross_attention_dim") == 1024
    if family == "sd":
        version = "sd_v2" if v2 else "sd_v1"
        architecture = ("stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512") if v2 else (
            "stable-diffusion-v1")  # fmt: skip
    elif family == "sdxl":
        version, architecture = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"
    elif family == "flux":
        version = "flux1"
        architecture = "flux-1-dev" if config.get("guidance_embeds") else "flux-1-schnell"
    else:
        version, architecture = family, "stable-diffusion-3"
    fields = {
        "ss_base_model_version": version + ("_v" if v_prediction and family == "sd" else ""),
        "ss_v2": str(v2),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": MODELSPEC_IMPLEMENTATIONS.get(family, "diffusers"),
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if side:
        fields["modelspec.resolution"] = f"{side}x{side}"
    if family != "flux":  # Flux has no prediction type (flow matching), as kohya writes it
        fields["modelspec.prediction_type"] = "v" if v_prediction else "epsilon"
    return fields


def folder_configs(model: Path) -> SimpleNamespace:
    """What ``base_model_metadata`` reads of a pipeline, from a diffusers folder's JSON files (no model built)."""

    def read(name: str) -> dict:
        path = model / name
        return json.loads(path.read_text()) if path.is_file() else {}

    vae = read("vae/config.json")
    return SimpleNamespace(
        unet=SimpleNamespace(config=read("unet/config.json")),
        scheduler=SimpleNamespace(config=read("scheduler/scheduler_config.json")),
        vae_scale_factor=2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1),
    )


def adapter_record(source: AdapterFile, strength: float) -> dict:
    """What the exported file says of each ETHER adapter it holds: file, strength, method and blocks per component,
    and the training settings the adapter file recorded."""
    return {
        "file": Path(source.path or "").name,
        "strength": strength,
        "base_model": source.base_model,
        "methods": {c: {"method": cfg.method, "n_blocks": cfg.n_blocks} for c, cfg in source.configs.items()},
        "training": {k: v for k, v in source.extra.items() if k in TRAINING_KEYS},
    }


#: the adapter file's training record carried into exports
TRAINING_KEYS = ("steps", "learning_rate", "trained_with", "instance_prompt", "num_processes")


#: the denoiser weights of a diffusers folder, one file (sharded or ``.bin`` folders take the pipeline's way)
FOLDER_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _skeleton(weights: Path, prints: Mapping[str, Sequence[int]]) -> nn.Module | None:
    """The adapted layers of ``prints`` (``{module path: [in, out]}``) alone, at their paths in an otherwise empty
    module tree, with the base weights and biases read from ``weights``: all an exact LoRA needs of the model. None
    where the file lacks a layer, holds it in another shape or cannot be read (the pipeline's loader then says why)."""
    try:
        return _read_skeleton(weights, prints)
    except (SafetensorError, OSError):
        return None


def _read_skeleton(weights: Path, prints: Mapping[str, Sequence[int]]) -> nn.Module | None:
    root = nn.Module()
    with safe_open(str(weights), "pt") as handle:
        keys = set(handle.keys())
        for path, (width_in, width_out) in prints.items():
            if f"{path}.weight" not in keys:
                return None
            weight = handle.get_tensor(f"{path}.weight").float()  # as load_pipeline holds it: float32
            if weight.dim() == 2:
                layer = nn.Linear(width_in, width_out, bias=f"{path}.bias" in keys, device="meta")
            elif weight.dim() == 4 and weight.shape[2:] == (1, 1):
                layer = nn.Conv2d(width_in, width_out, 1, bias=f"{path}.bias" in keys, device="meta")
            else:
                return None
            if tuple(weight.shape[:2]) != (width_out, width_in):
                return None
            layer.weight = nn.Parameter(weight, requires_grad=False)
            if layer.bias is not None:
                layer.bias = nn.Parameter(handle.get_tensor(f"{path}.bias").float(), requires_grad=False)
            *parents, leaf = path.split(".")
            parent = root
            for part in parents:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, layer)
    return root


def export_from_folder(
    adapters: Sequence[tuple[AdapterFile, float]],
    output: str | os.PathLike,
    model: str | os.PathLike,
    format: str = "diffusers",
    dtype: str | torch.dtype = "fp32",
) -> ExportSummary | None:
    """``export_adapters`` without building the pipeline: for adapters of the UNet of an SD 1.x/2.x or SDXL diffusers
    folder (one ``diffusion_pytorch_model.safetensors``), only the adapted layers' base weights are read from the file
    and the LoRA is computed on them: the same file, in a fraction of the time (no diffusers import, no model load).
    None where that does not apply (another layout or family, text-encoder adapters, control files): then load the
    pipeline and call ``export_adapters``. A file made for another family is refused as loading it would be."""
    folder = Path(model)
    weights = folder / FOLDER_WEIGHTS
    if not (folder / "model_index.json").is_file() or not weights.is_file():
        return None
    try:
        family = model_family(folder)
    except ValueError:
        return None
    if family.name not in ("sd", "sdxl") or any(s.modules or set(s.configs) != {"unet"} for s, _ in adapters):
        return None
    for source, _ in adapters:
        made = other_family(source.model_family, family)
        if made is not None:
            raise AdapterMismatchError(
                f"'{source.path or '<adapter>'}' is an adapter for {made.label} models ({made.pipeline}), and "
                f"'{folder}' is a {family.label} model: export it against the model it was trained on"
                + (f" ({source.base_model})" if source.base_model else "")
            )
    prints = {path: widths for source, _ in adapters for path, widths in source.fingerprints["unet"].items()}
    skeleton = _skeleton(weights, prints)
    if skeleton is None:
        return None
    names = [load_adapter(source, {"unet": skeleton}, f"export{i}") for i, (source, _) in enumerate(adapters)]
    set_active_adapters(skeleton, names, [strength for _, strength in adapters])
    header = export_header(adapters, folder_configs(folder), family.name, output)
    return save_lora(output, format=format, dtype=dtype, metadata=header, family=family.name, unet=skeleton)


def export_header(adapters: Sequence[tuple[AdapterFile, float]], pipe, family: str, output) -> dict[str, str]:
    """The header fields an export adds to the LoRA's own: each adapter's record and what the base model is."""
    return {
        "ether_sources": json.dumps([adapter_record(source, strength) for source, strength in adapters]),
        **base_model_metadata(pipe, family, Path(output).stem),
    }


def export_to_lora(
    adapters: Sequence[tuple[AdapterFile, float]],
    output: str | os.PathLike,
    model: str | os.PathLike | None = None,
    format: str = "diffusers",
    dtype: str | torch.dtype = "fp32",
    config: str | os.PathLike | None = None,
    original_config: str | os.PathLike | None = None,
    unet_only: bool = False,
) -> ExportSummary:
    """Export ``adapters`` (``(file, strength)`` each) against ``model`` (default: the shipped tiny model): from the
    folder's files where ``export_from_folder`` applies, else through the loaded pipeline (``export_adapters``;
    ``config``/``original_config`` for a single-file model). What the command line and the studio call."""
    folder = model if model is not None else default_model()
    if config is None and original_config is None and not unet_only:
        summary = export_from_folder(adapters, output, folder, format=format, dtype=dtype)
        if summary is not None:
            return summary
    pipe = load_pipeline(model, config=config, original_config=original_config)
    return export_adapters(adapters, output, pipe, format=format, dtype=dtype, unet_only=unet_only)


CONTROL_NOTE = (
    "the condition encoder of a controllable-synthesis file is a small convolutional network added to the UNet's "
    "conv_in output, not a weight change of existing layers, so no LoRA format can hold it"
)


def export_adapters(
    adapters: Sequence[str | os.PathLike | AdapterFile | tuple[str | os.PathLike | AdapterFile, float]],
    output: str | os.PathLike,
    pipe,
    format: str = "diffusers",
    dtype: str | torch.dtype = "fp32",
    strength: float = 1.0,
    unet_only: bool = False,
) -> ExportSummary:
    """Load ETHER adapter files into ``pipe`` (a pipeline with the base model they were trained on), export them
    composed (in the order given) as one exact LoRA, and remove them from ``pipe`` again.

    Each adapter is a path (or an ``AdapterFile`` already read) or ``(path, strength)``; ``strength`` is the
    default. A file made for another model family than the pipeline's is refused with both named, as loading it into
    the pipeline refuses it. A controllable-synthesis file holds a condition encoder that is not a LoRA: it is refused
    unless ``unet_only``, which exports its UNet adapters alone (the result then changes the model but does not
    follow control images).
    """
    # pipeline.py imports diffusers' pipelines (seconds): only this way of exporting needs them, export_from_folder not
    from .pipeline import _check_family, _components, delete_ether_adapters, set_ether_adapters

    if not adapters:
        raise ValueError("give at least one adapter file to export")
    present = [n for m in _components(pipe).values() for _, layer in adapter_layers(m) for n in layer.ether_adapters]
    if present:
        raise ValueError(
            f"the pipeline already holds ETHER adapters {sorted(set(present))}; export into a pipeline without them"
        )
    specs = [(a, strength) if not isinstance(a, tuple) else (a[0], float(a[1])) for a in adapters]
    sources = []
    notes = []
    for path, _ in specs:
        source = path if isinstance(path, AdapterFile) else read_adapter_file(path)
        path = source.path or "<adapter>"
        _check_family(pipe, source)  # the check loading into a pipeline runs: the file's family against the pipeline's
        if source.modules:
            if not unet_only:
                raise ValueError(
                    f"'{path}' is a controllable-synthesis file: {CONTROL_NOTE}. Pass unet_only=True (CLI: "
                    "--unet_only) to export its UNet adapters alone (the LoRA then does not follow control "
                    "images), or use the file with EtherControlPipeline"
                )
            notes.append(f"'{path}': exported its UNet adapters only; {CONTROL_NOTE}")
            if not source.configs:
                raise ValueError(f"'{path}' holds a condition encoder and no UNet adapter: nothing to export")
        sources.append(source)
    names = []
    try:
        for i, source in enumerate(sources):
            names.append(load_adapter(source, _components(pipe), f"export{i}", accept_modules=True))
        set_ether_adapters(pipe, names, [s for _, s in specs])
        family = getattr(pipeline_family(pipe), "name", None) or sources[0].model_family or "sd"
        header = export_header([(source, s) for source, (_, s) in zip(sources, specs)], pipe, family, output)
        summary = save_lora(output, pipe, format=format, dtype=dtype, metadata=header)
    finally:
        if names:
            delete_ether_adapters(pipe, names)
    summary.notes.extend(notes)
    return summary
