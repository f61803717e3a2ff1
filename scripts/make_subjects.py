"""Write the DreamBooth subjects of the tiny world (instance PNGs + subject.json) to ``--output_dir``.

python scripts/make_subjects.py --output_dir assets/subjects
"""

from __future__ import annotations

import argparse

from ether_diffusion.world.heldout import SUBJECT_SPECS
from ether_diffusion.world.subjects import write_subject


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="assets/subjects")
    return p.parse_args(argv)


def main(args):
    paths = [write_subject(spec, args.output_dir) for spec in SUBJECT_SPECS]
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main(parse_args())
