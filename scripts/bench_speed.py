"""Speed and memory of ETHER against the frozen-model floor and PEFT's methods.

The launcher of ``ether-diffusion bench speed`` (same flags, ``--help``).
"""

from ether_diffusion.bench.speed import main, parse_args

if __name__ == "__main__":
    main(parse_args())
