"""What --cache_latents saves per DreamBooth step.

The launcher of ``ether-diffusion bench cache-latents`` (same flags, ``--help``).
"""

from ether_diffusion.bench.cache_latents import main, parse_args

if __name__ == "__main__":
    main(parse_args())
