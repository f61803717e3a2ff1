"""How long the command line takes to answer: the launcher of ``ether-diffusion bench startup`` (same flags)."""

from ether_diffusion.bench.startup import main, parse_args

if __name__ == "__main__":
    main(parse_args())
