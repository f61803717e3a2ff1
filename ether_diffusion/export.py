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
- ``"kohya"``: ``lora_unet_<path>`` / ``lora_te_<path>`` (SDXL: ``lora_te1_`` and ``lora_te2_``) with
  ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``: the format A1111, Forge and ComfyUI read. Every layer
  gets the same rank (smaller factors are zero-padded) and ``alpha = rank``: diffusers' kohya converter keeps
  per-layer alphas under stale names, so a file whose layers have different ranks loads there with wrong scales.

A LoRA weight ``λ`` scales ``lora_B · lora_A``; one-sided transforms are linear in ETHER strength (``λ`` = strength
``λ`` of the exported adapter), two-sided ETHER+ is not (``(Q - I)·W·P`` is quadratic in strength), so export at
the strength you want and load the LoRA at weight 1 (``docs/export.md``).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save, save_file
from torch import nn

from . import __version__
from .config import EtherConfig
from .delta import LoraFactors, layer_lora_factors
from .inject import adapter_layers
from .io import atomic_write, load_adapter, read_adapter_file
from .reflection import METHODS

__all__ = [
    "DTYPES",
    "FORMATS",
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
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(folder) finds it

#: kohya prefixes of the components a Stable Diffusion pipeline adapts.
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


@dataclass
class ExportSummary:
    """What ``save_lora`` wrote."""

    path: Path
    format: str
    dtype: str
    layers: dict[str, int]  # {component: number of layers}
    ranks: dict[str, list[int]]  # {component: sorted distinct ranks before padding}
    file_rank: int | None  # kohya: the one rank of every layer in the file; diffusers: None (per layer)
    bytes: int
    notes: list[str] = field(default_factory=list)


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

    With ``two_encoders`` (SDXL) the first text encoder is ``lora_te1_``, as kohya's SDXL files name it."""
    if component not in KOHYA_PREFIXES:
        raise ValueError(f"the kohya format names only {sorted(KOHYA_PREFIXES)}; got a component {component!r}")
    prefix = "lora_te1_" if two_encoders and component == "text_encoder" else KOHYA_PREFIXES[component]
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


def lora_state_dict(
    components: Mapping[str, nn.Module], format: str = "diffusers", dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, dict[str, LoraFactors]]]:
    """The LoRA tensors and safetensors metadata of what the components' active ETHER adapters do now.

    Returns ``(tensors, metadata, factors)``; ``factors`` is ``{component: {path: LoraFactors}}`` (float64, unpadded).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {FORMATS}")
    factors = {c: found for c, m in components.items() if m is not None and (found := lora_factors(m))}
    if not factors:
        raise ValueError(
            "no active ETHER adapter acts on these components: load one (load_ether_weights) and keep it active "
            "and enabled before exporting"
        )
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
    else:
        rank = max(layer.rank for layers in factors.values() for layer in layers.values())
        two_encoders = components.get("text_encoder_2") is not None  # SDXL: lora_te1_ / lora_te2_
        for component, layers in factors.items():
            for path, layer in layers.items():
                name = kohya_name(component, path, two_encoders)
                down, up = _shaped(layer, rank, dtype)
                tensors[f"{name}.lora_down.weight"] = down
                tensors[f"{name}.lora_up.weight"] = up
                tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float32)
        metadata.update(
            {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
        )
    return tensors, metadata, factors


def lora_file_size(components: Mapping[str, nn.Module], format: str = "diffusers", dtype: str = "fp16") -> int:
    """Bytes of the LoRA file ``save_lora`` would write for these components (without its provenance metadata).

    Works on a model built on the meta device (the SD-1.5 UNet without its 860M weights): only shapes matter.
    """
    tensors, header, _ = lora_state_dict(components, format, DTYPES[dtype])
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
    dtype: str | torch.dtype = "fp16",
    metadata: Mapping[str, str] | None = None,
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
        for name in KOHYA_PREFIXES:
            module = getattr(pipe, name, None)
            if isinstance(module, nn.Module):
                parts[name] = module
    parts.update({c: m for c, m in components.items() if m is not None})
    tensors, header, factors = lora_state_dict(parts, format, DTYPES[dtype_name])
    header.update({str(k): str(v) for k, v in (metadata or {}).items()})
    header["ether_diffusion_version"] = __version__
    path = _resolve_output(path)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    ranks = {c: sorted({f.rank for f in layers.values()}) for c, layers in factors.items()}
    return ExportSummary(
        path=path,
        format=format,
        dtype=dtype_name,
        layers={c: len(layers) for c, layers in factors.items()},
        ranks=ranks,
        file_rank=max(r for rs in ranks.values() for r in rs) if format == "kohya" else None,
        bytes=path.stat().st_size,
    )


CONTROL_NOTE = (
    "the condition encoder of a controllable-synthesis file is a small convolutional network added to the UNet's "
    "conv_in output, not a weight change of existing layers, so no LoRA format can hold it"
)


def export_adapters(
    adapters: Sequence[str | os.PathLike | tuple[str | os.PathLike, float]],
    output: str | os.PathLike,
    pipe,
    format: str = "diffusers",
    dtype: str | torch.dtype = "fp16",
    strength: float = 1.0,
    unet_only: bool = False,
) -> ExportSummary:
    """Load ETHER adapter files into ``pipe`` (a pipeline with the base model they were trained on), export them
    composed (in the order given) as one exact LoRA, and remove them from ``pipe`` again.

    Each adapter is a path or ``(path, strength)``; ``strength`` is the default. A controllable-synthesis file
    holds a condition encoder that is not a LoRA: it is refused unless ``unet_only``, which exports its UNet
    adapters alone (the result then changes the model but does not follow control images).
    """
    from .pipeline import _components, delete_ether_adapters, set_ether_adapters

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
        source = read_adapter_file(path)
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
        described = [{"file": Path(p).name, "strength": s} for p, s in specs]
        summary = save_lora(output, pipe, format=format, dtype=dtype, metadata={"ether_sources": json.dumps(described)})
    finally:
        if names:
            delete_ether_adapters(pipe, names)
    summary.notes.extend(notes)
    return summary
