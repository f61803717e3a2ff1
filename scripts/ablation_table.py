"""One table and plot over several `bench dreambooth` folders.

The launcher of ``ether-diffusion bench ablation-table`` (same flags, ``--help``).
"""

from ether_diffusion.bench.ablation import main, parse_args

if __name__ == "__main__":
    main(parse_args())
