"""Rank and file size of the exact LoRA each ETHER configuration exports to, on the real SD-1.5 UNet, SD3-medium's or
Flux-dev's transformer.

    ether-diffusion bench lora-sizes                   # the SD-1.5 table of docs/export.md
    ether-diffusion bench lora-sizes --model flux-dev  # the Flux-dev table (--model sd3-medium: SD3-medium's)

The denoiser is built from its configuration on the meta device (no download, no weights): the export's factors are
computed on shapes only and the file is serialized with zeros of those shapes, so the sizes are those of the files
``ether-diffusion export`` writes (less a few hundred bytes of provenance metadata). "LoRA rank" is per adapted layer;
Flux's kohya files fuse q, k, v (and a single block's MLP input) into one layer of 3-4 times that rank.
"""

from __future__ import annotations

import argparse

import torch

from ..architectures import FLUX_DEV_TRANSFORMER as FLUX_DEV
from ..architectures import SD3_MEDIUM_TRANSFORMER as SD3_MEDIUM
from ..config import EtherConfig
from ..export import lora_factors, lora_file_size
from ..inject import count_parameters, delete_adapter, inject

ROWS = [
    ("ETHER", "ether", None),
    ("ETHER+ one-sided", "ether_plus", ("input",)),
    ("ETHER+ two-sided", "ether_plus", ("input", "output")),
]


def sd15_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(cross_attention_dim=768)  # the SD-1.5 defaults


def _transformer(class_name: str, config: dict):
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, class_name)(**config)


#: --model: (family, denoiser component, default targets, builder)
MODELS = {
    "sd15": ("sd", "unet", "unet-attention", sd15_unet),
    "sd3-medium": ("sd3", "transformer", "sd3-attention", lambda: _transformer("SD3Transformer2DModel", SD3_MEDIUM)),
    "flux-dev": ("flux", "transformer", "flux-attention", lambda: _transformer("FluxTransformer2DModel", FLUX_DEV)),
}


def measure(model, config: EtherConfig, dtype: str = "fp16", component: str = "unet", family: str = "sd") -> dict:
    inject(model, config, "size")
    try:
        ranks = sorted({f.rank for f in lora_factors(model).values()})
        parts = {component: model}
        return {
            "layers": len(lora_factors(model)),
            "parameters": count_parameters(model, "size"),
            "ranks": ranks,
            "diffusers": lora_file_size(parts, "diffusers", dtype, family),
            "kohya": None if family == "sd3" else lora_file_size(parts, "kohya", dtype, family),  # SD3: no kohya
        }
    finally:
        delete_adapter(model, "size")


def table(targets: str | None = None, blocks=(1, 4, 16), dtype: str = "fp16", model: str = "sd15") -> str:
    family, component, preset, build = MODELS[model]
    denoiser = build()
    targets = targets or preset
    lines = [
        f"| method | n | ETHER parameters | LoRA rank | diffusers file ({dtype}) | kohya file ({dtype}) |",
        "|---|---|---|---|---|---|",
    ]
    for label, method, sides in ROWS:
        for n in blocks:
            config = EtherConfig(method=method, n_blocks=n, sides=sides, target_modules=targets)
            found = measure(denoiser, config, dtype, component, family)
            kohya = "—" if found["kohya"] is None else f"{found['kohya'] / 1e6:.2f} MB"
            lines.append(
                f"| {label} | {n} | {found['parameters']:,} | {'/'.join(map(str, found['ranks']))} | "
                f"{found['diffusers'] / 1e6:.2f} MB | {kohya} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15", help="the architecture (default: SD-1.5)")
    parser.add_argument("--targets", help="a target preset (default: the model's attention preset)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16], help="n_blocks values (rows)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    args = parser.parse_args(argv)
    if min(args.blocks) < 1:
        parser.error("--blocks must be at least 1")
    return args


def main(args: argparse.Namespace) -> str:
    """Print the table; returns it."""
    text = table(args.targets, tuple(args.blocks), args.dtype, args.model)
    print(text)
    return text
