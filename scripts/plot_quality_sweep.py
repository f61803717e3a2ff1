"""docs/quality.md's learning-rate sweep, drawn from its JSON.

The launcher of ``ether-diffusion bench quality-sweep`` (same flags, ``--help``).
"""

from ether_diffusion.bench.quality_sweep import main, parse_args

if __name__ == "__main__":
    main(parse_args())
