"""Rank and file size of the exact LoRA of each ETHER setting.

The launcher of ``ether-diffusion bench lora-sizes`` (same flags, ``--help``).
"""

from ether_diffusion.bench.lora_sizes import main, parse_args

if __name__ == "__main__":
    main(parse_args())
