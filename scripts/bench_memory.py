"""Training memory per --base_quantization on SDXL, SD3-medium and Flux-dev: the launcher of ``ether-diffusion bench
memory``."""

from ether_diffusion.bench.memory import main, parse_args

if __name__ == "__main__":
    main(parse_args())
