"""Pretrain the tiny Stable Diffusion of the procedural world.

The launcher of ``ether-diffusion world pretrain`` (same flags, ``--help``).
"""

from ether_diffusion.world.pretrain import main, parse_args

if __name__ == "__main__":
    main(parse_args())
