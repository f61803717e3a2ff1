"""Rank and file size of the exact LoRA each ETHER configuration exports to, on the real SD-1.5 UNet.

    python scripts/lora_sizes.py            # prints the markdown table of docs/export.md

The UNet is built from its configuration on the meta device (no download, no 860M weights): the export's factors
are computed on shapes only and the file is serialized with zeros of those shapes, so the sizes are those of the
files ``ether-diffusion export`` writes (less a few hundred bytes of provenance metadata).
"""

from __future__ import annotations

import argparse

import torch

from ether_diffusion import EtherConfig, count_parameters, delete_adapter, inject
from ether_diffusion.export import lora_factors, lora_file_size

ROWS = [
    ("ETHER", "ether", None),
    ("ETHER+ one-sided", "ether_plus", ("input",)),
    ("ETHER+ two-sided", "ether_plus", ("input", "output")),
]


def sd15_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(cross_attention_dim=768)  # the SD-1.5 defaults


def measure(unet, config: EtherConfig, dtype: str = "fp16") -> dict:
    inject(unet, config, "size")
    try:
        ranks = sorted({f.rank for f in lora_factors(unet).values()})
        return {
            "layers": len(lora_factors(unet)),
            "parameters": count_parameters(unet, "size"),
            "ranks": ranks,
            "diffusers": lora_file_size({"unet": unet}, "diffusers", dtype),
            "kohya": lora_file_size({"unet": unet}, "kohya", dtype),
        }
    finally:
        delete_adapter(unet, "size")


def table(targets: str = "unet-attention", blocks=(1, 4, 16), dtype: str = "fp16") -> str:
    unet = sd15_unet()
    lines = [
        f"| method | n | ETHER parameters | LoRA rank | diffusers file ({dtype}) | kohya file ({dtype}) |",
        "|---|---|---|---|---|---|",
    ]
    for label, method, sides in ROWS:
        for n in blocks:
            found = measure(unet, EtherConfig(method=method, n_blocks=n, sides=sides, target_modules=targets), dtype)
            lines.append(
                f"| {label} | {n} | {found['parameters']:,} | {'/'.join(map(str, found['ranks']))} | "
                f"{found['diffusers'] / 1e6:.2f} MB | {found['kohya'] / 1e6:.2f} MB |"
            )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="unet-attention", help="a target preset (default: the paper's q/k/v/out)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    return parser.parse_args(argv)


def main(args) -> None:
    print(table(args.targets, dtype=args.dtype))


if __name__ == "__main__":
    main(parse_args())
