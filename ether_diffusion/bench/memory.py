"""What a training run holds on the GPU before its activations, per ``--base_quantization``: the denoiser's weights
and the ETHER adapter's trainable state, on the real SDXL UNet, SD3-medium's and Flux-dev's transformers.

    ether-diffusion bench memory                       # the table of docs/performance.md

Each denoiser is built from its configuration on the meta device (no download, no weights) and counted: its
``nn.Linear`` weights are what ``--base_quantization`` stores in fewer bits (``quantize.py``), everything else
(convolutions, norms, embeddings, biases) stays in bf16. Bytes per quantised weight: bf16 2; int8 1 plus a bf16
scale per output row; nf4 half a byte plus one int8 scale per block of 64 and one float32 per 256 blocks (QLoRA's
double quantisation). The adapter (ETHER+ two-sided on the family's attention preset, the default) trains in float32
with AdamW: 16 bytes per parameter (the vector, its gradient, two moments). Activations are not counted: they depend
on resolution, batch and gradient checkpointing, and are measured on a GPU (open). The text encoders are listed apart:
with ``--pre_compute_text_embeddings`` they encode every prompt once and leave the GPU before the first step.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from ..architectures import FLUX_DEV_TRANSFORMER, SD3_MEDIUM_TRANSFORMER, SDXL_UNET
from ..config import EtherConfig
from ..inject import count_parameters, inject

#: (label, diffusers class, config, target preset, text encoders' parameters in billions, as published)
MODELS = [
    ("SDXL (UNet)", "UNet2DConditionModel", SDXL_UNET, "unet-attention", 0.82),  # CLIP-L + OpenCLIP-bigG
    ("SD3-medium (transformer)", "SD3Transformer2DModel", SD3_MEDIUM_TRANSFORMER, "sd3-attention", 5.58),  # + T5-XXL
    ("Flux-dev (transformer)", "FluxTransformer2DModel", FLUX_DEV_TRANSFORMER, "flux-attention", 4.88),  # CLIP-L + T5
]
SCHEMES = ("bf16", "int8", "nf4")
GB = 1e9


def count(class_name: str, config: dict, preset: str) -> dict:
    """Parameters of the denoiser in Linear weights and in everything else, the Linear layers' output rows, and the
    default adapter's parameters."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**config)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    linear_weights = sum(m.weight.numel() for m in linears)
    total = sum(p.numel() for p in model.parameters())
    inject(model, EtherConfig(method="ether_plus", target_modules=preset), "count")
    return dict(
        linear=linear_weights,
        other=total - linear_weights,
        rows=sum(m.out_features for m in linears),
        adapter=count_parameters(model, "count"),
    )


def weight_bytes(counted: dict, scheme: str) -> float:
    linear, other, rows = counted["linear"], counted["other"], counted["rows"]
    if scheme == "bf16":
        quantised = 2 * linear
    elif scheme == "int8":
        quantised = linear + 2 * rows
    else:  # nf4: 4 bits, an int8 scale per 64 weights, a float32 per 256 of those scales
        quantised = linear / 2 + linear / 64 + 4 * linear / (64 * 256)
    return quantised + 2 * other


def table() -> str:
    lines = [
        "| model | denoiser parameters | weights bf16 | int8 | nf4 | ETHER+ adapter + AdamW state | text encoders "
        "(bf16, leave the GPU with --pre_compute_text_embeddings) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, class_name, config, preset, encoders in MODELS:
        counted = count(class_name, config, preset)
        sizes = " | ".join(f"{weight_bytes(counted, scheme) / GB:.1f} GB" for scheme in SCHEMES)
        state = 16 * counted["adapter"]
        lines.append(
            f"| {label} | {(counted['linear'] + counted['other']) / 1e9:.2f} B | {sizes} | "
            f"{counted['adapter']:,} parameters: {state / 1e6:.0f} MB | {2 * encoders:.1f} GB |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> str:
    """Print the table; returns it."""
    text = table()
    print(text)
    return text
