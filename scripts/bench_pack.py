"""Adapters per hour when K DreamBooth runs share each step.

The launcher of ``ether-diffusion bench pack`` (same flags, ``--help``).
"""

from ether_diffusion.bench.pack import main, parse_args

if __name__ == "__main__":
    main(parse_args())
