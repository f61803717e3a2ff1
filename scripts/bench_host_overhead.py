"""Host time each adapter adds per layer: the launcher of ``ether-diffusion bench host`` (same flags, ``--help``)."""

from ether_diffusion.bench.host import main, parse_args

if __name__ == "__main__":
    main(parse_args())
