"""Train the world evaluator: the launcher of ``ether-diffusion world train-evaluator`` (same flags, ``--help``)."""

from ether_diffusion.evaluation.train import main, parse_args

if __name__ == "__main__":
    main(parse_args())
