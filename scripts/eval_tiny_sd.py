"""The tiny Stable Diffusion's quality gate and model card.

The launcher of ``ether-diffusion world evaluate`` (same flags, ``--help``).
"""

from ether_diffusion.evaluation.evaluate import main, parse_args

if __name__ == "__main__":
    main(parse_args())
